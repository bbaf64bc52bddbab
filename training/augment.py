"""TinyBERT's data augmentation: word replacement, with teacher-labelled copies.

The paper replaces each word, with probability p = 0.4, by one of K = 15 candidates: a
single-piece word's candidates are a BERT MLM's top-K predictions for it, other words' the
nearest GloVe neighbours; N copies per example (20 for SST-2). Neither an MLM head nor GloVe is
available offline here, so candidates are the K nearest neighbours (cosine) of the word in the
teacher's wordpiece embedding table, among whole-word single-piece tokens; words that are not
one whole wordpiece (rare words, numbers, punctuation) are kept as they are.

Neighbours are computed once, only for the words that occur in the data. The copies carry no
label: the recipe has the teacher label them (its logits are the targets).
"""

from __future__ import annotations

import random
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from training.data import Example


def _normalise(tokenizer: Tokenizer, word: str) -> str:
    return tokenizer.normalizer.normalize_str(word) if tokenizer.normalizer is not None else word


def whole_word_tokens(tokenizer: Tokenizer) -> dict[str, int]:
    """{token: id} of the vocabulary's alphabetic whole-word pieces (no ##, no [SPECIAL])."""
    return {tok: i for tok, i in tokenizer.get_vocab().items() if tok.isalpha()}


@torch.no_grad()
def word_neighbours(tokenizer: Tokenizer, embeddings: torch.Tensor, words: Iterable[str],
                    k: int = 15, chunk: int = 1024) -> dict[str, list[str]]:
    """{word: its k nearest whole-word tokens by cosine of the embedding rows, nearest first}
    for each of `words` that is itself a whole-word token."""
    candidates = whole_word_tokens(tokenizer)
    tokens = sorted(candidates, key=candidates.get)
    ids = torch.tensor([candidates[t] for t in tokens])
    table = F.normalize(embeddings[ids].float(), dim=-1)
    position = {t: i for i, t in enumerate(tokens)}
    queries = sorted({w for w in (_normalise(tokenizer, w) for w in words) if w in position})
    k = min(k, len(tokens) - 1)
    out: dict[str, list[str]] = {}
    for start in range(0, len(queries), chunk):
        part = queries[start:start + chunk]
        rows = torch.tensor([position[w] for w in part])
        sims = table[rows] @ table.T
        sims[torch.arange(len(part)), rows] = -float("inf")  # never the word itself
        for word, best in zip(part, sims.topk(k, dim=-1).indices.tolist()):
            out[word] = [tokens[j] for j in best]
    return out


class WordReplacer:
    def __init__(self, tokenizer: Tokenizer, embeddings: torch.Tensor, texts: Iterable[str], k: int = 15):
        self.tokenizer = tokenizer
        self.neighbours = word_neighbours(tokenizer, embeddings,
                                          {w for t in texts for w in t.split()}, k)

    def replace(self, text: str, p: float, rng: random.Random) -> str:
        """Each word with candidates becomes, with probability p, one of them (uniformly)."""
        out, replaced = [], False
        for word in text.split():
            candidates = self.neighbours.get(_normalise(self.tokenizer, word))
            if candidates and rng.random() < p:
                word, replaced = rng.choice(candidates), True
            out.append(word)
        return " ".join(out) if replaced else text


def augment_examples(examples: Sequence[Example], tokenizer: Tokenizer, embeddings: torch.Tensor,
                     copies: int = 20, p: float = 0.4, k: int = 15, seed: int = 0) -> list[Example]:
    """The examples (labels kept), then up to `copies` distinct augmented copies of each, without
    labels (teacher-labelled later). Deterministic for a given seed."""
    texts = [e.text for e in examples] + [e.text_pair for e in examples if e.text_pair is not None]
    replacer = WordReplacer(tokenizer, embeddings, texts, k)
    rng = random.Random(seed)
    out = list(examples)
    for e in examples:
        seen = {(e.text, e.text_pair)}
        for _ in range(copies):
            text = replacer.replace(e.text, p, rng)
            pair = replacer.replace(e.text_pair, p, rng) if e.text_pair is not None else None
            if (text, pair) not in seen:
                seen.add((text, pair))
                out.append(Example(text, pair, None))
    return out
