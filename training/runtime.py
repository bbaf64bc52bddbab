"""Where a run trains, through Hugging Face Accelerate: one process on the CPU, a CUDA GPU or
Apple silicon, or many processes started by `accelerate launch` / `torchrun` (DDP: NCCL on
GPUs, gloo on CPUs). FSDP and DeepSpeed configs are refused, not yet supported.

Every process runs the same recipe. They share the data order and the initial weights (DDP also
broadcasts rank 0's at the start of each phase); each step's global batch is split between them
(so N processes x batch b see the rows 1 process x batch N*b sees), dropout differs by rank,
evaluation is split and gathered, and only the main process writes logs, progress bars,
checkpoints and bundles. `--save-every N` writes a resumable state (Accelerate's save_state plus
where the recipe was) that `--resume DIR` continues from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from training.errors import CommandError

log = logging.getLogger("offramp.train")

DEVICES = ("auto", "cpu", "cuda", "mps")
MIXED_PRECISION = ("no", "fp16", "bf16")
STATE_FILE = "offramp_state.json"
STATE_LOG = "train_log.jsonl"
# Accelerate modes whose sharded parameters the recipes cannot use (see Runtime.__init__).
UNSUPPORTED_DISTRIBUTED = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}
RANK_SEED_STRIDE = 1000  # rank r > 0 reseeds dropout with phase seed + r * RANK_SEED_STRIDE


@dataclass
class RunSettings:
    device: str = "auto"
    mixed_precision: str = "no"
    grad_accum: int = 1
    save_every: int = 0  # optimiser steps between resumable states; 0: none
    log_every: int = 50  # optimiser steps per line of the loss log
    state_dir: Path | None = None
    resume: Path | None = None
    fingerprint: dict = field(default_factory=dict)  # what a resumed run must share with the saved one


@dataclass
class PhasePosition:
    """Where a phase stands: `step` optimiser steps done, the next batch is `batch` of `epoch`."""
    index: int
    name: str
    total: int
    step: int = 0
    epoch: int = 0
    batch: int = 0
    losses: list[float] = field(default_factory=list)
    skip: bool = False  # finished before the state this run resumed from
    resumed: bool = False


def fingerprint_of(values: dict) -> dict:
    """What must not change between a run and its resumption, as short, comparable strings."""
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else
                hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()).hexdigest()[:16])
            for k, v in values.items()}


class Runtime:
    """One Accelerator for the whole run, and the bookkeeping that makes it resumable."""

    def __init__(self, settings: RunSettings | None = None):
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.settings = settings = settings or RunSettings()
        if settings.device not in DEVICES:
            raise CommandError(f"--device {settings.device}: must be one of {', '.join(DEVICES)}")
        if settings.mixed_precision not in MIXED_PRECISION:
            raise CommandError(f"--mixed-precision {settings.mixed_precision}: must be one of "
                               f"{', '.join(MIXED_PRECISION)}")
        if settings.grad_accum < 1:
            raise CommandError(f"--grad-accum {settings.grad_accum}: must be 1 or more")
        _check_device(settings.device)
        try:
            self.accelerator = Accelerator(
                cpu=settings.device == "cpu" or not _accelerator_here(), mixed_precision=settings.mixed_precision,
                step_scheduler_with_optimizer=False,
                kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
        except (ValueError, RuntimeError) as e:  # e.g. fp16 where the device has none
            raise CommandError(f"--mixed-precision {settings.mixed_precision} on {settings.device}: {e}") from None
        kind = str(self.accelerator.distributed_type).split(".")[-1]
        if kind in UNSUPPORTED_DISTRIBUTED:
            raise CommandError(f"Accelerate's config asks for {kind}: offramp trains data-parallel (DDP) only so "
                               f"far, since its recipes run parts of a model outside its forward, which "
                               f"{kind}'s sharding does not allow; launch with a multi-GPU config without it")
        if settings.device not in ("auto", self.device.type):
            raise CommandError(f"--device {settings.device}: the launcher put this process on "
                               f"{self.device.type}; drop --device or launch without --cpu")
        if self.world_size == 1 and os.environ.get("MASTER_ADDR") and not os.environ.get("WORLD_SIZE"):
            log.warning("one process: `accelerate launch --cpu --num_processes N` starts N processes only "
                        "through MPI (add --mpirun_hostfile FILE); or start them with `torchrun "
                        "--nproc_per_node N` (docs/training.md)")
        self._phase = 0
        self.global_step = 0
        self.saved = _read_state(settings.resume, self.world_size, settings.fingerprint) if settings.resume else None

    # -- who and where -------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def local_world_size(self) -> int:
        """Processes on this machine (torchrun, Open MPI), to share its cores between them."""
        if self.world_size == 1:
            return 1
        for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
            if os.environ.get(name, "").isdigit():
                return int(os.environ[name])
        return 1

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def describe(self) -> dict:
        """The provenance of a checkpoint and bundle: how and where it was trained."""
        backend = self.accelerator.state.backend if self.world_size > 1 else None
        return {"world_size": self.world_size, "backend": backend,
                "mixed_precision": self.accelerator.mixed_precision, "device": self.device.type,
                "distributed_type": str(self.accelerator.distributed_type).split(".")[-1].lower(),
                "grad_accum": self.settings.grad_accum,
                "rank_seeds": f"rank r > 0: each phase's seed + {RANK_SEED_STRIDE} r for dropout; data "
                              f"order and initial weights are the same on every rank",
                "resumed_from_step": self.saved["global_step"] if self.saved else None}

    # -- data ----------------------------------------------------------------------------
    def share(self, batch):
        """This process's part of one global batch, as `grad_accum` micro-batches with the weight
        that makes the average of every process's weighted mean loss the global batch's mean.
        A process left without a row (a global batch smaller than the process count) gets one
        row at weight 0, so that every process still takes part in the step."""
        rows = len(batch.index)
        bounds = [rows * r // self.world_size for r in range(self.world_size + 1)]
        start, end = bounds[self.rank], bounds[self.rank + 1]
        if start == end:
            return [(batch.select(slice(0, 1)).to(self.device), 0.0)]
        mine = end - start
        parts = min(self.settings.grad_accum, mine)
        cuts = [start + mine * j // parts for j in range(parts + 1)]
        return [(batch.select(slice(a, b)).to(self.device), (b - a) * self.world_size / rows)
                for a, b in zip(cuts, cuts[1:])]

    def my_items(self, count: int) -> range:
        """Item indices (e.g. evaluation batches) this process handles: every world_size-th."""
        return range(self.rank, count, self.world_size)

    def gather(self, items: list) -> list:
        """Every process's `items` (picklable), concatenated in rank order, on every process."""
        if self.world_size == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def autocast(self):
        return self.accelerator.autocast()

    # -- phases and resumable state --------------------------------------------------------
    def begin_phase(self, name: str, total: int) -> PhasePosition:
        """The next training phase of the recipe, and where it starts when resuming."""
        position = PhasePosition(self._phase, name, total)
        self._phase += 1
        if self.saved is None:
            return position
        saved = self.saved["phase"]
        if position.index < saved["index"]:
            position.skip = True
        elif position.index == saved["index"]:
            if saved["name"] != name or saved["total"] != total:
                raise CommandError(f"--resume {self.settings.resume}: saved in phase {saved['name']!r} of "
                                   f"{saved['total']} steps, but this run's phase {position.index + 1} is "
                                   f"{name!r} of {total}: not the same recipe")
            position.step, position.epoch, position.batch = saved["step"], saved["epoch"], saved["batch"]
            # Saved as the global losses; each process holds its share of them, as it would have.
            position.losses = [loss / self.world_size for loss in saved["losses"]]
            position.resumed = True
        return position

    def resume_into(self, position: PhasePosition) -> None:
        """Load the model, optimiser, scheduler and random states saved in this phase."""
        self.accelerator.load_state(str(self.settings.resume))
        self.global_step = self.saved["global_step"]
        log.info("%s: resumed from %s at step %d of %d (run step %d)", position.name,
                 self.settings.resume, position.step, position.total, self.global_step)

    def due(self) -> bool:
        every = self.settings.save_every
        return bool(every) and self.global_step % every == 0

    def save(self, position: PhasePosition, log_file: Path | None) -> Path:
        """Write the resumable state: into a fresh folder, then renamed over the last one, so
        an interruption while saving leaves the previous state whole."""
        with _signals_held():
            return self._save(position, log_file)

    def _save(self, position: PhasePosition, log_file: Path | None) -> Path:
        target = self.state_dir
        staging = target.with_name(target.name + ".saving")
        if self.is_main and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        losses = self.sum(position.losses)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {"global_step": self.global_step, "world_size": self.world_size,
                     "fingerprint": self.settings.fingerprint,
                     "phase": {"index": position.index, "name": position.name, "total": position.total,
                               "step": position.step, "epoch": position.epoch, "batch": position.batch,
                               "losses": losses}}
            (staging / STATE_FILE).write_text(json.dumps(state, indent=1))
            if log_file is not None and log_file.is_file():
                shutil.copyfile(log_file, staging / STATE_LOG)
            old = target.with_name(target.name + ".old")
            if target.exists():
                target.rename(old)
            staging.rename(target)
            shutil.rmtree(old, ignore_errors=True)
            log.info("resumable state written to %s (run step %d; %s step %d of %d)", target,
                     self.global_step, position.name, position.step, position.total)
        self.accelerator.wait_for_everyone()
        return target

    @property
    def state_dir(self) -> Path:
        if self.settings.state_dir is None:
            raise CommandError("--save-every needs a folder for the state (--state-dir)")
        return Path(self.settings.state_dir)

    def restore_log(self, log_file: Path | None) -> None:
        """A resumed run's loss log starts as the saved run's."""
        if self.saved and log_file is not None and self.is_main:
            saved = Path(self.settings.resume) / STATE_LOG
            if saved.is_file():
                shutil.copyfile(saved, log_file)

    def finish(self) -> None:
        """The run is complete: its resumable state is of no more use. No barrier: the other
        processes end while the main one still exports (a barrier would time out on a long
        calibration)."""
        written = [self.state_dir] if self.settings.save_every and self.settings.state_dir else []
        resumed = [Path(self.settings.resume)] if self.settings.resume else []
        if self.is_main:
            for folder in {f for state in written + resumed for f in (state, state.with_name(state.name + ".saving"))}:
                if folder.exists():
                    shutil.rmtree(folder, ignore_errors=True)
                    log.info("run complete: removed its resumable state %s", folder)



@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the state is written and renamed into place."""
    held = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _accelerator_here() -> bool:
    """A GPU or Apple MPS that Accelerate would use. Without one, processes started by torchrun
    or `accelerate launch --multi_gpu` must be told they are CPU processes (gloo), or Accelerate
    takes each for a run of its own."""
    mps = getattr(torch.backends, "mps", None)
    return torch.cuda.is_available() or bool(mps and mps.is_available())


def _check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False; "
                           "install a CUDA build of torch, or use --device cpu)")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CommandError("--device mps: Apple's Metal backend is not available on this machine")


def _read_state(folder: Path, world_size: int, fingerprint: dict) -> dict:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CommandError(f"--resume {folder}: no {STATE_FILE} there (not a state written by --save-every)")
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"--resume {folder}: {STATE_FILE} cannot be read: {e}") from None
    if state.get("world_size") != world_size:
        raise CommandError(f"--resume {folder}: saved by {state.get('world_size')} process(es), this run has "
                           f"{world_size}: resume with the same number (the data split and every rank's "
                           f"random state depend on it)")
    saved = state.get("fingerprint") or {}
    changed = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if changed:
        details = ", ".join(f"{k} {saved.get(k)!r} -> {fingerprint.get(k)!r}" for k in changed[:6])
        raise CommandError(f"--resume {folder}: the saved run had other settings or data ({details}); "
                           f"resume with the command it was started with")
    return state


_default: Runtime | None = None


def default_runtime() -> Runtime:
    """One process, the best device Accelerate finds: what a recipe run without the CLI gets."""
    global _default
    if _default is None:
        _default = Runtime()
    return _default
