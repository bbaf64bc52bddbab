"""A MobileBERT-style bottleneck encoder (Sun et al., 2020), small enough to read in one go.

Every block keeps the inter-block width H (the teacher's width, so its output can be matched to
a teacher layer one to one) and works inside at a narrow intra-block width h:

    x = norm(W_in h_in)                          bottleneck H -> h
    x = norm(x + W_o attention(q=k=x, v=W_v h_in))   attention at width h, values from the input
    x = norm(x + FFN(x))   (num_ffn times)       stacked feed-forward networks at width h
    h_out = norm(h_in + W_out x)                 back to H, residual with the block input

`norm` is NoNorm (elementwise g * x + b, cheaper than LayerNorm) or LayerNorm; the activation
ReLU or GELU. Embeddings: narrow word embeddings, the trigram [e(t+1), e(t), e(t-1)] projected to
H, plus position and token-type embeddings. Differences from the paper's code: one bottleneck
feeds both the queries/keys and the attention residual (the reference has two).

The module has what EarlyExitModel and the ONNX export use: `.embeddings(input_ids=...,
token_type_ids=...)`, `.encoder.layer[i](hidden, additive_mask)`, `.config` with hidden_size,
vocab_size and num_hidden_layers, and save_pretrained / from_pretrained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.model import OwnBackbone

CONFIG_FILE = "mobilebert_config.json"
WEIGHTS_FILE = "mobilebert.safetensors"


@dataclass
class BottleneckConfig:
    vocab_size: int
    hidden_size: int  # inter-block width (= the teacher's)
    intra_size: int  # intra-block (bottleneck) width
    num_hidden_layers: int
    num_attention_heads: int
    num_ffn: int = 4
    ffn_size: int = 512
    embedding_size: int = 128
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    pad_token_id: int = 0
    norm: str = "nonorm"
    activation: str = "relu"
    dropout: float = 0.1
    initializer_range: float = 0.02

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class NoNorm(nn.Module):
    """MobileBERT's replacement for LayerNorm: g * x + b, elementwise (no statistics)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


def make_norm(kind: str, width: int) -> nn.Module:
    if kind == "nonorm":
        return NoNorm(width)
    if kind == "layernorm":
        return nn.LayerNorm(width, eps=1e-12)
    raise ValueError(f"norm must be 'nonorm' or 'layernorm', not {kind!r}")


def make_activation(kind: str) -> nn.Module:
    if kind == "relu":
        return nn.ReLU()
    if kind == "gelu":
        return nn.GELU()
    raise ValueError(f"activation must be 'relu' or 'gelu', not {kind!r}")


class TrigramEmbeddings(nn.Module):
    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size, padding_idx=cfg.pad_token_id)
        self.trigram = nn.Linear(3 * cfg.embedding_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = make_norm(cfg.norm, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        e = self.word_embeddings(input_ids)
        after = F.pad(e[:, 1:], (0, 0, 0, 1))  # e(t+1), zero past the end
        before = F.pad(e[:, :-1], (0, 0, 1, 0))  # e(t-1), zero before the start
        x = self.trigram(torch.cat([after, e, before], dim=-1))
        x = x + self.position_embeddings(self.position_ids[:, : input_ids.size(1)])
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class FeedForward(nn.Module):
    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        self.inner = nn.Linear(cfg.intra_size, cfg.ffn_size)
        self.act = make_activation(cfg.activation)
        self.outer = nn.Linear(cfg.ffn_size, cfg.intra_size)
        self.norm = make_norm(cfg.norm, cfg.intra_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(self.outer(self.act(self.inner(x)))))


class BottleneckBlock(nn.Module):
    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        h, heads = cfg.intra_size, cfg.num_attention_heads
        if h % heads:
            raise ValueError(f"intra-block width {h} is not a multiple of {heads} attention heads")
        self.heads, self.head_dim = heads, h // heads
        self.bottleneck = nn.Linear(cfg.hidden_size, h)
        self.bottleneck_norm = make_norm(cfg.norm, h)
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(cfg.hidden_size, h)
        self.attention_out = nn.Linear(h, h)
        self.attention_norm = make_norm(cfg.norm, h)
        self.attention_dropout = nn.Dropout(cfg.dropout)
        self.ffns = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.num_ffn))
        self.expand = nn.Linear(h, cfg.hidden_size)
        self.output_norm = make_norm(cfg.norm, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [rows, t, h] -> [rows, heads, t, dim]
        return x.view(x.size(0), x.size(1), self.heads, self.head_dim).transpose(1, 2)

    def _scores(self, x: torch.Tensor) -> torch.Tensor:
        return self._split(self.query(x)) @ self._split(self.key(x)).transpose(-1, -2) * self.head_dim ** -0.5

    def attention_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-softmax scores [rows, heads, t, t] of this block for input `hidden` (no mask)."""
        return self._scores(self.bottleneck_norm(self.bottleneck(hidden)))

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck_norm(self.bottleneck(hidden))
        probs = self.attention_dropout((self._scores(x) + additive_mask).softmax(-1))
        context = (probs @ self._split(self.value(hidden))).transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(x + self.dropout(self.attention_out(context)))
        for ffn in self.ffns:
            x = ffn(x)
        return self.output_norm(hidden + self.dropout(self.expand(x)))


class _Encoder(nn.Module):
    def __init__(self, cfg: BottleneckConfig):
        super().__init__()
        self.layer = nn.ModuleList(BottleneckBlock(cfg) for _ in range(cfg.num_hidden_layers))


class MobileBertBackbone(OwnBackbone):
    backbone_kind = "mobilebert"
    config_class = BottleneckConfig
    config_file = CONFIG_FILE
    weights_file = WEIGHTS_FILE

    def __init__(self, config: BottleneckConfig):
        super().__init__()
        self.config = config
        self.embeddings = TrigramEmbeddings(config)
        self.encoder = _Encoder(config)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:  # as BERT: N(0, 0.02), zero biases
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
