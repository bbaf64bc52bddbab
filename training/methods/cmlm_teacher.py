"""The C-MLM teacher (Chen et al. 2020): a BERT-family encoder fine-tuned as a conditional masked
LM on [CLS] source [SEP] target [SEP], masking 15 % of the target tokens only, and its top-K
distribution at every target position, computed once and cached for the student.

The MLM head is the checkpoint's own where it has one; otherwise (the MiniLM package has none)
a fresh transform with the decoder tied to the input embeddings (transformers'
AutoModelForMaskedLM does both). The cache masks the target in ceil(1 / rate) interleaved passes
(positions p, p + n, p + 2n, ... in pass p), so that every position is predicted once, with as
much of the target hidden as in training.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from training.loop import decay_groups, linear_schedule, seed_everything
from training.progress import bar
from training.seq2seq_data import EncodedPairs, pad

log = logging.getLogger("offramp.train")

META_NAME = "cmlm_teacher.json"
CACHE_NAME = "teacher_topk.npz"


@dataclass
class TeacherConfig:
    epochs: float = 3.0
    lr: float = 1e-4
    batch_size: int = 32
    warmup: float = 0.06
    weight_decay: float = 0.01
    mask_rate: float = 0.15
    max_source: int = 62
    max_target: int = 24
    seed: int = 0
    top_k: int = 8


def teacher_inputs(sources: list[list[int]], targets: list[list[int]], cls_id: int, sep_id: int, pad_id: int):
    """[CLS] s [SEP] t [SEP] rows -> (input_ids, token_type_ids, attention_mask, target_positions):
    target_positions[i] are row i's positions of t and of its final [SEP] (the end the student
    learns to produce)."""
    rows, types, positions = [], [], []
    for s, t in zip(sources, targets):
        head = [cls_id, *s, sep_id]
        rows.append(head + list(t) + [sep_id])
        types.append([0] * len(head) + [1] * (len(t) + 1))
        positions.append(list(range(len(head), len(head) + len(t) + 1)))
    return pad(rows, pad_id), pad(types, 0), pad([[1] * len(r) for r in rows], 0), positions


def mask_targets(ids: np.ndarray, positions: list[list[int]], rate: float, mask_id: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask `rate` of each row's target positions (at least one), never a source token.
    Returns (masked ids, labels with -100 where nothing is predicted)."""
    masked, labels = ids.copy(), np.full_like(ids, -100)
    for i, pos in enumerate(positions):
        count = max(1, int(round(rate * len(pos))))
        chosen = rng.choice(pos, size=count, replace=False)
        labels[i, chosen] = ids[i, chosen]
        masked[i, chosen] = mask_id
    return masked, labels


def mlm_logits(model, ids, types, attention, where: torch.Tensor) -> torch.Tensor:
    """Logits at the positions `where` ([n, 2] row, position) only: the vocabulary projection of
    every position would cost more than the encoder."""
    states = model.base_model(input_ids=ids, token_type_ids=types, attention_mask=attention).last_hidden_state
    return mlm_head(model)(states[where[:, 0], where[:, 1]])


def mlm_head(model):
    """The MLM head over final states: BERT's `cls`, RoBERTa's `lm_head`, ELECTRA's generator head."""
    for name in ("cls", "lm_head"):
        if hasattr(model, name):
            return getattr(model, name)
    if hasattr(model, "generator_predictions"):
        return lambda states: model.generator_lm_head(model.generator_predictions(states))
    raise ValueError(f"{type(model).__name__}: no MLM head found")


def load_mlm(name_or_path: str | Path):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(str(name_or_path))


def train_teacher(encoder: str | Path, data: EncodedPairs, specials: dict[str, int], cfg: TeacherConfig,
                  out_dir: Path, device: torch.device | None = None):
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_flush_denormal(True)  # as training/methods/cmlm.py: denormals slow CPU steps
    seed_everything(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = load_mlm(encoder).to(device).train()
    n = len(data.sources)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total = int(cfg.epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(decay_groups(model.parameters(), cfg.weight_decay), lr=cfg.lr)
    schedule = linear_schedule(optimizer, int(cfg.warmup * total), total)
    started, step, losses = time.monotonic(), 0, []
    progress = bar(total=total, desc="cmlm teacher", unit="step")
    while step < total:
        order = rng.permutation(n)
        for start in range(0, n, cfg.batch_size):
            if step >= total:
                break
            batch = order[start:start + cfg.batch_size]
            ids, types, attention, positions = teacher_inputs([data.sources[i] for i in batch],
                                                              [data.targets[i] for i in batch],
                                                              specials["bos"], specials["eos"], specials["pad"])
            masked, labels = mask_targets(ids, positions, cfg.mask_rate, specials["mask"], rng)
            where = torch.from_numpy(np.argwhere(labels != -100)).to(device)
            logits = mlm_logits(model, torch.from_numpy(masked).to(device), torch.from_numpy(types).to(device),
                                torch.from_numpy(attention).to(device), where)
            target = torch.from_numpy(labels[labels != -100]).to(device)
            loss = torch.nn.functional.cross_entropy(logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            progress.update(1)
            if step % 50 == 0:
                log.info("cmlm teacher step %d/%d loss %.3f", step, total, np.mean(losses[-50:]))
    progress.close()
    out_dir = Path(out_dir)
    model.eval()
    model.save_pretrained(out_dir)
    meta = {"config": asdict(cfg), "encoder": str(encoder), "wall_time_s": round(time.monotonic() - started, 1),
            "final_loss": float(np.mean(losses[-50:])), "steps": step}
    (out_dir / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return model, meta


@torch.no_grad()
def teacher_topk(model, data: EncodedPairs, specials: dict[str, int], cfg: TeacherConfig,
                 batch_size: int = 64, device: torch.device | None = None) -> dict[str, np.ndarray]:
    """Top-K logits and ids at every target position (targets then [SEP]) of every pair:
    {"ids": int32 [positions, K], "logits": float16 [positions, K], "offsets": int64 [pairs + 1]},
    pair i's positions being offsets[i]:offsets[i+1], in target order."""
    device = device or next(model.parameters()).device
    model.eval()
    passes = math.ceil(1 / cfg.mask_rate)
    lengths = np.array([len(t) + 1 for t in data.targets])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    top_ids = np.zeros((offsets[-1], cfg.top_k), dtype=np.int32)
    top_logits = np.zeros((offsets[-1], cfg.top_k), dtype=np.float16)
    n = len(data.sources)
    for start in bar(range(0, n, batch_size), desc="teacher top-k", unit="batch"):
        rows = list(range(start, min(n, start + batch_size)))
        ids, types, attention, positions = teacher_inputs([data.sources[i] for i in rows],
                                                          [data.targets[i] for i in rows],
                                                          specials["bos"], specials["eos"], specials["pad"])
        for p in range(passes):
            where = [(r, pos[j]) for r, pos in enumerate(positions) for j in range(p, len(pos), passes)]
            if not where:
                continue
            masked = ids.copy()
            where_arr = np.array(where)
            masked[where_arr[:, 0], where_arr[:, 1]] = specials["mask"]
            logits = mlm_logits(model, torch.from_numpy(masked).to(device), torch.from_numpy(types).to(device),
                                torch.from_numpy(attention).to(device), torch.from_numpy(where_arr).to(device))
            values, indices = logits.float().topk(cfg.top_k, dim=-1)
            flat = [offsets[rows[r]] + positions[r].index(pos) for r, pos in where]
            top_ids[flat] = indices.cpu().numpy()
            top_logits[flat] = values.cpu().numpy().astype(np.float16)
    return {"ids": top_ids, "logits": top_logits, "offsets": offsets}
