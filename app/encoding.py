"""Text -> padded id arrays, with `tokenizers` only. Training uses this same path, so the
served model sees exactly the ids it was trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from tokenizers import Tokenizer

TextInput = Union[str, Sequence[str]]  # a text, or a (text, text_pair)


@dataclass
class EncodedBatch:
    input_ids: np.ndarray  # int64 [rows, longest row]
    attention_mask: np.ndarray  # int64, 1 for real tokens; padding is always on the right
    token_type_ids: np.ndarray
    truncated: np.ndarray  # bool [rows]: the text was longer than max_seq_length
    # bool [rows]: a text (or one text of a pair) gave no token at all: only characters the
    # tokenizer drops (NUL, zero-width, combining marks, ...). None when not computed.
    empty: np.ndarray | None = None

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)

    def rows(self, index: np.ndarray) -> EncodedBatch:
        """A sub-batch re-padded to its own longest row."""
        longest = int(self.attention_mask[index].sum(axis=1).max())
        return EncodedBatch(
            self.input_ids[index, :longest],
            self.attention_mask[index, :longest],
            self.token_type_ids[index, :longest],
            self.truncated[index],
            None if self.empty is None else self.empty[index],
        )


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, max_seq_length: int):
        self.max_seq_length = max_seq_length
        self.tokenizer = tokenizer
        # The file may carry its own padding/truncation settings; ours are explicit.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad

    @classmethod
    def from_file(cls, path: Path, max_seq_length: int) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_seq_length)

    def encode(self, inputs: Sequence[TextInput]) -> EncodedBatch:
        items = [x if isinstance(x, str) else tuple(x) for x in inputs]
        encodings = self.tokenizer.encode_batch(items)
        longest = max(len(e.ids) for e in encodings)
        rows = len(encodings)
        input_ids = np.full((rows, longest), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((rows, longest), dtype=np.int64)
        token_type_ids = np.zeros((rows, longest), dtype=np.int64)
        truncated = np.zeros(rows, dtype=bool)
        empty = np.zeros(rows, dtype=bool)
        for i, (item, e) in enumerate(zip(items, encodings)):
            n = len(e.ids)
            input_ids[i, :n] = e.ids
            attention_mask[i, :n] = 1
            token_type_ids[i, :n] = e.type_ids
            truncated[i] = bool(e.overflowing)
            present = set(e.sequence_ids)  # None marks special tokens; 0 and 1 the two texts
            empty[i] = 0 not in present or (not isinstance(item, str) and 1 not in present)
        return EncodedBatch(input_ids, attention_mask, token_type_ids, truncated, empty)
