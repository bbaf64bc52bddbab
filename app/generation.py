"""Serving a generation bundle: sources in, generated texts out, with per-token early exit in the
decoder (CALM, Schuster et al. 2022) on ONNX Runtime. numpy and onnxruntime only.

Every decoding step embeds the new tokens and runs decoder layer 1, 2, ...; after layer i < L the
rows whose exit is sure enough (exit_uncertainty < their threshold) leave. Once few enough rows
still go (COMPACT_BELOW), only they run the next layers, on a compacted batch: that is where the
time goes down. A row that left gets the cache entries of the layers it skipped from the state it left with
(decoder_kv_NN, CALM's state propagation), batched over those rows; the output projection runs
once per row, on the exit it left at. The search (greedy, beams) is app/search.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence
import time

import numpy as np
from tokenizers import Tokenizer, decoders

from app.backends import ORT_PROVIDERS, ort_providers, ort_session_options
from app.manifest import GenerationSpec, Manifest
from app.search import generate, top_candidates
from app.threads import cpu_quota


@dataclass
class SourceBatch:
    input_ids: np.ndarray  # int64 [rows, S]: [CLS] pieces [SEP], right-padded
    attention_mask: np.ndarray  # int64 [rows, S]
    lengths: np.ndarray  # int64 [rows]: tokens of each row, [CLS] and [SEP] counted
    truncated: np.ndarray  # bool [rows]: the text had more pieces than the encoder's positions
    empty: np.ndarray | None = None  # bool [rows]: the text gave no piece at all (app/service.py refuses it)

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    def select(self, rows: np.ndarray) -> SourceBatch:
        """Rows `rows`, re-padded to the longest of them."""
        rows = np.asarray(rows, dtype=np.int64)
        longest = int(self.lengths[rows].max(initial=1))
        return SourceBatch(self.input_ids[rows, :longest], self.attention_mask[rows, :longest], self.lengths[rows],
                           self.truncated[rows], None if self.empty is None else self.empty[rows])

    @classmethod
    def gather(cls, parts: Sequence[tuple[SourceBatch, int]]) -> SourceBatch:
        """One batch of single rows of several batches, (batch, row) each, padded on the right."""
        lengths = np.array([int(b.lengths[r]) for b, r in parts], dtype=np.int64)
        ids = np.zeros((len(parts), int(lengths.max(initial=1))), dtype=np.int64)  # padding is masked: any id
        mask = np.zeros_like(ids)
        for i, ((batch, row), n) in enumerate(zip(parts, lengths)):
            ids[i, :n], mask[i, :n] = batch.input_ids[row, :n], 1
        truncated = np.array([bool(b.truncated[r]) for b, r in parts], dtype=bool)
        empty = np.array([bool(b.empty[r]) if b.empty is not None else False for b, r in parts], dtype=bool)
        return cls(ids, mask, lengths, truncated, empty)


class GenerationEncoder:
    """Texts -> [CLS] pieces [SEP] (what the student was trained on, training/methods/cmlm.py),
    at most max_source_tokens in all; generated ids -> text."""

    def __init__(self, tokenizer: Tokenizer, max_source_tokens: int):
        tokenizer.no_padding()
        tokenizer.no_truncation()
        if tokenizer.decoder is None and type(tokenizer.model).__name__ == "WordPiece":
            # without one, decode would leave "##" pieces apart; BERT's tokenizer.json has this one
            tokenizer.decoder = decoders.WordPiece()
        self.tokenizer, self.max_source_tokens = tokenizer, max_source_tokens
        ids = {name: tokenizer.token_to_id(name) for name in ("[CLS]", "[SEP]", "[PAD]")}
        missing = [name for name in ("[CLS]", "[SEP]") if ids[name] is None]
        if missing:
            raise ValueError(f"the tokenizer has no {missing}")
        self.bos_id, self.eos_id, self.pad_id = ids["[CLS]"], ids["[SEP]"], ids["[PAD]"] or 0

    @classmethod
    def from_file(cls, path: Path, max_source_tokens: int) -> GenerationEncoder:
        return cls(Tokenizer.from_file(str(path)), max_source_tokens)

    def encode(self, texts: Sequence[str]) -> SourceBatch:
        encodings = self.tokenizer.encode_batch([str(t) for t in texts], add_special_tokens=False)
        room = self.max_source_tokens - 2
        pieces = [e.ids[:room] for e in encodings]
        lengths = np.array([len(p) + 2 for p in pieces], dtype=np.int64)
        ids = np.full((len(pieces), int(lengths.max(initial=2))), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, p in enumerate(pieces):
            ids[i, :len(p) + 2] = [self.bos_id, *p, self.eos_id]
            mask[i, :len(p) + 2] = 1
        return SourceBatch(ids, mask, lengths, np.array([len(e.ids) > room for e in encodings], dtype=bool),
                           np.array([not e.ids for e in encodings], dtype=bool))

    def decode(self, token_ids: Sequence[int]) -> tuple[str, list[str]]:
        """(text, wordpieces): the tokenizer's own decoder joins the pieces ("##" continuations
        merged), as training-time ROUGE decodes them (training/generation_eval.py)."""
        ids = [int(i) for i in token_ids]
        return self.tokenizer.decode(ids), [self.tokenizer.id_to_token(i) for i in ids]

    def special_ids(self) -> set[int]:
        return {i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special}


def _providers(provider: str) -> list[str]:
    if provider not in ORT_PROVIDERS:
        raise ValueError(f"a generation bundle runs on ONNX Runtime: provider cpu or cuda, not {provider!r}")
    return ort_providers(provider)


class DecoderGraphs:
    """The bundle's graphs as functions (GenerationSpec's inputs and outputs), numpy in and out."""

    def __init__(self, bundle_dir: Path, spec: GenerationSpec, provider: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        # Denormal floats (softmax weights of masked positions) slow CPU kernels several-fold.
        options = ort_session_options(threads, denormal_as_zero=True)
        providers = _providers(provider)

        def session(name: str):
            return ort.InferenceSession(str(Path(bundle_dir) / name), sess_options=options, providers=providers)

        self._encoder, self._cross_kv = session(spec.encoder), session(spec.cross_kv)
        self._embed, self._projection = session(spec.embed), session(spec.projection)
        self._layers = [session(name) for name in spec.layers]
        # Bundles exported before the projection had a TopK (input k) select tokens in numpy.
        self._selects = "k" in {i.name for i in self._projection.get_inputs()}
        self.vocab_size = spec.vocab_size
        self._kv_fill = [session(name) for name in spec.kv_fill]
        self._kv_fill_from = [session(name) for name in spec.kv_fill_from] if spec.kv_fill_from else None
        self.active_provider = self._encoder.get_providers()[0]

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return self._encoder.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})[0]

    def cross_kv(self, memory: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key, value = self._cross_kv.run(None, {"memory": memory})
        return key, value

    def embed(self, token_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._embed.run(None, {"token_ids": token_ids, "positions": positions})[0]

    def layer(self, index: int, hidden, past_key, past_value, cross_key, cross_value, attention_mask):
        """-> hidden_out, present_key, present_value, exit_hidden, exit_uncertainty."""
        return self._layers[index].run(None, {
            "hidden": hidden, "past_key": past_key, "past_value": past_value, "cross_key": cross_key,
            "cross_value": cross_value, "attention_mask": attention_mask})

    def kv_fill(self, index: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key, value = self._kv_fill[index].run(None, {"hidden": hidden})
        return key, value

    def kv_fill_from(self, first: int, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The entries of layers first, first+1, ... [layers - first, rows, heads, 1, head_dim]: one
        call where the bundle has kv_fill_from, else one kv_fill call a layer."""
        if self._kv_fill_from is not None:
            key, value = self._kv_fill_from[first].run(None, {"hidden": hidden})
            return key, value
        pairs = [self.kv_fill(i, hidden) for i in range(first, len(self._kv_fill))]
        return np.stack([k for k, _ in pairs]), np.stack([v for _, v in pairs])

    def project(self, exit_hidden: np.ndarray) -> np.ndarray:
        feeds = {"exit_hidden": exit_hidden}
        if self._selects:
            feeds["k"] = np.ones(1, dtype=np.int64)
        return self._projection.run(["log_probs"], feeds)[0]

    def top_tokens(self, exit_hidden: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(top_log_probs [rows, k], top_ids [rows, k]): each row's k best tokens, best first, ties
        by lower id; selected in the graph (TopK) where the bundle's has it, else here."""
        if not self._selects:
            return top_candidates(self.project(exit_hidden), k)
        k = min(k, self.vocab_size)
        values, ids = self._projection.run(["top_log_probs", "top_ids"],
                                           {"exit_hidden": exit_hidden, "k": np.array([k], dtype=np.int64)})
        return values, ids


# A layer runs on a compacted batch (the rows still going, gathered) only when at most this
# fraction of the step's rows still go. Gathering a row's caches (its self-attention keys and
# values so far, and the cross-attention keys and values of its source) is memory-bound copying
# that costs about what a d_model 128 layer computes on, so a batch compacted by a little costs
# more than the full one; above this fraction the layer runs on all rows, those that left on the
# state they left with, which makes their cache entries with no extra call. Measured with
# bench/generation_exits.py --compact-below (docs/generation.md): 0 / 0.5 / 1 within a few per
# cent of each other at batch 32 x 4 beams, 1 (always compact) slowest.
COMPACT_BELOW = 0.5


class OnnxStepper:
    """app/search.py's Stepper over the graphs, with per-token exits: the ONNX twin of
    training/seq2seq_model.py IncrementalDecoder."""

    def __init__(self, graphs: DecoderGraphs, cross_key: np.ndarray, cross_value: np.ndarray,
                 attention_mask: np.ndarray, compact_below: float = COMPACT_BELOW):
        layers, rows, heads, _, head_dim = cross_key.shape
        self.graphs, self.layers, self.compact_below = graphs, layers, compact_below
        self.cross_key = [np.ascontiguousarray(cross_key[i]) for i in range(layers)]
        self.cross_value = [np.ascontiguousarray(cross_value[i]) for i in range(layers)]
        self.attention_mask = attention_mask
        self.row_source = np.arange(rows)  # which source each row decodes (its cross K/V)
        empty = np.zeros((rows, heads, 0, head_dim), dtype=np.float32)
        self.keys, self.values = [empty] * layers, [empty] * layers
        self.length = 0
        self.layers_run = 0  # rows x layers computed, all steps (what exits save)
        self.layers_needed = 0  # rows x layers whose result was used: the exit layers summed
        self.layers_s = 0.0  # wall time in the decoder layers and cache fills, all steps

    def reorder(self, rows: np.ndarray) -> None:
        for cache in (self.keys, self.values):
            cache[:] = [c[rows] for c in cache]
        sources = self.row_source[rows]
        # Beam search mostly reorders beams within their sources: every row keeps a source's
        # cross-attention keys and values, identical for all its beams, so they need no copy
        # (about half the bytes a reorder moved) unless the sources row by row change.
        if not np.array_equal(sources, self.row_source):
            for cache in (self.cross_key, self.cross_value):
                cache[:] = [c[rows] for c in cache]
            self.attention_mask = self.attention_mask[rows]
        self.row_source = sources

    def step(self, tokens: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        exit_hidden, exit_layer = self._decode(tokens, threshold)
        return self.graphs.project(exit_hidden), exit_layer

    def step_top(self, tokens: np.ndarray, threshold: np.ndarray, k: int):
        exit_hidden, exit_layer = self._decode(tokens, threshold)
        return (*self.graphs.top_tokens(exit_hidden, k), exit_layer)

    def _decode(self, tokens: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(exit_hidden [n, d]: each token's normalised state at the exit it left at, exit_layer [n])."""
        n, t, g = len(tokens), self.length, self.graphs
        hidden = g.embed(np.asarray(tokens, dtype=np.int64), np.full(n, t, dtype=np.int64))
        exit_hidden = np.empty_like(hidden)
        exit_layer = np.full(n, self.layers, dtype=np.int64)
        going = np.arange(n)
        started = time.perf_counter()
        # Rows that left keep in `hidden` the state they left with. On a full batch that is all
        # a layer needs to make their cache entries (decoder_kv_NN computes them from it, as the
        # layer does). Once the batch is compacted, `fills` holds every left row's entries of the
        # layers after it left, one kv_fill_from call per group of rows that leave together.
        left = np.zeros(0, dtype=np.int64)
        fills: tuple[np.ndarray, np.ndarray] | None = None
        for i in range(self.layers):
            compact = left.size > 0 and going.size <= self.compact_below * n
            if compact and fills is None:
                fills = self._fills(n, i, left, hidden[left])
            if not going.size:  # every row has left: only the cache entries of this layer
                self.keys[i] = np.concatenate([self.keys[i], fills[0][i]], axis=2)
                self.values[i] = np.concatenate([self.values[i], fills[1][i]], axis=2)
                continue
            if compact:
                out, key, value, normed, uncertainty = g.layer(
                    i, hidden[going], self.keys[i][going], self.values[i][going], self.cross_key[i][going],
                    self.cross_value[i][going], self.attention_mask[going])
                self.layers_run += going.size
                self.keys[i] = self._merged(self.keys[i], going, key, left, fills[0][i])
                self.values[i] = self._merged(self.values[i], going, value, left, fills[1][i])
                hidden[going] = out
            else:  # every row runs the layer: those that left on their state, for its cache entries
                out, self.keys[i], self.values[i], normed, uncertainty = g.layer(
                    i, hidden, self.keys[i], self.values[i], self.cross_key[i], self.cross_value[i],
                    self.attention_mask)
                self.layers_run += n
                if left.size:
                    hidden[going], normed, uncertainty = out[going], normed[going], uncertainty[going]
                else:
                    hidden = out
            if i == self.layers - 1:
                exit_hidden[going] = normed
                break
            leave = uncertainty < threshold[going]
            if leave.any():
                leaving = going[leave]
                exit_hidden[leaving] = normed[leave]
                exit_layer[leaving] = i + 1
                left = np.concatenate([left, leaving])
                if fills is not None:
                    self._fill(fills, i + 1, leaving, hidden[leaving])
                going = going[~leave]
        self.length += 1
        self.layers_needed += int(exit_layer.sum())
        self.layers_s += time.perf_counter() - started
        return exit_hidden, exit_layer

    def _fills(self, n: int, first: int, rows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cache entries of layers `first`.. for rows that left ([layers, n, heads, 1, head_dim],
        layer by row; only the rows that left are ever read)."""
        _, heads, _, head_dim = self.keys[0].shape
        shape = (self.layers, n, heads, 1, head_dim)
        fills = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.float32)
        self._fill(fills, first, rows, states)
        return fills

    def _fill(self, fills, first: int, rows: np.ndarray, states: np.ndarray) -> None:
        key, value = self.graphs.kv_fill_from(first, states)
        fills[0][first:, rows], fills[1][first:, rows] = key, value

    @staticmethod
    def _merged(past, going, present, left, fill) -> np.ndarray:
        """This layer's cache: the rows that ran it give their present entries, those that left
        before it their past plus the entry filled from the state they left with."""
        rows, heads, t, head_dim = past.shape
        cache = np.empty((rows, heads, t + 1, head_dim), dtype=np.float32)
        cache[going] = present
        cache[left, :, :t] = past[left]
        cache[left, :, t:] = fill[left]
        return cache


@dataclass
class Generated:
    text: str
    tokens: list[str]
    token_ids: list[int]
    exit_layers: list[int]  # per decoding step, the eos step's included

    @property
    def mean_exit_layer(self) -> float:
        return float(np.mean(self.exit_layers)) if self.exit_layers else 0.0


class GenerationEngine:
    def __init__(self, bundle_dir: Path, manifest: Manifest, provider: str = "cpu",
                 intra_op_threads: int | None = None):
        if manifest.generation is None:
            raise ValueError(f"{bundle_dir}: not a generation bundle")
        bundle_dir = Path(bundle_dir)
        self.manifest, self.spec, self.num_layers = manifest, manifest.generation, manifest.num_layers
        self.graphs = DecoderGraphs(bundle_dir, self.spec, provider, intra_op_threads or cpu_quota())
        self.active_provider = self.graphs.active_provider
        self.compact_below = COMPACT_BELOW  # OnnxStepper's; bench/generation_exits.py sweeps it
        self.encoder = GenerationEncoder.from_file(bundle_dir / manifest.tokenizer, manifest.max_seq_length)
        # Never generated: every special token but eos ([PAD], [UNK], [CLS], [MASK]), as in
        # training-time decoding.
        spec = self.spec
        self.banned_ids = sorted(({spec.pad_id, spec.unk_id, spec.bos_id} | self.encoder.special_ids())
                                 - {spec.eos_id})

    def generate(self, batch: SourceBatch, *, max_new_tokens: np.ndarray, num_beams: np.ndarray,
                 threshold: np.ndarray, no_repeat_ngram_size: np.ndarray) -> list[Generated]:
        """One Generated per row; every parameter per row. Rows of one (num_beams,
        no_repeat_ngram_size) are searched together, after one encoder pass for the batch."""
        rows = batch.rows
        per_row = lambda a, dtype: np.broadcast_to(np.asarray(a, dtype=dtype), (rows,))  # noqa: E731
        max_new_tokens, num_beams = per_row(max_new_tokens, np.int64), per_row(num_beams, np.int64)
        threshold, ngram = per_row(threshold, np.float32), per_row(no_repeat_ngram_size, np.int64)
        longest = self.spec.max_target_length - 1
        if rows and (max_new_tokens.max() > longest or num_beams.min() < 1):
            raise ValueError(f"max_new_tokens must be within 1..{longest} and num_beams at least 1")
        if rows == 0:
            return []
        self.decoder_layers_s = 0.0  # of this call: what per-token exits cut (bench, calibration)
        memory = self.graphs.encode(batch.input_ids, batch.attention_mask)
        cross_key, cross_value = self.graphs.cross_kv(memory)
        out: list[Generated | None] = [None] * rows
        for beams, n in dict.fromkeys(zip(num_beams.tolist(), ngram.tolist())):
            group = np.flatnonzero((num_beams == beams) & (ngram == n))
            source = int(batch.lengths[group].max())
            stepper = OnnxStepper(self.graphs, cross_key[:, group, :, :source], cross_value[:, group, :, :source],
                                  batch.attention_mask[group, :source], compact_below=self.compact_below)
            found = generate(stepper, group.size, bos_id=self.spec.bos_id, eos_id=self.spec.eos_id,
                             max_new_tokens=max_new_tokens[group], threshold=threshold[group], num_beams=beams,
                             no_repeat_ngram_size=n, length_penalty=self.spec.length_penalty,
                             banned_ids=self.banned_ids)
            self.decoder_layers_s += stepper.layers_s
            for row, hypothesis in zip(group, found):
                text, tokens = self.encoder.decode(hypothesis.token_ids)
                out[row] = Generated(text, tokens, list(hypothesis.token_ids), list(hypothesis.exit_layers))
        return out

    def warm_up(self) -> None:
        """One tiny generation through every graph: a row at full depth, one leaving at once
        (the kv_fill graphs), two steps (a non-empty cache)."""
        s = self.spec
        ids = np.array([[s.bos_id, s.eos_id], [s.bos_id, s.eos_id]], dtype=np.int64)
        batch = SourceBatch(ids, np.ones_like(ids), np.array([2, 2]), np.zeros(2, dtype=bool))
        self.generate(batch, max_new_tokens=np.array([2, 2]), num_beams=np.array([1, 1]),
                      threshold=np.array([0.0, 1.0], dtype=np.float32), no_repeat_ngram_size=np.array([0, 0]))
