"""The one training loop every recipe uses, and per-layer evaluation."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from training.dataset import Batch, EncodedDataset
from training.model import EarlyExitModel
from training.progress import bar
from training.runtime import RANK_SEED_STRIDE, Runtime, default_runtime

log = logging.getLogger("offramp.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def decay_groups(params: Sequence[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices, none on biases and LayerNorm weights."""
    params = list(params)
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossModule(nn.Module):
    """The modules a phase trains, with its loss as their forward: what Accelerate prepares, so
    that DDP sees the loss computed through its own forward (its gradient hooks need that) and
    mixed precision covers all of it."""

    def __init__(self, module: nn.Module, loss_fn: Callable[[Batch], torch.Tensor]):
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.loss_fn(batch)


@contextlib.contextmanager
def training_only(model: nn.Module, params: Sequence[nn.Parameter]):
    """Gradients for `params` alone while the phase runs (DDP requires every parameter that
    wants one to get one); the model's other parameters are given theirs back afterwards."""
    chosen = {id(p) for p in params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


def train(
    name: str,
    params: Sequence[torch.nn.Parameter],
    model: torch.nn.Module,
    dataset: EncodedDataset,
    loss_fn: Callable[[Batch], torch.Tensor],
    epochs: float,
    lr: float,
    batch_size: int,
    warmup: float,
    weight_decay: float,
    seed: int,
    log_file: Path | None = None,
    max_grad_norm: float = 1.0,
    runtime: Runtime | None = None,
) -> list[float]:
    """AdamW with linear warm-up and decay over `epochs` (fractions allowed) of `dataset`, in
    global batches of `batch_size` rows per process. Returns the (global) loss of every step;
    every `log_every` steps (the runtime's setting) the mean goes to `log_file`. Every process
    of a distributed run runs it alike; it resumes from the runtime's saved state when that was
    taken in this phase."""
    runtime = runtime or default_runtime()
    params = [p for p in params if p.requires_grad]
    global_batch = batch_size * runtime.world_size
    total = max(1, math.ceil(epochs * dataset.num_batches(global_batch)))
    position = runtime.begin_phase(name, total)
    if position.skip:
        log.info("%s: already done in the state resumed from; skipped", name)
        return []
    accelerator = runtime.accelerator
    with training_only(model, params):
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        schedule = linear_schedule(optimizer, int(warmup * total), total)
        wrapped, optimizer, schedule = accelerator.prepare(LossModule(model, loss_fn), optimizer, schedule)
        if position.resumed:
            runtime.resume_into(position)
        elif runtime.rank > 0:  # the same initial weights everywhere, dropout of its own
            torch.manual_seed(seed + RANK_SEED_STRIDE * runtime.rank)
        losses = position.losses
        wrapped.train()
        log.info("%s: started (%s steps: %g epoch(s) of %s rows in batches of %d%s, lr %g)", name,
                 f"{total:,}", epochs, f"{len(dataset):,}", global_batch,
                 f" = {runtime.world_size} processes x {batch_size}" if runtime.world_size > 1 else "", lr)
        start = time.perf_counter()
        # On stderr, on a terminal only, of the main process; the loss log is in log_file either way.
        with bar(total=total, initial=position.step, desc=name, unit="step", mininterval=2.0,
                 leave=True) as progress:
            while position.step < total:
                for i, batch in enumerate(dataset.batches(global_batch, shuffle=True, seed=seed + position.epoch)):
                    if i < position.batch:  # trained before the state this run resumed from
                        continue
                    losses.append(_step(runtime, wrapped, optimizer, schedule, params, batch, max_grad_norm))
                    position.step, position.batch = position.step + 1, i + 1
                    runtime.global_step += 1
                    progress.update()
                    if position.step % runtime.settings.log_every == 0 or position.step == total:
                        _log_losses(runtime, name, position, losses, schedule, log_file, progress,
                                    time.perf_counter() - start)
                    if runtime.due() and position.step < total:
                        runtime.save(position, log_file)
                    if position.step >= total:
                        break
                else:
                    position.epoch, position.batch = position.epoch + 1, 0
        accelerator.free_memory()
    losses = runtime.sum(losses)  # every process's contributions: the global batches' losses
    model.eval()
    window = runtime.settings.log_every
    log.info("%s: done in %.1fs (last %d steps' mean loss %.4f)", name, time.perf_counter() - start,
             min(window, len(losses)), float(np.mean(losses[-window:])))
    return losses


def train_phase(name: str, params, module: nn.Module, dataset: EncodedDataset,
                loss_fn: Callable[[Batch], torch.Tensor], epochs: float, lr: float,
                cfg, task, seed_offset: int = 0) -> None:
    """One phase of a recipe through `train`, with the recipe's (`cfg`) batch size, warm-up,
    weight decay and seed, and the task's log and runtime; epochs <= 0 skips it."""
    if epochs > 0:
        train(name, params, module, dataset, loss_fn, epochs, lr, cfg.batch_size, cfg.warmup,
              cfg.weight_decay, cfg.seed + seed_offset, task.log_file, runtime=task.runtime)


def _step(runtime: Runtime, wrapped, optimizer, schedule, params, batch: Batch, max_grad_norm: float) -> float:
    """One optimiser step on this process's share of a global batch; returns its contribution
    to the global batch's mean loss (the contributions of every process add up to it)."""
    accelerator = runtime.accelerator
    parts = runtime.share(batch)
    contribution = 0.0
    for j, (micro, weight) in enumerate(parts):
        # Gradients are averaged across processes once, after the last micro-batch.
        sync = contextlib.nullcontext() if j == len(parts) - 1 else accelerator.no_sync(wrapped)
        with sync:
            loss = wrapped(micro)
            accelerator.backward(loss * weight if weight != 1.0 else loss)
        contribution += loss.item() * weight / runtime.world_size
    accelerator.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return contribution


def _log_losses(runtime: Runtime, name: str, position, losses: list[float], schedule, log_file, progress,
                elapsed_s: float) -> None:
    """The global mean loss of the last `log_every` steps: on the bar, and a line in log_file."""
    recent = runtime.sum([float(np.mean(losses[-runtime.settings.log_every:]))])[0]
    progress.set_postfix(loss=f"{recent:.4f}")
    if log_file is not None and runtime.is_main:
        with open(log_file, "a") as f:
            f.write(json.dumps({"stage": name, "step": position.step, "epoch": position.epoch,
                                "loss": recent, "lr": schedule.get_last_lr()[0],
                                "elapsed_s": round(elapsed_s, 3)}) + "\n")


@torch.no_grad()
def layer_logits(model: EarlyExitModel, dataset: EncodedDataset, batch_size: int = 64,
                 runtime: Runtime | None = None) -> np.ndarray:
    """[layers, rows, classes] logits of every exit, rows in dataset order; the batches are
    split between the processes of a distributed run and gathered on every one."""
    runtime = runtime or default_runtime()
    model.eval()
    device = next(model.parameters()).device
    batches = list(range(dataset.num_batches(batch_size)))
    mine = set(runtime.my_items(len(batches)))
    chunks = []
    for i, b in enumerate(dataset.batches(batch_size, shuffle=False)):
        if i in mine:
            chunks.append((i, torch.stack(model(*b.to(device).inputs())).float().cpu().numpy()))
    chunks = sorted(runtime.gather(chunks), key=lambda chunk: chunk[0])
    return np.concatenate([c for _, c in chunks], axis=1)


def layer_accuracy(model: EarlyExitModel, dataset: EncodedDataset, runtime: Runtime | None = None) -> list[float]:
    predictions = layer_logits(model, dataset, runtime=runtime).argmax(axis=-1)
    return [float(x) for x in (predictions == dataset.labels[None, :]).mean(axis=1)]
