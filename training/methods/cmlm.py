"""The C-MLM student (Chen et al. 2020) and its per-token exits (CALM, Schuster et al. 2022).

1. Student: a small Transformer encoder-decoder (training/seq2seq_model.py) trained on
   (1 - a) * NLL(label smoothing 0.1) + a * soft CE(teacher top-K at T), a = 0.5, the teacher's
   top-K read from its cache (training/methods/cmlm_teacher.py); with no teacher, the NLL alone:
   the baseline, same seed and schedule.
2. Exits: the network frozen, every decoder layer but the last gets its own LayerNorm before the
   shared projection, trained to match the last layer (KL), and every exit a one-unit classifier
   trained to say whether its token is the last layer's (BCE).
Each epoch ends with a resumable checkpoint (state.pt) in the run folder.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from training.loop import decay_groups, linear_schedule, seed_everything
from training.losses import cmlm_loss, exit_confidence_loss, exit_matching
from training.progress import bar
from training.seq2seq_data import EncodedPairs, pad
from training.seq2seq_model import Seq2SeqConfig, Seq2SeqStudent

log = logging.getLogger("offramp.train")

STATE_NAME = "state.pt"


@dataclass
class StudentConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    warmup: float = 0.05
    weight_decay: float = 0.01
    alpha: float = 0.5
    temperature: float = 10.0
    label_smoothing: float = 0.1
    # Sized for a 2-core CPU (about 4M parameters, most of them the tied embeddings): a recipe
    # for a GPU would take d_model 512 and more epochs.
    d_model: int = 128
    num_heads: int = 4
    ffn_size: int = 512
    encoder_layers: int = 2
    decoder_layers: int = 6
    dropout: float = 0.1
    exit_epochs: int = 3
    exit_lr: float = 1e-3
    # CALM's joint training: besides the last layer's loss, every batch adds, times this weight,
    # the same loss at one earlier exit drawn with probability proportional to its depth (CALM
    # weighs layer i by i; drawing one instead of projecting all six onto the vocabulary keeps a
    # step at about 1.3x the cost, not 3.5x). Early layers then learn states the shared projection
    # can read, which exits trained afterwards on a frozen network cannot give them. 0: off.
    exit_weight: float = 0.0
    seed: int = 0
    max_source: int = 62
    max_target: int = 24


@dataclass
class TeacherTargets:
    """The cached top-K of the training pairs: pair i's target positions are offsets[i]:offsets[i+1]."""

    ids: np.ndarray  # int32 [positions, K], student vocabulary ids (-1: not in it)
    logits: np.ndarray  # float16 [positions, K]
    offsets: np.ndarray  # int64 [pairs + 1]

    def rows_of(self, pairs: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in pairs])
        return torch.from_numpy(self.ids[index].astype(np.int64)), torch.from_numpy(self.logits[index].astype(np.float32))


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    decoder_input: torch.Tensor
    labels: torch.Tensor  # -100 on padding

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.decoder_input, self.labels)))


def make_batch(data: EncodedPairs, rows, specials: dict[str, int]) -> Batch:
    """Encoder [CLS] s [SEP]; decoder in [CLS] t; labels t [SEP]."""
    bos, eos, pad_id = specials["bos"], specials["eos"], specials["pad"]
    sources = [[bos, *data.sources[i], eos] for i in rows]
    targets = [data.targets[i] for i in rows]
    ids = pad(sources, pad_id)
    mask = pad([[1] * len(s) for s in sources], 0)
    decoder_input = pad([[bos, *t] for t in targets], pad_id)
    labels = pad([[*t, eos] for t in targets], -100)
    return Batch(*(torch.from_numpy(a) for a in (ids, mask, decoder_input, labels)))


def new_student(cfg: StudentConfig, vocab_size: int, specials: dict[str, int]) -> Seq2SeqStudent:
    return Seq2SeqStudent(Seq2SeqConfig(
        vocab_size=vocab_size, d_model=cfg.d_model, num_heads=cfg.num_heads, ffn_size=cfg.ffn_size,
        encoder_layers=cfg.encoder_layers, decoder_layers=cfg.decoder_layers,
        max_source_length=cfg.max_source + 2, max_target_length=cfg.max_target + 1, dropout=cfg.dropout,
        pad_id=specials["pad"], bos_id=specials["bos"], eos_id=specials["eos"], unk_id=specials["unk"]))


def _save_state(run_dir: Path, model, optimizer, schedule, epoch: int, history: list) -> None:
    tmp = run_dir / (STATE_NAME + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch, "history": history}, tmp)
    tmp.replace(run_dir / STATE_NAME)


def train_student(data: EncodedPairs, dev: EncodedPairs, specials: dict[str, int], vocab_size: int,
                  cfg: StudentConfig, run_dir: Path, teacher: TeacherTargets | None,
                  device: torch.device | None = None) -> tuple[Seq2SeqStudent, dict]:
    """Stage 1; resumes from run_dir/state.pt when one is there."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Denormal floats (attention weights of masked positions, tiny gradients) made CPU steps
    # 4-5x slower a few epochs in (measured); flushing them to zero costs nothing in accuracy.
    torch.set_flush_denormal(True)
    seed_everything(cfg.seed)
    model = new_student(cfg, vocab_size, specials).to(device)
    # Stage 1 trains everything but the exits, and the last exit's LayerNorm (the final one);
    # trained jointly (exit_weight), every exit's LayerNorm too. The confidence classifiers wait
    # for stage 2: their labels need the finished last layer.
    trained = [p for n, p in model.named_parameters() if not n.startswith("exit_")]
    norms = model.exit_norms if cfg.exit_weight > 0 else model.exit_norms[-1:]
    trained += [p for norm in norms for p in norm.parameters()]
    optimizer = torch.optim.AdamW(decay_groups(trained, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98))
    n = len(data.sources)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    schedule = linear_schedule(optimizer, int(cfg.warmup * total), total)
    first_epoch, history = 0, []
    state_file = run_dir / STATE_NAME
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        first_epoch, history = state["epoch"], state["history"]
        log.info("cmlm student: resuming after epoch %d of %d", first_epoch, cfg.epochs)
    for epoch in range(first_epoch, cfg.epochs):
        epoch_started = time.monotonic()
        model.train()
        order = np.random.default_rng(cfg.seed * 1000 + epoch).permutation(n)
        early_exits = np.random.default_rng(cfg.seed * 1000 + 500 + epoch)
        losses = []
        for start in bar(range(0, n, cfg.batch_size), desc=f"cmlm epoch {epoch + 1}/{cfg.epochs}", unit="batch"):
            rows = order[start:start + cfg.batch_size]
            batch = make_batch(data, rows, specials).to(device)
            memory = model.encode(batch.input_ids, batch.attention_mask)
            states = model.decoder_states(memory, batch.attention_mask, batch.decoder_input)
            targets = (None, None) if teacher is None else tuple(t.to(device) for t in teacher.rows_of(rows))

            def loss_at(layer: int) -> torch.Tensor:
                logits = model.project(model.exit_norms[layer](states[layer]))
                return cmlm_loss(logits, batch.labels, *targets, cfg.alpha, cfg.temperature, cfg.label_smoothing)

            loss = loss_at(-1)
            if cfg.exit_weight > 0 and len(states) > 1:
                loss = loss + cfg.exit_weight * loss_at(draw_exit(early_exits, len(states)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
        dev_nll = dev_loss(model, dev, specials, device)
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "dev_nll": dev_nll,
                        "epoch_s": round(time.monotonic() - epoch_started, 1)})
        log.info("cmlm student epoch %d: train loss %.3f, dev nll %.3f", epoch + 1, history[-1]["train_loss"], dev_nll)
        _save_state(run_dir, model, optimizer, schedule, epoch + 1, history)
    # Summed over epochs, so that a run resumed in another session still reports its whole cost.
    return model.eval(), {"history": history, "wall_time_s": round(sum(h.get("epoch_s", 0.0) for h in history), 1),
                          "epochs": cfg.epochs, "distilled": teacher is not None}


def draw_exit(rng: np.random.Generator, layers: int) -> int:
    """An exit before the last (0-based), drawn with probability proportional to its depth."""
    depth = np.arange(1, layers)
    return int(rng.choice(layers - 1, p=depth / depth.sum()))


@torch.no_grad()
def dev_loss(model: Seq2SeqStudent, dev: EncodedPairs, specials, device, batch_size: int = 128) -> float:
    """Teacher-forced NLL per target token (no smoothing): the epoch-to-epoch check."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dev.sources), batch_size):
        batch = make_batch(dev, range(start, min(len(dev.sources), start + batch_size)), specials).to(device)
        logits = model(batch.input_ids, batch.attention_mask, batch.decoder_input)
        at = batch.labels != -100
        total += torch.nn.functional.cross_entropy(logits[at], batch.labels[at], reduction="sum").item()
        count += int(at.sum())
    return total / max(1, count)


def train_exits(model: Seq2SeqStudent, data: EncodedPairs, specials, cfg: StudentConfig,
                device: torch.device | None = None) -> dict:
    """Stage 2: the exits alone (their LayerNorms and confidence classifiers), the network frozen."""
    device = device or next(model.parameters()).device
    layers = len(model.decoder_layers)
    if not cfg.exit_weight:  # start from the final LayerNorm: the projection already reads it
        for i in range(layers - 1):
            model.exit_norms[i].load_state_dict(model.exit_norms[-1].state_dict())
    params = [p for i in range(layers - 1) for p in model.exit_norms[i].parameters()]
    params += [p for head in model.exit_confidence for p in head.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.exit_lr, weight_decay=0.0)
    n = len(data.sources)
    started, history = time.monotonic(), []
    model.eval()  # no dropout: the exits learn the states serving will see
    for epoch in range(cfg.exit_epochs):
        order = np.random.default_rng(cfg.seed * 1000 + 777 + epoch).permutation(n)
        losses, agreement = [], []
        for start in bar(range(0, n, cfg.batch_size), desc=f"exits epoch {epoch + 1}/{cfg.exit_epochs}", unit="batch"):
            batch = make_batch(data, order[start:start + cfg.batch_size], specials).to(device)
            with torch.no_grad():
                memory = model.encode(batch.input_ids, batch.attention_mask)
                states = model.decoder_states(memory, batch.attention_mask, batch.decoder_input)
            at = batch.labels != -100
            last = model.project(model.exit_norms[-1](states[-1][at]))
            loss = 0.0
            for i in range(layers - 1):
                normed = model.exit_norms[i](states[i][at])
                logits = model.project(normed)
                loss = loss + exit_matching(last, logits)
                confidence = model.exit_confidence[i](normed.detach()).squeeze(-1)
                loss = loss + exit_confidence_loss(confidence, logits, last)
                agreement.append(float((logits.argmax(-1) == last.argmax(-1)).float().mean()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                        "agreement": float(np.mean(agreement[-(layers - 1) * 20:]))})
        log.info("exits epoch %d: loss %.3f", epoch + 1, history[-1]["loss"])
    for p in model.parameters():
        p.requires_grad_(True)
    return {"history": history, "wall_time_s": round(time.monotonic() - started, 1)}
