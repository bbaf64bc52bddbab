"""Examples -> token ids -> length-bucketed, dynamically padded torch batches."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from app.encoding import TextEncoder
from training.data import Example


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor  # rows' positions in the dataset (to look up cached teacher outputs)

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.input_ids, self.attention_mask, self.token_type_ids

    def select(self, rows: slice) -> Batch:
        """Some of the rows, padded to the longest of them."""
        mask = self.attention_mask[rows]
        width = max(1, int(mask.sum(1).max()))
        return Batch(self.input_ids[rows, :width], mask[:, :width], self.token_type_ids[rows, :width],
                     None if self.labels is None else self.labels[rows], self.index[rows])

    def to(self, device: torch.device | str) -> Batch:
        """On `device`; `index` stays on the CPU (it looks up cached teacher outputs)."""
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.token_type_ids),
                     move(self.labels), self.index)


def model_input(example: Example):
    return example.text if example.text_pair is None else (example.text, example.text_pair)


class EncodedDataset:
    """A text file's examples tokenised once, with label ids (-1 where unlabelled)."""

    def __init__(self, examples: Sequence[Example], encoder: TextEncoder,
                 labels: list[str] | None = None, chunk: int = 4096):
        self.examples = list(examples)
        self.ids: list[np.ndarray] = []
        self.types: list[np.ndarray] = []
        for start in range(0, len(self.examples), chunk):
            part = [model_input(e) for e in self.examples[start:start + chunk]]
            for encoding in encoder.tokenizer.encode_batch(part):
                self.ids.append(np.asarray(encoding.ids, dtype=np.int64))
                self.types.append(np.asarray(encoding.type_ids, dtype=np.int64))
        self.pad_id = encoder.pad_id
        lookup = {name: i for i, name in enumerate(labels or [])}
        self.labels = np.array(
            [lookup[e.label] if e.label is not None and e.label in lookup else -1 for e in self.examples],
            dtype=np.int64,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, rows: Sequence[int]) -> Batch:
        longest = max(len(self.ids[r]) for r in rows)
        ids = np.full((len(rows), longest), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        types = np.zeros_like(ids)
        for i, r in enumerate(rows):
            n = len(self.ids[r])
            ids[i, :n], mask[i, :n], types[i, :n] = self.ids[r], 1, self.types[r]
        labels = torch.from_numpy(self.labels[list(rows)])
        return Batch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types),
                     labels, torch.as_tensor(rows))

    def batches(self, batch_size: int, shuffle: bool, seed: int = 0) -> Iterator[Batch]:
        """With shuffle, rows of similar length are batched together (less padding, much
        faster on CPU) and the batches come in random order; without, file order."""
        order = list(range(len(self)))
        if shuffle:
            rng = random.Random(seed)
            rng.shuffle(order)
            window = batch_size * 50
            order = [r for s in range(0, len(order), window)
                     for r in sorted(order[s:s + window], key=lambda r: len(self.ids[r]))]
            groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
            rng.shuffle(groups)
        else:
            groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        for group in groups:
            yield self.collate(group)

    def num_batches(self, batch_size: int) -> int:
        return (len(self) + batch_size - 1) // batch_size
