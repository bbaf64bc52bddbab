"""One encoder, several tasks, an exit per task after every layer (MT-DNN with FastBERT exits).

The encoder is an EarlyExitModel's (the same layer-by-layer path the export wraps); each task
has its own heads, one per layer, the last its classifier (or regressor: one output, the score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from training.model import INNER_DROPOUT, EarlyExitModel, load_backbone, make_head

MULTITASK_META = "multitask.json"
TASK_HEADS_FILE = "task_heads.pt"


class MultiTaskModel(EarlyExitModel):
    def __init__(self, backbone: nn.Module, tasks: Sequence[tuple[str, int]], exit_head: str = "fastbert",
                 head_width: int = 128, dropout: float = 0.1):
        nn.Module.__init__(self)
        self.backbone = backbone
        self.config = backbone.config
        self.exit_head = self.teacher_head = exit_head
        self.head_width = head_width
        self.tasks = [(name, int(width)) for name, width in tasks]
        self.dropout = nn.Dropout(0.0 if exit_head in INNER_DROPOUT else dropout)
        hidden = self.config.hidden_size
        self.task_heads = nn.ModuleDict({
            name: nn.ModuleList(make_head(exit_head, hidden, width, head_width, dropout) for _ in self.layers)
            for name, width in self.tasks})

    @property
    def task_names(self) -> list[str]:
        return [name for name, _ in self.tasks]

    def task_logits(self, task: str, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Exit `index` (0-based) of `task`: logits [rows, classes], or [rows, 1] scores."""
        return self.task_heads[task][index](self.dropout(hidden), attention_mask)

    def last_head(self, task: str) -> nn.Module:
        return self.task_heads[task][-1]

    def forward(self, input_ids, attention_mask, token_type_ids, task: str | None = None) -> list[torch.Tensor]:
        """Every exit of `task` (default: the first), first layer first."""
        task = task or self.task_names[0]
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return [self.task_logits(task, i, h, attention_mask) for i, h in enumerate(states)]

    def save(self, directory: Path, extra: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        torch.save(self.task_heads.state_dict(), directory / TASK_HEADS_FILE)
        meta = {"tasks": self.tasks, "exit_head": self.exit_head, "head_width": self.head_width, **(extra or {})}
        (directory / MULTITASK_META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> tuple[MultiTaskModel, dict]:
        directory = Path(directory)
        meta = json.loads((directory / MULTITASK_META).read_text())
        model = cls(load_backbone(directory), meta["tasks"], meta["exit_head"], meta["head_width"])
        model.task_heads.load_state_dict(torch.load(directory / TASK_HEADS_FILE, weights_only=True))
        return model.eval(), meta
