"""The frozen teacher of a distillation: loading its checkpoint and tokenizer, and the outputs
that do not change during training, computed once (TeacherCache).

Logits are always cached, the supervised layers' [CLS] states for PKD, and DistilBERT's
last-layer token states when they fit a memory budget. TinyBERT and MobileBERT match full hidden
states and attention maps ([rows, heads, t, t]) of several layers: kept for a whole training set
those would take tens of GB, so their recipes recompute them per batch under no_grad.

Under data parallelism every process builds the cache once, for every row (a process's batches
change with the epoch): once per process, never once per step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from training.dataset import Batch, EncodedDataset
from training.model import CHECKPOINT_META, EarlyExitModel
from training.progress import bar


def load_teacher(directory: Path) -> tuple[EarlyExitModel, dict]:
    """A frozen early-exit checkpoint written by `offramp train fastbert` (its --checkpoint
    folder); its last head is the fine-tuned teacher classifier."""
    directory = Path(directory)
    if not (directory / CHECKPOINT_META).is_file():
        hint = ""
        if (directory / "manifest.json").is_file():
            provenance = json.loads((directory / "manifest.json").read_text()).get("provenance") or {}
            hint = ("; it is an ONNX bundle: pass the checkpoint it was exported from"
                    + (f" ({provenance['checkpoint']})" if provenance.get("checkpoint") else ""))
        raise ValueError(f"{directory}: not an early-exit checkpoint (no {CHECKPOINT_META}); the teacher "
                         f"must be a folder written by `offramp train fastbert --checkpoint DIR`{hint}")
    teacher, meta = EarlyExitModel.load(directory)
    teacher.requires_grad_(False)
    return teacher.eval(), meta


def find_tokenizer(teacher_dir: Path, explicit: Path | None = None) -> Path:
    """--tokenizer (a tokenizer.json or a folder with one), else the teacher folder's."""
    teacher_dir = Path(teacher_dir)
    if explicit is not None:
        explicit = Path(explicit)
        candidates = [explicit / "tokenizer.json" if explicit.is_dir() else explicit]
    else:
        candidates = [teacher_dir / "tokenizer.json", teacher_dir / "tokenizer" / "tokenizer.json"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ValueError(f"no tokenizer.json at {', '.join(map(str, candidates))}: pass --tokenizer "
                     f"(the teacher's tokenizer.json, e.g. the one in a bundle exported from it)")


class TeacherCache:
    """The frozen teacher's outputs over one dataset, computed once, looked up by Batch.index:
    logits [rows, classes]; optionally the [CLS] states of `cls_layers` (1-based)
    [rows, layers, width]; optionally every token's state at `token_layer`, kept in fp16 when
    they fit `budget_mb` (token_states() then gives None and the caller recomputes)."""

    def __init__(self, teacher: EarlyExitModel, dataset: EncodedDataset, cls_layers: Sequence[int] = (),
                 token_layer: int | None = None, budget_mb: float = 0, batch_size: int = 64):
        width = teacher.config.hidden_size
        device = next(teacher.parameters()).device  # small tables live there; token states on the CPU
        lengths = np.array([len(ids) for ids in dataset.ids], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.logits = torch.empty(len(dataset), teacher.num_labels, device=device)
        self.cls = torch.empty(len(dataset), len(cls_layers), width, device=device) if cls_layers else None
        fits = token_layer is not None and int(lengths.sum()) * width * 2 <= budget_mb * 2 ** 20
        self.tokens = torch.empty(int(lengths.sum()), width, dtype=torch.float16) if fits else None
        teacher.eval()
        with torch.no_grad():
            for batch in bar(dataset.batches(batch_size, shuffle=False), desc="teacher outputs",
                             total=dataset.num_batches(batch_size), unit="batch", mininterval=2.0):
                batch = batch.to(device)
                states = teacher.hidden_states(*batch.inputs())
                self.logits[batch.index] = teacher.exit_logits(teacher.num_layers - 1, states[-1],
                                                               batch.attention_mask).float()
                if self.cls is not None:
                    self.cls[batch.index] = torch.stack([states[l - 1][:, 0] for l in cls_layers], 1).float()
                if self.tokens is not None:
                    rows = states[token_layer - 1].to("cpu", torch.float16)
                    for row, r in enumerate(batch.index.tolist()):
                        start, end = self.offsets[r], self.offsets[r + 1]
                        self.tokens[start:end] = rows[row, : end - start]

    def token_states(self, batch: Batch) -> torch.Tensor | None:
        """[rows, t, width] on the batch's device, zeros at padding; None when not kept."""
        if self.tokens is None:
            return None
        out = torch.zeros(*batch.input_ids.shape, self.tokens.size(-1))
        for row, r in enumerate(batch.index.tolist()):
            start, end = self.offsets[r], self.offsets[r + 1]
            out[row, : end - start] = self.tokens[start:end].float()
        return out.to(batch.input_ids.device)
