"""A one-layer BiLSTM over word embeddings (Tang et al., 2019), shaped like the encoders
EarlyExitModel runs: `.embeddings(input_ids=..., token_type_ids=...)`, `.encoder.layer[0](hidden,
additive_mask)`, `.config`, save_pretrained / from_pretrained. With the max-pool + ReLU MLP head
(training/model.py, head "maxpool") it exports to the same bundle as every student: one exit.

Padding never changes a row's answer: the forward direction reads a row left to right, so the
padding after it comes last; the backward direction reverses each row within its own length
before its LSTM (a gather, which ONNX has) and back after; the head's max-pool skips padding.

Sentence pairs (`siamese`): the tokenizer writes "A [SEP] B" with token types 0 and 1; the
embeddings carry the token type as one more channel, and the layer runs the same BiLSTM over
A and over B, each moved to the start of the row, and returns both (each with a channel that
marks its own positions) for the siamese head (training/model.py, "siamese").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from training.model import OwnBackbone


@dataclass
class BiLstmConfig:
    vocab_size: int
    embedding_size: int = 300
    lstm_size: int = 150  # per direction: the layer's output is 2 x lstm_size wide
    pad_token_id: int = 0
    num_hidden_layers: int = 1
    siamese: bool = False  # sentence pairs: one BiLSTM over each text

    @property
    def hidden_size(self) -> int:  # the width the exit head reads
        # siamese: both texts' BiLSTM outputs, and a channel marking each one's positions
        return 2 * (2 * self.lstm_size + 1) if self.siamese else 2 * self.lstm_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class WordEmbeddings(nn.Module):
    def __init__(self, cfg: BiLstmConfig):
        super().__init__()
        self.siamese = cfg.siamese
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_size, padding_idx=cfg.pad_token_id)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        vectors = self.word_embeddings(input_ids)
        if not self.siamese:
            return vectors
        segment = (token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)).to(vectors.dtype)
        return torch.cat([vectors, segment[..., None]], dim=-1)


def reverse_within_lengths(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's first lengths[r] steps in reverse order, its padding left where it is."""
    steps = torch.arange(x.size(1), device=x.device)[None, :]
    index = torch.where(steps < lengths[:, None], lengths[:, None] - 1 - steps, steps)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.size(2)))


def shift_left(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Row r moved left by offsets[r] steps (what falls off the end repeats the last step)."""
    steps = torch.arange(x.size(1), device=x.device)[None, :] + offsets[:, None]
    index = steps.clamp(max=x.size(1) - 1)
    return x.gather(1, index[:, :, None].expand(-1, -1, x.size(2)))


class BiLstmLayer(nn.Module):
    def __init__(self, cfg: BiLstmConfig):
        super().__init__()
        self.siamese = cfg.siamese
        self.forward_lstm = nn.LSTM(cfg.embedding_size, cfg.lstm_size, batch_first=True)
        self.backward_lstm = nn.LSTM(cfg.embedding_size, cfg.lstm_size, batch_first=True)

    def bilstm(self, words: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[rows, t, 2 x lstm_size] for rows whose first lengths[r] steps are their words."""
        ahead, _ = self.forward_lstm(words)
        behind, _ = self.backward_lstm(reverse_within_lengths(words, lengths))
        return torch.cat([ahead, reverse_within_lengths(behind, lengths)], dim=-1)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        present = additive_mask[:, 0, 0, :] == 0  # [rows, t]: the mask's 0s are the tokens
        if not self.siamese:
            return self.bilstm(hidden, present.sum(-1))
        words, segment = hidden[..., :-1], hidden[..., -1]
        outputs = []
        for text in (0, 1):  # A, then B (B starts where A and its [SEP] end)
            member = present & (segment == text)
            lengths = member.sum(-1)
            offsets = (present & (segment < text)).sum(-1)
            states = self.bilstm(shift_left(words, offsets), lengths)
            marks = torch.arange(words.size(1), device=words.device)[None, :] < lengths[:, None]
            outputs += [states, marks[..., None].to(states.dtype)]
        return torch.cat(outputs, dim=-1)


class _Encoder(nn.Module):
    def __init__(self, cfg: BiLstmConfig):
        super().__init__()
        self.layer = nn.ModuleList([BiLstmLayer(cfg)])


class BiLstmBackbone(OwnBackbone):
    backbone_kind = "bilstm"
    config_class = BiLstmConfig
    config_file = "bilstm_config.json"
    weights_file = "bilstm.safetensors"

    def __init__(self, config: BiLstmConfig):
        super().__init__()
        self.config = config
        self.embeddings = WordEmbeddings(config)
        self.encoder = _Encoder(config)
