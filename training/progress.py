"""Progress of the slow phases: a log line at the start and end of each (with its duration),
and a tqdm bar on stderr while it runs (shown only on a terminal: `disable=None`)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterable, Iterator

from tqdm import tqdm

log = logging.getLogger("offramp.train")


# Where launchers put a process's rank: torchrun / accelerate launch, Open MPI, Intel MPI, MVAPICH.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def is_first_process() -> bool:
    """Not a second, third, ... process of a distributed run (read before any is set up)."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def shown() -> bool | None:
    """tqdm's `disable`: bars on a terminal only (None), and only on the first process."""
    return None if is_first_process() else True


def bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it",
        **kwargs) -> tqdm:
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=shown(),
                **{"leave": False, "mininterval": 1.0, "dynamic_ncols": True, **kwargs})


class Phase:
    def __init__(self, name: str):
        self.name = name
        self.result = ""  # appended to the closing log line

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start


@contextlib.contextmanager
def phase(name: str, detail: str = "") -> Iterator[Phase]:
    """Log `name: started (detail)`, then `name: done in Ns (result)` or `name: failed after Ns`."""
    current = Phase(name)
    log.info("%s: started%s", name, f" ({detail})" if detail else "")
    current._start = time.perf_counter()
    try:
        yield current
    except BaseException:
        log.info("%s: failed after %.1fs", name, current.elapsed)
        raise
    log.info("%s: done in %.1fs%s", name, current.elapsed, f" ({current.result})" if current.result else "")


class CountingEngine:
    """An Engine whose batch calls (run, all_layer_probabilities) advance a progress bar."""

    def __init__(self, engine, progress: tqdm):
        self._engine, self._progress = engine, progress

    def run(self, *args, **kwargs):
        result = self._engine.run(*args, **kwargs)
        self._progress.update()
        return result

    def all_layer_probabilities(self, *args, **kwargs):
        result = self._engine.all_layer_probabilities(*args, **kwargs)
        self._progress.update()
        return result

    def __getattr__(self, name):
        return getattr(self._engine, name)


# The settings passed to app.calibration.calibrate (its defaults), so the bar knows its length.
SWEEP_STEP, TIMED_STEP, SWEEP_BATCH, SWEEP_REPEATS = 0.01, 0.05, 32, 3


def calibrate(engine, encoder, inputs, labels, tolerance_points: float, name: str = "dev calibration sweep"):
    """app.calibration.calibrate with a phase log and a progress bar over its engine calls: one
    full-depth pass, then timed runs at every TIMED_STEP threshold and the recommended one. The
    engine's manifest (the one being written) gets every policy's table too."""
    from app.calibration import calibrate as sweep, fine_grid

    inputs = list(inputs)
    batches = -(-len(inputs) // SWEEP_BATCH)
    timed = len(fine_grid(TIMED_STEP)) + 1  # + the recommended threshold, when off that grid
    timed += 1 + len(engine.policies) - 1  # full depth and each other policy's recommended setting
    with phase(name, f"{len(inputs):,} rows, {batches} batches, thresholds 0..1 by {SWEEP_STEP}, "
                     f"speed timed at {timed - 1}+1 thresholds x {SWEEP_REPEATS}") as p, \
            bar(total=batches * (1 + timed * SWEEP_REPEATS), desc=name, unit="batch") as progress:
        points, recommended = sweep(CountingEngine(engine, progress), encoder, inputs, labels,
                                    tolerance_points=tolerance_points, step=SWEEP_STEP,
                                    timed_step=TIMED_STEP, batch_size=SWEEP_BATCH, repeats=SWEEP_REPEATS,
                                    manifest=engine.manifest)
        others = engine.manifest.policies
        p.result = f"recommended threshold {recommended:.2f}" + "".join(
            f", {name} {table.recommended_threshold if table.recommended_threshold is not None else ''}"
            f"{'patience ' + str(table.recommended_patience) if table.recommended_patience else ''}"
            for name, table in others.items())
    return points, recommended
