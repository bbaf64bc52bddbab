"""Decoding over a stepper: greedy and beam search, as Hugging Face `generate` does them.

The search knows nothing of the model: a Stepper takes one token per live hypothesis and gives
back log-probabilities over the vocabulary (and the decoder layer each token left at). The ONNX
engine (app/generation.py) and the PyTorch reference (training/generation_eval.py TorchStepper)
are both steppers, so the server and training-time ROUGE decode through this one search.

Finished rows and beams are dropped from the stepper (`reorder`): a row that is done costs no
more compute, and the stepper's batch shrinks as rows end.

Scores and stopping are those of HF's (v4.50+) vectorised beam search with early_stopping=False:
a hypothesis scores the sum of its tokens' log-probabilities over length ** length_penalty, length
= the tokens it generated, eos included; only the top num_beams candidates of a step may end there;
a row stops once it has num_beams finished hypotheses and its best live beam, scored at its
current length, would not beat the worst of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

NEG_INF = np.float32(-np.inf)


class Stepper(Protocol):
    def step(self, tokens: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """tokens int64 [n], threshold float32 [n] -> (log_probs float32 [n, vocab], exit_layer int64 [n])."""

    # Optional: step_top(tokens, threshold, k) -> (top_log_probs float32 [n, k], top_ids int64 [n, k],
    # exit_layer int64 [n]), each row's k best tokens, best first, ties by lower id: a stepper that
    # can select them where it computes them (the ONNX engine: a TopK node after the projection)
    # spares the search a scan of the whole vocabulary per hypothesis.

    def reorder(self, rows: np.ndarray) -> None:
        """Keep (and repeat) the stepper's rows `rows`, int64 indices into its current batch."""


@dataclass
class Hypothesis:
    token_ids: list[int] = field(default_factory=list)  # neither bos nor eos
    exit_layers: list[int] = field(default_factory=list)  # one per decoding step, eos's included
    score: float = 0.0


@dataclass
class _Beam:
    row: int  # the source row it decodes
    token_ids: list[int]
    exit_layers: list[int]
    log_prob: float  # sum over its tokens


def _normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return float(log_prob) / float(length) ** length_penalty


def _banned_ngram_tokens(tokens: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already in `tokens` (HF NoRepeatNGramLogitsProcessor)."""
    if n <= 0 or len(tokens) + 1 < n:
        return []
    prefix = tuple(tokens[len(tokens) - n + 1:]) if n > 1 else ()
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tuple(tokens[i:i + n - 1]) == prefix]


def top_candidates(log_probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k largest log-probs and their ids, best first, ties by lower id (ONNX TopK's
    order, and what an argmax over the whole row picks first)."""
    rows, vocab = log_probs.shape
    k = min(k, vocab)
    ids = np.argpartition(-log_probs, k - 1, axis=1)[:, :k] if k < vocab else np.broadcast_to(np.arange(vocab), (rows, vocab))
    values = np.take_along_axis(log_probs, ids, axis=1)
    order = np.lexsort((ids, -values), axis=1)
    ids, values = np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)
    if k < vocab:  # a tie across the k-th place: argpartition kept any of the tied ids, not the lowest
        last = values[:, -1:]
        straddle = np.flatnonzero((log_probs == last).sum(axis=1) > (values == last).sum(axis=1))
        for r in straddle:
            best = np.argsort(-log_probs[r], kind="stable")[:k]
            ids[r], values[r] = best, log_probs[r, best]
    return values.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)


class _Candidates:
    """Each live hypothesis' best tokens this step, with what the search forbids masked to -inf."""

    def __init__(self, stepper: Stepper, tokens, threshold, beams: list[_Beam], need: int, *, eos_id: int,
                 banned: np.ndarray, min_new_tokens: int, no_repeat_ngram_size: int):
        ngram_bans = [_banned_ngram_tokens(b.token_ids, no_repeat_ngram_size) if no_repeat_ngram_size else []
                      for b in beams]
        # Enough that, with every forbidden token among the best, `need` allowed ones are left.
        k = need + banned.size + 1 + max((len(b) for b in ngram_bans), default=0)
        if hasattr(stepper, "step_top"):
            values, ids, self.exit_layer = stepper.step_top(tokens, threshold, k)
        else:
            log_probs, self.exit_layer = stepper.step(tokens, threshold)
            values, ids = top_candidates(log_probs, k)
        values = np.array(values, dtype=np.float32, copy=True)
        if banned.size:
            values[np.isin(ids, banned)] = NEG_INF
        for i, beam in enumerate(beams):
            if len(beam.token_ids) < min_new_tokens:
                values[i, ids[i] == eos_id] = NEG_INF
            if ngram_bans[i]:
                values[i, np.isin(ids[i], ngram_bans[i])] = NEG_INF
        self.values, self.ids = values, ids


def generate(stepper: Stepper, rows: int, *, bos_id: int, eos_id: int, max_new_tokens: np.ndarray,
             threshold: np.ndarray, num_beams: int = 1, no_repeat_ngram_size: int = 0,
             length_penalty: float = 1.0, min_new_tokens: int = 1,
             banned_ids: Sequence[int] = ()) -> list[Hypothesis]:
    """The best hypothesis of each of the stepper's `rows` rows (greedy when num_beams == 1).

    max_new_tokens and threshold are per row; a row ends at eos or after max_new_tokens tokens
    (then without eos). banned_ids are never generated, eos not before min_new_tokens."""
    max_new_tokens = np.broadcast_to(np.asarray(max_new_tokens, dtype=np.int64), (rows,))
    threshold = np.broadcast_to(np.asarray(threshold, dtype=np.float32), (rows,))
    options = dict(eos_id=eos_id, banned=np.unique(np.asarray(list(banned_ids), dtype=np.int64)),
                   min_new_tokens=min_new_tokens, no_repeat_ngram_size=no_repeat_ngram_size)
    if num_beams < 1:
        raise ValueError(f"num_beams must be at least 1, not {num_beams}")
    search = _greedy if num_beams == 1 else _beam_search
    return search(stepper, rows, bos_id, max_new_tokens, threshold, num_beams, length_penalty, options)


def _drop(stepper: Stepper, keep: np.ndarray, current: int) -> None:
    if keep.size != current or (keep != np.arange(current)).any():
        stepper.reorder(keep.astype(np.int64))


def _greedy(stepper, rows, bos_id, max_new_tokens, threshold, num_beams, length_penalty, options):
    out = [Hypothesis() for _ in range(rows)]
    live = [_Beam(r, [], [], 0.0) for r in range(rows)]
    keep = np.array([i for i, b in enumerate(live) if max_new_tokens[b.row] > 0], dtype=np.int64)
    if keep.size == 0:
        return out
    _drop(stepper, keep, len(live))
    live = [live[i] for i in keep]
    tokens = np.full(len(live), bos_id, dtype=np.int64)
    while live:
        found = _Candidates(stepper, tokens, threshold[[b.row for b in live]], live, 1, **options)
        best = found.values.argmax(axis=1)  # the first of equal values: the lowest id
        chosen = found.ids[np.arange(len(live)), best]
        going = []
        for i, beam in enumerate(live):
            token = int(chosen[i])
            beam.exit_layers.append(int(found.exit_layer[i]))
            beam.log_prob += float(found.values[i, best[i]])
            if token != options["eos_id"]:
                beam.token_ids.append(token)
            if token == options["eos_id"] or len(beam.token_ids) >= max_new_tokens[beam.row]:
                out[beam.row] = Hypothesis(beam.token_ids, beam.exit_layers,
                                           _normalised(beam.log_prob, len(beam.exit_layers), length_penalty))
            else:
                going.append(i)
        if not going:
            break
        keep = np.asarray(going, dtype=np.int64)
        _drop(stepper, keep, len(live))
        live = [live[i] for i in keep]
        tokens = chosen[keep].astype(np.int64)
    return out


class _Finished:
    """A row's best `size` finished hypotheses (HF BeamHypotheses)."""

    def __init__(self, size: int):
        self.size, self.hypotheses = size, []

    def add(self, hypothesis: Hypothesis) -> None:
        self.hypotheses.append(hypothesis)
        # stable: of equal scores the first found stays first
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.size:]

    def done(self, best_live_log_prob: float, length: int, length_penalty: float) -> bool:
        """HF's early_stopping=False heuristic: full, and the best live beam, were it to end at
        its current length, would not beat the worst kept."""
        if len(self.hypotheses) < self.size:
            return False
        return self.hypotheses[-1].score >= _normalised(best_live_log_prob, length, length_penalty)


def _beam_search(stepper, rows, bos_id, max_new_tokens, threshold, num_beams, length_penalty, options):
    eos_id = options["eos_id"]
    finished = [_Finished(num_beams) for _ in range(rows)]
    # The first step runs one beam per row: HF's copies 2..num_beams start at -1e9, so every one
    # of its first candidates comes from beam 1 anyway.
    live = [_Beam(r, [], [], 0.0) for r in range(rows) if max_new_tokens[r] > 0]
    _drop(stepper, np.array([b.row for b in live], dtype=np.int64), rows)
    tokens = np.full(len(live), bos_id, dtype=np.int64)
    while live:
        found = _Candidates(stepper, tokens, threshold[[b.row for b in live]], live, 2 * num_beams, **options)
        exit_layer, per_beam = found.exit_layer, found.ids.shape[1]
        sources, next_live, next_tokens = [], [], []
        start = 0
        while start < len(live):  # the beams of one row are contiguous
            row = live[start].row
            end = start
            while end < len(live) and live[end].row == row:
                end += 1
            totals = (np.array([b.log_prob for b in live[start:end]], dtype=np.float32)[:, None]
                      + found.values[start:end]).ravel()
            # HF's order over the row's beams x vocabulary: best first, ties by beam, then token id.
            beam_of, token_of = np.repeat(np.arange(end - start), per_beam), found.ids[start:end].ravel()
            top = np.lexsort((token_of, beam_of, -totals))[:min(2 * num_beams, totals.size)]
            length = len(live[start].exit_layers) + 1  # after this step, the same for the row's beams
            last = length >= max_new_tokens[row]  # every candidate ends here, with eos or without
            kept = []
            for rank, index in enumerate(top):
                total = float(totals[index])
                if total == -np.inf:
                    break
                source = start + int(index) // per_beam
                beam, token = live[source], int(token_of[index])
                layers = [*beam.exit_layers, int(exit_layer[source])]
                if token == eos_id or last:
                    if rank < num_beams:  # HF: a candidate below the top num_beams does not end
                        ids = beam.token_ids if token == eos_id else [*beam.token_ids, token]
                        finished[row].add(Hypothesis(list(ids), layers, _normalised(total, length, length_penalty)))
                    continue
                kept.append((source, _Beam(row, [*beam.token_ids, token], layers, total), token))
                if len(kept) == num_beams:
                    break
            if kept and not finished[row].done(kept[0][1].log_prob, length, length_penalty):
                for source, beam, token in kept:
                    sources.append(source)
                    next_live.append(beam)
                    next_tokens.append(token)
            start = end
        if not next_live:
            break
        _drop(stepper, np.asarray(sources, dtype=np.int64), len(live))
        live, tokens = next_live, np.asarray(next_tokens, dtype=np.int64)
    return [f.hypotheses[0] if f.hypotheses else Hypothesis() for f in finished]
