"""app/search.py over hand-made steppers whose log-probs are a fixed function of (row, prefix)."""

from __future__ import annotations

import numpy as np
import pytest

from app.search import Hypothesis, _beam_search, generate, top_candidates

BOS, EOS, PAD = 1, 2, 0
VOCAB = 12


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max()
    return (x - np.log(np.exp(x).sum())).astype(np.float32)


def table_log_probs(source: int, prefix: tuple[int, ...], eos_bias: float = 0.0) -> np.ndarray:
    """Deterministic random log-probs of the next token after `prefix` (bos first) of row `source`."""
    logits = np.random.default_rng([source, *prefix]).normal(size=VOCAB) * 2
    logits[EOS] += eos_bias
    return log_softmax(logits)


class TableStepper:
    """A Stepper whose rows are sources; records the batch size of every step."""

    def __init__(self, sources, function=table_log_probs):
        self.sources, self.prefixes, self.function = list(sources), [[] for _ in sources], function
        self.sizes: list[int] = []

    def step(self, tokens, threshold):
        assert tokens.dtype == np.int64 and threshold.dtype == np.float32 and len(tokens) == len(self.sources)
        self.sizes.append(len(tokens))
        out = []
        for i, token in enumerate(tokens):
            self.prefixes[i].append(int(token))
            out.append(self.function(self.sources[i], tuple(self.prefixes[i])))
        # The exit layer tells which threshold reached the row: it must follow the row through reorders.
        return np.stack(out), np.array([1 + int(round(t * 10)) for t in threshold], dtype=np.int64)

    def reorder(self, rows):
        assert rows.dtype == np.int64
        self.sources = [self.sources[r] for r in rows]
        self.prefixes = [list(self.prefixes[r]) for r in rows]


def reference_greedy(source, max_new, banned=(), min_new=1, eos_bias=0.0):
    tokens, total = [], 0.0
    while True:
        lp = table_log_probs(source, (BOS, *tokens), eos_bias).copy()
        lp[list(banned)] = -np.inf
        if len(tokens) < min_new:
            lp[EOS] = -np.inf
        token = int(lp.argmax())
        total += float(lp[token])
        if token == EOS:
            return tokens, total
        tokens.append(token)
        if len(tokens) == max_new:
            return tokens, total


def run(sources, num_beams=1, max_new=6, threshold=0.0, function=table_log_probs, **kw):
    rows = len(sources)
    stepper = TableStepper(sources, function)
    out = generate(stepper, rows, bos_id=BOS, eos_id=EOS,
                   max_new_tokens=np.broadcast_to(np.asarray(max_new, dtype=np.int64), (rows,)).copy(),
                   threshold=np.broadcast_to(np.asarray(threshold, dtype=np.float32), (rows,)).copy(),
                   num_beams=num_beams, **kw)
    return out, stepper


def eos_biased(bias):
    return lambda source, prefix: table_log_probs(source, prefix, bias)


def test_top_candidates_are_the_best_in_order_with_ties_by_lower_id():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 40)).astype(np.float32)
    scores[1, [3, 9, 17, 30]] = 5.0  # a tie across the k-th place: the lowest ids are kept
    scores[2, :] = 0.0
    scores[3, [4, 8]] = -np.inf
    for k in (1, 3, 40, 50):
        values, ids = top_candidates(scores, k)
        order = np.lexsort((np.broadcast_to(np.arange(40), scores.shape), -scores), axis=1)[:, :min(k, 40)]
        np.testing.assert_array_equal(ids, order)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, order, axis=1))
    assert list(top_candidates(scores, 3)[1][1]) == [3, 9, 17] and list(top_candidates(scores, 2)[1][2]) == [0, 1]


def test_greedy_matches_a_hand_written_greedy():
    sources = list(range(8))
    out, _ = run(sources, max_new=7, banned_ids=(PAD, BOS), function=eos_biased(2.0))
    for source, hypothesis in zip(sources, out):
        tokens, total = reference_greedy(source, 7, banned=(PAD, BOS), eos_bias=2.0)
        assert hypothesis.token_ids == tokens
        ended_by_eos = len(tokens) < 7
        assert len(hypothesis.exit_layers) == len(tokens) + ended_by_eos
        assert hypothesis.score == pytest.approx(total / len(hypothesis.exit_layers), rel=1e-5)
    assert any(len(h.token_ids) < 7 for h in out) and any(len(h.token_ids) == 7 for h in out)


def test_banned_ids_are_never_generated_and_eos_waits_for_min_new_tokens():
    out, _ = run(range(10), max_new=8, banned_ids=(PAD, BOS, 5, 7), min_new_tokens=3, function=eos_biased(4.0))
    for h in out:
        assert not {PAD, BOS, EOS, 5, 7} & set(h.token_ids)
        assert len(h.token_ids) >= 3
    beams, _ = run(range(10), num_beams=3, max_new=8, banned_ids=(PAD, BOS, 5, 7), min_new_tokens=3,
                   function=eos_biased(4.0))
    assert all(len(h.token_ids) >= 3 and not {PAD, BOS, EOS, 5, 7} & set(h.token_ids) for h in beams)


def test_max_new_tokens_per_row_and_finished_rows_leave_the_stepper():
    never_eos = eos_biased(-100.0)
    maxima = np.array([1, 4, 2, 6], dtype=np.int64)
    out, stepper = run(range(4), max_new=maxima, function=never_eos)
    assert [len(h.token_ids) for h in out] == list(maxima)
    assert [len(h.exit_layers) for h in out] == list(maxima)
    assert stepper.sizes == [4, 3, 2, 2, 1, 1]  # rows stop costing steps once they are done
    out, stepper = run(range(4), num_beams=2, max_new=maxima, function=never_eos)
    assert [len(h.token_ids) for h in out] == list(maxima)
    assert stepper.sizes[0] == 4 and stepper.sizes[-1] == 2  # the last row's two beams


def test_threshold_follows_its_row_through_reorders():
    thresholds = np.array([0.0, 0.3, 0.5, 0.9], dtype=np.float32)
    for beams in (1, 3):
        out, _ = run(range(4), num_beams=beams, max_new=np.array([2, 5, 3, 4]), threshold=thresholds,
                     function=eos_biased(-100.0))
        for t, h in zip(thresholds, out):
            assert set(h.exit_layers) == {1 + int(round(t * 10))}


def test_beam_search_of_one_beam_is_greedy():
    for bias in (0.0, 2.0, 4.0):
        for lp in (1.0, 0.0, 2.0):
            greedy, _ = run(range(12), max_new=6, function=eos_biased(bias), length_penalty=lp)
            stepper = TableStepper(range(12), eos_biased(bias))
            beam = _beam_search(stepper, 12, BOS, np.full(12, 6), np.zeros(12, np.float32), 1, lp,
                                dict(eos_id=EOS, banned=np.array([], np.int64), min_new_tokens=1,
                                     no_repeat_ngram_size=0))
            assert [h.token_ids for h in beam] == [h.token_ids for h in greedy]
            assert [h.exit_layers for h in beam] == [h.exit_layers for h in greedy]
            assert [h.score for h in beam] == pytest.approx([h.score for h in greedy], rel=1e-5)


def crafted(source, prefix):
    """Greedy takes 3 (0.55) then faces a flat distribution; 4 (0.45) is followed by a sure eos."""
    p = np.full(VOCAB, 1e-6)
    if prefix == (BOS,):
        p[3], p[4] = 0.55, 0.45
    elif prefix[-1] == 4:
        p[EOS] = 1.0
    else:
        p[3:] = 1.0
    return np.log(p / p.sum()).astype(np.float32)


def test_beam_search_finds_what_greedy_misses():
    greedy, _ = run([0], max_new=3, function=crafted, min_new_tokens=1)
    beam, _ = run([0], num_beams=2, max_new=3, function=crafted, min_new_tokens=1)
    assert greedy[0].token_ids[0] == 3 and beam[0].token_ids == [4]
    assert beam[0].score > greedy[0].score
    assert beam[0].exit_layers == [1, 1]  # the token and its eos


def test_beam_hypotheses_are_real_paths_with_their_scores():
    out, _ = run(range(6), num_beams=4, max_new=6, function=eos_biased(1.5), length_penalty=1.3)
    for source, h in enumerate(out):
        total, prefix = 0.0, (BOS,)
        for token in h.token_ids:
            total += float(table_log_probs(source, prefix, 1.5)[token])
            prefix += (token,)
        if len(h.exit_layers) > len(h.token_ids):
            total += float(table_log_probs(source, prefix, 1.5)[EOS])
        assert len(h.exit_layers) == len(h.token_ids) + (len(h.token_ids) < 6)
        assert h.score == pytest.approx(total / len(h.exit_layers) ** 1.3, rel=1e-4)
        greedy, greedy_total = reference_greedy(source, 6, eos_bias=1.5)
        greedy_length = len(greedy) + (len(greedy) < 6)
        assert h.score >= greedy_total / greedy_length ** 1.3 - 1e-5


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def repetitive(source, prefix):
    """Prefers token 5, then 6, then 7...: without the rule the output is 5 5 5 ..."""
    logits = -np.arange(VOCAB, dtype=np.float32)
    logits = np.roll(logits, 5)
    logits[EOS] = -100.0
    return log_softmax(logits + 0.01 * np.random.default_rng([source, *prefix]).normal(size=VOCAB))


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size(num_beams, n):
    plain, _ = run(range(3), num_beams=num_beams, max_new=9, function=repetitive)
    ruled, _ = run(range(3), num_beams=num_beams, max_new=9, function=repetitive, no_repeat_ngram_size=n)
    assert all(h.token_ids[:3] == [5, 5, 5] for h in plain)
    for h in ruled:
        grams = ngrams(h.token_ids, n)
        assert len(grams) == len(set(grams)) and len(h.token_ids) == 9


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_a_row_alone_is_the_row_in_a_batch(num_beams):
    maxima = np.array([3, 7, 5, 6, 2], dtype=np.int64)
    thresholds = np.array([0.0, 0.2, 0.0, 0.7, 0.1], dtype=np.float32)
    kw = dict(function=eos_biased(2.0), no_repeat_ngram_size=2, banned_ids=(PAD,))
    together, _ = run(range(5), num_beams=num_beams, max_new=maxima, threshold=thresholds, **kw)
    for row in range(5):
        (alone,), _ = run([row], num_beams=num_beams, max_new=maxima[row:row + 1], threshold=thresholds[row:row + 1],
                          **kw)
        assert alone == together[row]


def test_rows_without_new_tokens_and_no_rows():
    out, stepper = run(range(3), max_new=np.array([0, 2, 0]))
    assert out[0] == Hypothesis() == out[2] and len(out[1].exit_layers) >= 1
    assert stepper.sizes[0] == 1
    assert run([], max_new=np.zeros(0, np.int64))[0] == []
    assert run([], num_beams=2, max_new=np.zeros(0, np.int64))[0] == []


def test_a_row_stops_once_no_live_beam_can_beat_its_finished_ones():
    out, stepper = run(range(3), num_beams=2, max_new=8, function=eos_biased(8.0))
    assert len(stepper.sizes) == 2 and all(len(h.token_ids) == 1 for h in out)  # eos as soon as allowed
    assert stepper.sizes == [3, 6]  # one beam per row at the first step, then num_beams
