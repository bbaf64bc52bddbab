"""The one training loop every recipe uses, and per-layer evaluation."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from training.dataset import Batch, EncodedDataset
from training.model import EarlyExitModel

LOG_EVERY = 50
log = logging.getLogger("offramp.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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
) -> list[float]:
    """AdamW with linear warm-up and decay over `epochs` (fractions allowed) of `dataset`.
    Returns the loss of every step; every LOG_EVERY steps the mean goes to `log_file`."""
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max(1, math.ceil(epochs * dataset.num_batches(batch_size)))
    schedule = linear_schedule(optimizer, int(warmup * total), total)
    losses: list[float] = []
    model.train()
    log.info("%s: started (%s steps: %g epoch(s) of %s rows in batches of %d, lr %g)", name, f"{total:,}",
             epochs, f"{len(dataset):,}", batch_size, lr)
    start = time.perf_counter()
    # On stderr, and only on a terminal (disable=None); the loss log is in log_file either way.
    with tqdm(total=total, desc=name, unit="step", mininterval=2.0, file=sys.stderr, disable=None) as progress:
        epoch = 0
        while len(losses) < total:
            for batch in dataset.batches(batch_size, shuffle=True, seed=seed + epoch):
                loss = loss_fn(batch)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                progress.update()
                if len(losses) % LOG_EVERY == 0 or len(losses) == total:
                    recent = float(np.mean(losses[-LOG_EVERY:]))
                    progress.set_postfix(loss=f"{recent:.4f}")
                    if log_file is not None:
                        with open(log_file, "a") as f:
                            f.write(json.dumps({"stage": name, "step": len(losses), "epoch": epoch,
                                                "loss": recent, "lr": schedule.get_last_lr()[0]}) + "\n")
                if len(losses) >= total:
                    break
            epoch += 1
    model.eval()
    log.info("%s: done in %.1fs (last %d steps' mean loss %.4f)", name, time.perf_counter() - start,
             min(LOG_EVERY, len(losses)), float(np.mean(losses[-LOG_EVERY:])))
    return losses


@torch.no_grad()
def layer_logits(model: EarlyExitModel, dataset: EncodedDataset, batch_size: int = 64) -> np.ndarray:
    """[layers, rows, classes] logits of every exit, rows in dataset order."""
    model.eval()
    chunks = [torch.stack(model(*b.inputs())).numpy() for b in dataset.batches(batch_size, shuffle=False)]
    return np.concatenate(chunks, axis=1)


def layer_accuracy(model: EarlyExitModel, dataset: EncodedDataset) -> list[float]:
    predictions = layer_logits(model, dataset).argmax(axis=-1)
    return [float(x) for x in (predictions == dataset.labels[None, :]).mean(axis=1)]
