"""An encoder with an exit classifier after every layer (FastBERT).

The backbone is any BERT-family `transformers` model exposing `.embeddings` and
`.encoder.layer` (BERT, RoBERTa, ELECTRA, MiniLM, ...). The model runs layer by layer through
exactly the functions the ONNX export wraps, so training, evaluation and export share one path.
The last layer's head is the teacher classifier; the others are the exits it distils into.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel

EXIT_HEADS = ("fastbert", "pooled", "maxpool", "siamese")
CHECKPOINT_META = "early_exit.json"
HEADS_FILE = "heads.pt"


class OwnBackbone(nn.Module):
    """An encoder of this package's own (not a transformers model): its config as JSON, its
    weights as safetensors, and `backbone_kind` recorded in the checkpoint so that
    EarlyExitModel.load finds the class again."""

    backbone_kind: str
    config_class: type
    config_file: str
    weights_file: str

    def save_pretrained(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.config_file).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / self.weights_file))

    @classmethod
    def from_pretrained(cls, directory: Path):
        from safetensors.torch import load_file

        directory = Path(directory)
        model = cls(cls.config_class(**json.loads((directory / cls.config_file).read_text())))
        model.load_state_dict(load_file(str(directory / cls.weights_file)))
        return model


def masked_mean(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, seq] 1/0 mask -> [rows, 1, 1, seq] additive attention bias."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class FastBertHead(nn.Module):
    """FastBERT's branch: narrow to `width`, self-attention at that width, [CLS], MLP."""

    def __init__(self, hidden_size: int, num_labels: int, width: int = 128, heads: int = 2):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.narrow = nn.Linear(hidden_size, width)
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)
        self.out = nn.Linear(width, num_labels)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [rows, t, width] -> [rows, heads, t, dim]
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.narrow(hidden))
        # Only the [CLS] query is needed: its row of the attention is the whole pooled output.
        q, k, v = self._split(self.query(x[:, :1])), self._split(self.key(x)), self._split(self.value(x))
        scores = q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + additive_mask(attention_mask, x.dtype)
        cls = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.size(0), -1)
        return self.out(torch.tanh(self.dense(cls)))


class PooledHead(nn.Module):
    """Masked mean of the layer's states -> small MLP: no attention, so cheaper."""

    def __init__(self, hidden_size: int, num_labels: int, width: int = 128):
        super().__init__()
        self.dense = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, num_labels)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.dense(masked_mean(hidden, attention_mask))))


def masked_max(hidden: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """The max over the positions where `present` [rows, t] is true; zeros for a row with none
    (the second text of a pair given as one text)."""
    pooled = hidden.masked_fill(~present[..., None], torch.finfo(hidden.dtype).min).max(dim=1).values
    return torch.where(present.any(dim=1, keepdim=True), pooled, torch.zeros_like(pooled))


class MaxPoolHead(nn.Module):
    """Tang et al.'s classifier: the max over the row's own positions, then a ReLU MLP. Dropout
    is its own, on the pooled vector (the model's is off for it: see INNER_DROPOUT)."""

    def __init__(self, hidden_size: int, num_labels: int, width: int = 128, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.dense = nn.Linear(hidden_size, width)
        self.out = nn.Linear(width, num_labels)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.dense(self.dropout(features))))

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classify(masked_max(hidden, attention_mask > 0))


class SiameseHead(MaxPoolHead):
    """Tang et al.'s sentence-pair classifier over a siamese BiLSTM's output (training/bilstm.py:
    [states of A, marks of A, states of B, marks of B]): h1, h2 max-pooled over each text's own
    positions, then [h1, h2, h1 * h2, |h1 - h2|] through the ReLU MLP."""

    def __init__(self, hidden_size: int, num_labels: int, width: int = 128, dropout: float = 0.1):
        self.text_width = hidden_size // 2 - 1
        super().__init__(4 * self.text_width, num_labels, width, dropout)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = self.text_width
        h1 = masked_max(hidden[..., :w], hidden[..., w] > 0.5)
        h2 = masked_max(hidden[..., w + 1:2 * w + 1], hidden[..., 2 * w + 1] > 0.5)
        return self.classify(torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1))


# Heads that apply their own dropout after pooling: their input carries marks a dropout would break.
INNER_DROPOUT = ("maxpool", "siamese")


def make_head(kind: str, hidden_size: int, num_labels: int, width: int, dropout: float = 0.1) -> nn.Module:
    if kind == "fastbert":
        return FastBertHead(hidden_size, num_labels, width)
    if kind == "pooled":
        return PooledHead(hidden_size, num_labels, width)
    if kind == "maxpool":
        return MaxPoolHead(hidden_size, num_labels, width, dropout)
    if kind == "siamese":
        return SiameseHead(hidden_size, num_labels, width, dropout)
    raise ValueError(f"exit head must be one of {EXIT_HEADS}, not {kind!r}")


class EarlyExitModel(nn.Module):
    def __init__(self, backbone: nn.Module, num_labels: int, exit_head: str = "fastbert",
                 head_width: int = 128, dropout: float = 0.1, teacher_head: str | None = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        self.exit_head = exit_head
        self.teacher_head = teacher_head or exit_head
        self.head_width = head_width
        self.num_labels = num_labels
        inner = self.teacher_head in INNER_DROPOUT
        self.dropout = nn.Dropout(0.0 if inner else dropout)
        hidden = self.config.hidden_size
        kinds = [exit_head] * (len(self.layers) - 1) + [self.teacher_head]
        self.heads = nn.ModuleList(make_head(k, hidden, num_labels, head_width, dropout) for k in kinds)

    def replace_exits(self, exit_head: str) -> None:
        """New, untrained exits of another shape below the (kept) teacher classifier."""
        hidden = self.config.hidden_size
        fresh = [make_head(exit_head, hidden, self.num_labels, self.head_width)
                 for _ in range(self.num_layers - 1)]
        self.heads = nn.ModuleList([*fresh, self.heads[-1]])
        self.exit_head = exit_head

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.encoder.layer

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids, attention_mask, token_type_ids) -> torch.Tensor:
        return self.backbone.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def run_layer(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.layers[index](hidden, additive_mask(attention_mask, hidden.dtype))
        return out[0] if isinstance(out, tuple) else out

    def exit_logits(self, index: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.heads[index](self.dropout(hidden), attention_mask)

    def hidden_states(self, input_ids, attention_mask, token_type_ids) -> list[torch.Tensor]:
        """Every layer's output (without the embeddings)."""
        hidden = self.embed(input_ids, attention_mask, token_type_ids)
        states = []
        for index in range(self.num_layers):
            hidden = self.run_layer(index, hidden, attention_mask)
            states.append(hidden)
        return states

    def forward(self, input_ids, attention_mask, token_type_ids) -> list[torch.Tensor]:
        """Logits of every exit, first layer first; the last is the teacher classifier."""
        states = self.hidden_states(input_ids, attention_mask, token_type_ids)
        return [self.exit_logits(i, h, attention_mask) for i, h in enumerate(states)]

    # -- checkpoints: the backbone in `transformers` format, the heads beside it ------------
    def save(self, directory: Path, extra: dict | None = None) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        torch.save(self.heads.state_dict(), directory / HEADS_FILE)
        meta = {"num_labels": self.num_labels, "exit_head": self.exit_head,
                "teacher_head": self.teacher_head, "head_width": self.head_width, **(extra or {})}
        if getattr(self.backbone, "backbone_kind", None):  # not a transformers model (MobileBERT)
            meta["backbone_kind"] = self.backbone.backbone_kind
        (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> tuple[EarlyExitModel, dict]:
        directory = Path(directory)
        meta = json.loads((directory / CHECKPOINT_META).read_text())
        if meta.get("backbone_kind") == "mobilebert":
            from training.mobilebert import MobileBertBackbone

            backbone = MobileBertBackbone.from_pretrained(directory)
        elif meta.get("backbone_kind") == "bilstm":
            from training.bilstm import BiLstmBackbone

            backbone = BiLstmBackbone.from_pretrained(directory)
        else:
            backbone = load_backbone(directory)
        model = cls(backbone, meta["num_labels"], meta["exit_head"],
                    meta["head_width"], teacher_head=meta.get("teacher_head"))
        model.heads.load_state_dict(torch.load(directory / HEADS_FILE, weights_only=True))
        return model.eval(), meta


def load_backbone(name_or_path: str | Path) -> nn.Module:
    """A pretrained encoder from a local folder or a hub id, with eager attention so that the
    layer-by-layer export and the attention-score losses see plain matmul + softmax."""
    try:
        backbone = AutoModel.from_pretrained(str(name_or_path), attn_implementation="eager",
                                             add_pooling_layer=False)
    except TypeError:  # encoders without a pooler (ELECTRA, ...) do not take the argument
        backbone = AutoModel.from_pretrained(str(name_or_path), attn_implementation="eager")
    if not hasattr(backbone, "embeddings") or not hasattr(getattr(backbone, "encoder", None), "layer"):
        raise ValueError(f"{name_or_path}: not a BERT-family encoder (needs embeddings + encoder.layer)")
    return backbone


def backbone_from_config(**config) -> nn.Module:
    """A randomly initialised BERT (tests and students)."""
    cfg = AutoConfig.for_model("bert", attn_implementation="eager", **config)
    return AutoModel.from_config(cfg, add_pooling_layer=False)
