"""The C-MLM student: a small pre-LN Transformer encoder-decoder with an exit after every decoder
layer (CALM, Schuster et al. 2022).

Every exit shares the output projection (tied to the embeddings) behind its own LayerNorm; the
last layer's LayerNorm is the decoder's final one. Each exit also has a one-unit classifier on
its normalised state that says how likely the exit's token is the last layer's (CALM's
"classifier" confidence): it costs one dot product, where a softmax over the vocabulary would
cost more than a layer. The decoder runs one position at a time with a self-attention key/value
cache (`step`), the way the ONNX graphs (training/export_generation.py) run it.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

CONFIG_NAME = "seq2seq.json"
WEIGHTS_NAME = "seq2seq.pt"


@dataclass
class Seq2SeqConfig:
    vocab_size: int
    d_model: int = 256
    num_heads: int = 4
    ffn_size: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 6
    max_source_length: int = 64
    max_target_length: int = 32
    dropout: float = 0.1
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


def sinusoids(length: int, dim: int) -> torch.Tensor:
    position = torch.arange(length, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate)
    return table


class Attention(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.k = nn.Linear(cfg.d_model, cfg.d_model)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [rows, T, d] -> [rows, heads, T, head_dim]
        return x.view(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(x)), self.split(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        if bias is not None:
            scores = scores + bias
        weights = F.dropout(torch.softmax(scores, dim=-1), self.dropout, self.training)
        mixed = (weights @ v).transpose(1, 2)
        return self.out(mixed.reshape(mixed.shape[0], mixed.shape[1], -1))


def padding_bias(mask: torch.Tensor) -> torch.Tensor:
    """[rows, S] 1/0 mask -> additive bias [rows, 1, 1, S] (a large negative, not -inf: a fully
    masked row stays finite)."""
    return (1.0 - mask[:, None, None, :].to(torch.float32)) * -1e9


class EncoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attention = Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_size), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_size, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q = self.attention.split(self.attention.q(h))
        k, v = self.attention.keys_values(h)
        x = x + self.dropout(self.attention.attend(q, k, v, bias))
        return x + self.dropout(self.ffn(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.self_attention, self.cross_attention = Attention(cfg), Attention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.d_model, cfg.ffn_size), nn.GELU(), nn.Dropout(cfg.dropout),
                                 nn.Linear(cfg.ffn_size, cfg.d_model))
        self.dropout = nn.Dropout(cfg.dropout)

    def self_keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's self-attention entries for states x [rows, T, d] (also used to fill the
        cache of a layer a token skipped, from the state it left with)."""
        return self.self_attention.keys_values(self.norm1(x))

    def forward(self, x, past_key, past_value, cross_key, cross_value, self_bias, cross_bias):
        """x [rows, T, d] new positions; past_* [rows, heads, t, head_dim] (t may be 0).
        Returns (x_out, key, value) with key/value the full cache [rows, heads, t+T, head_dim]."""
        h = self.norm1(x)
        q = self.self_attention.split(self.self_attention.q(h))
        k, v = self.self_attention.keys_values(h)
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        x = x + self.dropout(self.self_attention.attend(q, key, value, self_bias))
        q = self.cross_attention.split(self.cross_attention.q(self.norm2(x)))
        x = x + self.dropout(self.cross_attention.attend(q, cross_key, cross_value, cross_bias))
        return x + self.dropout(self.ffn(self.norm3(x))), key, value


class Seq2SeqStudent(nn.Module):
    def __init__(self, cfg: Seq2SeqConfig):
        super().__init__()
        self.config = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_id)
        nn.init.normal_(self.embedding.weight, std=cfg.d_model ** -0.5)
        self.register_buffer("positions", sinusoids(max(cfg.max_source_length, cfg.max_target_length) + 1,
                                                    cfg.d_model), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        self.encoder_norm = nn.LayerNorm(cfg.d_model)
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        # exit_norms[-1] is the decoder's final LayerNorm; the others are trained afterwards
        # (training/methods/cmlm.py train_exits), the rest of the network frozen.
        self.exit_norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(cfg.decoder_layers))
        self.exit_confidence = nn.ModuleList(nn.Linear(cfg.d_model, 1) for _ in range(cfg.decoder_layers))
        self.dropout = nn.Dropout(cfg.dropout)

    # ---- pieces the ONNX graphs are made of -------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids) * math.sqrt(self.config.d_model) + self.positions[positions]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand_as(input_ids)
        x = self.dropout(self.embed(input_ids, positions))
        bias = padding_bias(attention_mask)
        for layer in self.encoder_layers:
            x = layer(x, bias)
        return self.encoder_norm(x)

    def cross_keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every decoder layer's cross-attention keys and values [layers, rows, heads, S, head_dim],
        computed once per source."""
        pairs = [layer.cross_attention.keys_values(memory) for layer in self.decoder_layers]
        return torch.stack([k for k, _ in pairs]), torch.stack([v for _, v in pairs])

    def project(self, exit_hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary of an exit's normalised state (tied to the embeddings)."""
        return exit_hidden @ self.embedding.weight.t()

    def exit_state(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised state, uncertainty) of exit `layer` (0-based); uncertainty = 1 - the
        classifier's probability that this exit's token is the last layer's."""
        normed = self.exit_norms[layer](hidden)
        confidence = torch.sigmoid(self.exit_confidence[layer](normed)).squeeze(-1)
        return normed, 1.0 - confidence

    # ---- teacher forcing (training) ----------------------------------------------------------
    def decoder_states(self, memory, source_mask, decoder_input) -> list[torch.Tensor]:
        """The hidden state after every decoder layer, [rows, T, d] each, for the whole target
        at once under a causal mask."""
        rows, length = decoder_input.shape
        positions = torch.arange(length, device=decoder_input.device)[None, :].expand(rows, -1)
        x = self.dropout(self.embed(decoder_input, positions))
        causal = torch.full((length, length), -1e9, device=x.device).triu(1)[None, None]
        cross_key, cross_value = self.cross_keys_values(memory)
        cross_bias = padding_bias(source_mask)
        empty = x.new_zeros(rows, self.config.num_heads, 0, self.config.head_dim)
        states = []
        for i, layer in enumerate(self.decoder_layers):
            x, _, _ = layer(x, empty, empty, cross_key[i], cross_value[i], causal, cross_bias)
            states.append(x)
        return states

    def forward(self, input_ids, attention_mask, decoder_input) -> torch.Tensor:
        """Last-layer logits [rows, T, vocab] under teacher forcing."""
        memory = self.encode(input_ids, attention_mask)
        last = self.decoder_states(memory, attention_mask, decoder_input)[-1]
        return self.project(self.exit_norms[-1](last))

    # ---- saving ------------------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        torch.save(self.state_dict(), folder / WEIGHTS_NAME)

    @classmethod
    def load(cls, folder: Path) -> Seq2SeqStudent:
        folder = Path(folder)
        model = cls(Seq2SeqConfig(**json.loads((folder / CONFIG_NAME).read_text())))
        model.load_state_dict(torch.load(folder / WEIGHTS_NAME, map_location="cpu", weights_only=True))
        return model.eval()


class IncrementalDecoder:
    """PyTorch decoding one position at a time with per-token exits, the reference the ONNX engine
    is verified against (and the decoder of training-time evaluation at threshold 0).

    A token leaves after layer i < L when that exit's uncertainty is below `threshold` (one per
    row); the layers it skipped get cache entries computed from the state it left with."""

    def __init__(self, model: Seq2SeqStudent, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.model, cfg = model, model.config
        # The model may be on a GPU (training leaves it there) and its callers on the CPU (numpy
        # steppers): work on the model's device, answer on the inputs'.
        self.device, self.caller_device = model.embedding.weight.device, input_ids.device
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        with torch.no_grad():
            memory = model.encode(input_ids, attention_mask)
            self.cross_key, self.cross_value = model.cross_keys_values(memory)
        self.cross_bias = padding_bias(attention_mask)
        rows = input_ids.shape[0]
        empty = memory.new_zeros(rows, cfg.num_heads, 0, cfg.head_dim)
        self.keys = [empty] * cfg.decoder_layers
        self.values = [empty] * cfg.decoder_layers
        self.length = 0

    def reorder(self, rows: torch.Tensor) -> None:
        """Keep cache rows `rows` (beam search picks which hypotheses go on)."""
        rows = rows.to(self.device)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.cross_key, self.cross_value = self.cross_key[:, rows], self.cross_value[:, rows]
        self.cross_bias = self.cross_bias[rows]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [rows] at position self.length -> (log_probs [rows, vocab], exit_layer [rows], 1-based)."""
        model, layers, device = self.model, len(self.model.decoder_layers), self.device
        tokens, threshold = tokens.to(device), threshold.to(device)
        rows = tokens.shape[0]
        positions = torch.full((rows,), self.length, dtype=torch.long, device=device)
        x = model.embed(tokens, positions)[:, None, :]
        exit_layer = torch.full((rows,), layers, dtype=torch.long, device=device)
        exit_hidden = x.new_zeros(rows, model.config.d_model)
        going = torch.ones(rows, dtype=torch.bool, device=device)
        for i, layer in enumerate(model.decoder_layers):
            out, key, value = layer(x, self.keys[i], self.values[i], self.cross_key[i], self.cross_value[i],
                                    None, self.cross_bias)
            if not going.all():  # the rows that left earlier: their entries from the state they left with
                k, v = layer.self_keys_values(x[~going])
                key[~going, :, -1:], value[~going, :, -1:] = k, v
            self.keys[i], self.values[i] = key, value
            x = torch.where(going[:, None, None], out, x)
            normed, uncertainty = model.exit_state(i, x[:, 0])
            leave = going & ((uncertainty < threshold) if i < layers - 1 else torch.ones_like(going))
            exit_hidden[leave] = normed[leave]
            exit_layer[leave] = i + 1
            going &= ~leave
        self.length += 1
        log_probs = torch.log_softmax(model.project(exit_hidden), dim=-1)
        return log_probs.to(self.caller_device), exit_layer.to(self.caller_device)
