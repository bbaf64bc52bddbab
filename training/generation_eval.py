"""Decoding a PyTorch student over data, and ROUGE (rouge-score, Google's implementation).

Decoding is app/search.py's (greedy, beam, no_repeat_ngram_size, length limits), the same search
the server runs over the ONNX graphs; here it steps training/seq2seq_model.py's
IncrementalDecoder, with per-token exits when a threshold is given.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from app.search import generate
from training.progress import bar
from training.seq2seq_data import Pair, pad, special_ids
from training.seq2seq_model import IncrementalDecoder, Seq2SeqStudent

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


class TorchStepper:
    """app/search.py's Stepper over the PyTorch model (numpy in, numpy out)."""

    def __init__(self, model: Seq2SeqStudent, input_ids: np.ndarray, attention_mask: np.ndarray):
        self.decoder = IncrementalDecoder(model, torch.from_numpy(input_ids), torch.from_numpy(attention_mask))

    def step(self, tokens: np.ndarray, threshold: np.ndarray):
        log_probs, exit_layer = self.decoder.step(torch.from_numpy(np.asarray(tokens, dtype=np.int64)),
                                                  torch.from_numpy(np.asarray(threshold, dtype=np.float32)))
        return log_probs.numpy(), exit_layer.numpy()

    def reorder(self, rows: np.ndarray) -> None:
        self.decoder.reorder(torch.from_numpy(np.asarray(rows, dtype=np.int64)))


def source_arrays(tokenizer: Tokenizer, texts: list[str], max_source: int) -> tuple[np.ndarray, np.ndarray]:
    specials = special_ids(tokenizer)
    rows = [[specials["bos"], *e.ids[:max_source], specials["eos"]]
            for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    return pad(rows, specials["pad"]), pad([[1] * len(r) for r in rows], 0)


@torch.no_grad()
def decode(model: Seq2SeqStudent, tokenizer: Tokenizer, sources: list[str], *, max_source: int,
           max_new_tokens: int, num_beams: int = 1, no_repeat_ngram_size: int = 0, threshold: float = 0.0,
           batch_size: int = 64, desc: str = "decode") -> tuple[list[str], list[list[int]]]:
    """(texts, exit layers of every generated token) of every source."""
    model.eval()
    specials = special_ids(tokenizer)
    texts, exits = [], []
    for start in bar(range(0, len(sources), batch_size), desc=desc, unit="batch"):
        chunk = sources[start:start + batch_size]
        ids, mask = source_arrays(tokenizer, chunk, max_source)
        rows = len(chunk)
        hypotheses = generate(TorchStepper(model, ids, mask), rows, bos_id=specials["bos"], eos_id=specials["eos"],
                              max_new_tokens=np.full(rows, max_new_tokens, dtype=np.int64),
                              threshold=np.full(rows, threshold, dtype=np.float32), num_beams=num_beams,
                              no_repeat_ngram_size=no_repeat_ngram_size,
                              banned_ids=(specials["pad"], specials["unk"], specials["bos"], specials["mask"]))
        for h in hypotheses:
            texts.append(tokenizer.decode(h.token_ids))
            exits.append(list(h.exit_layers))
    return texts, exits


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 x 100 (rouge-score with its default tokenizer, no stemming, as the
    Gigaword literature reports it)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=False)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references, strict=True):
        for name, score in scorer.score(reference, prediction).items():
            totals[name] += score.fmeasure
    return {name: round(100 * total / max(1, len(predictions)), 2) for name, total in totals.items()}


def references(pairs: list[Pair]) -> list[str]:
    return [p.target for p in pairs]
