"""Text -> padded id arrays, with `tokenizers` only. Training uses this same path, so the
served model sees exactly the ids it was trained on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
from tokenizers import Tokenizer

TextInput = Union[str, Sequence[str]]  # a text, or a (text, text_pair)
# A text this many characters a token past max_seq_length is tokenised from its prefix first.
PREFIX_CHARS_PER_TOKEN = 12


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

    @classmethod
    def gather(cls, parts: Sequence[tuple[EncodedBatch, int]]) -> EncodedBatch:
        """One right-padded batch of rows taken from several batches: (batch, row) each."""
        lengths = [int(batch.attention_mask[row].sum()) for batch, row in parts]
        longest, n = max(lengths), len(parts)
        input_ids = np.zeros((n, longest), dtype=np.int64)  # padding is masked: its id is irrelevant
        attention_mask = np.zeros((n, longest), dtype=np.int64)
        token_type_ids = np.zeros((n, longest), dtype=np.int64)
        truncated = np.zeros(n, dtype=bool)
        for i, ((batch, row), length) in enumerate(zip(parts, lengths)):
            input_ids[i, :length] = batch.input_ids[row, :length]
            attention_mask[i, :length] = 1
            token_type_ids[i, :length] = batch.token_type_ids[row, :length]
            truncated[i] = batch.truncated[row]
        return EncodedBatch(input_ids, attention_mask, token_type_ids, truncated)


class TextEncoder:
    def __init__(self, tokenizer: Tokenizer, max_seq_length: int):
        self.max_seq_length = max_seq_length
        self.tokenizer = tokenizer
        # The file may carry its own padding/truncation settings; ours are explicit.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=max_seq_length)
        pad = tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else pad
        # WordPiece splits every word on its own, and a word longer than this is one [UNK]: so
        # the tokens of a prefix, up to a word boundary, are those of the whole text.
        model = tokenizer.model
        self._word_chars = (getattr(model, "max_input_chars_per_word", None)
                            if type(model).__name__ == "WordPiece" else None)
        self._prefix_chars = max_seq_length * PREFIX_CHARS_PER_TOKEN

    @classmethod
    def from_file(cls, path: Path, max_seq_length: int) -> TextEncoder:
        return cls(Tokenizer.from_file(str(path)), max_seq_length)

    def _encode_all(self, items: list) -> list:
        """encode_batch, where a long single text is tokenised from a prefix when that is
        certain to give its tokens (the text is cut to max_seq_length tokens anyway): a text of
        7,700 characters then costs what one of ~1,500 does, and its overflow is never built."""
        cut = self._prefix_chars
        if self._word_chars is None:
            return self.tokenizer.encode_batch(items)
        long_rows = [i for i, x in enumerate(items) if isinstance(x, str) and len(x) > cut + self._word_chars]
        if not long_rows:
            return self.tokenizer.encode_batch(items)
        work = list(items)
        for i in long_rows:
            work[i] = items[i][:cut]
        encodings = self.tokenizer.encode_batch(work)
        redo = [i for i in long_rows if not self._prefix_suffices(encodings[i], cut)]
        for i, encoding in zip(redo, self.tokenizer.encode_batch([items[i] for i in redo]) if redo else []):
            encodings[i] = encoding
        return encodings

    def _prefix_suffices(self, encoding, cut: int) -> bool:
        """The prefix was truncated and its last kept token ends more than a longest word
        before the cut: the word the cut fell in is not among the kept tokens."""
        if not encoding.overflowing:
            return False
        ends = [end for (_, end), seq in zip(encoding.offsets, encoding.sequence_ids) if seq is not None]
        return bool(ends) and ends[-1] < cut - self._word_chars

    def encode(self, inputs: Sequence[TextInput]) -> EncodedBatch:
        items = [x if isinstance(x, str) else tuple(x) for x in inputs]
        encodings = self._encode_all(items)
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
