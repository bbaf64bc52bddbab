"""Tang et al.'s augmentation rules (training/word_augment.py), each on a fixed sentence and seed."""

from __future__ import annotations

import random

import pytest

from training.word_augment import PosVocabulary, Rules, augment, augment_one, load_tagger, split, tag

SENTENCE = "a gripping and beautifully acted film that never bores its audience"
CORPUS = [SENTENCE, "a dull , lifeless film that bores everyone", "the actors never seem to care",
          "an honest and moving story", "it drags and drags"]


def test_masking_masks_each_word_with_its_probability():
    words = split([SENTENCE])[0]
    rules = Rules(p_mask=0.3, p_pos=0.0, p_ngram=0.0)
    out = augment_one(words, rules, None, random.Random(7), "[MASK]").split()
    assert len(out) == len(words)
    replay = random.Random(7)
    expected = sum(replay.random() < 0.3 for _ in words)
    assert out.count("[MASK]") == expected > 0
    assert all(o == w or o == "[MASK]" for o, (w, _) in zip(out, words))
    assert augment_one(words, Rules(1.0, 0.0, 0.0), None, random.Random(0), "[MASK]").split() == ["[MASK]"] * len(words)


def test_ngram_sampling_keeps_one_contiguous_span_of_at_most_five_words():
    words = split([SENTENCE])[0]
    plain = [w for w, _ in words]
    rng = random.Random(3)
    for _ in range(50):
        out = augment_one(words, Rules(0.0, 0.0, 1.0), None, rng, "[MASK]").split()
        assert 1 <= len(out) <= 5
        starts = [i for i in range(len(plain)) if plain[i:i + len(out)] == out]
        assert starts, f"{out} is not a span of the sentence"


@pytest.fixture(scope="module")
def tagged():
    return tag(CORPUS, load_tagger())


def test_pos_replacement_keeps_the_part_of_speech(tagged):
    vocabulary = PosVocabulary(tagged)
    sentence = tagged[0]
    rng = random.Random(11)
    changed = 0
    for _ in range(30):
        out = augment_one(sentence, Rules(0.0, 1.0, 0.0), vocabulary, rng, "[MASK]").split()
        assert len(out) == len(sentence)
        for new, (old, pos) in zip(out, sentence):
            assert pos in vocabulary.tag_of(new), f"{old}/{pos} became {new}, never tagged {pos}"
            changed += new.lower() != old.lower()
    assert changed > 0
    # Drawn by unigram frequency: 'film' (twice in the corpus) comes up about twice as often as
    # a noun seen once.
    nouns = [vocabulary.sample("NN", random.Random(s)) for s in range(2000)]
    assert nouns.count("film") > 1.5 * max(nouns.count(w) for w in set(nouns) - {"film"})


def test_augment_makes_distinct_copies_that_differ_from_the_original(tagged):
    rules = Rules()
    out = augment(tagged, rules, copies=20, seed=0)
    by_source: dict[int, list[str]] = {}
    for index, text in out:
        by_source.setdefault(index, []).append(text)
    for index, texts in by_source.items():
        assert len(texts) == len(set(texts))
        assert " ".join(w for w, _ in tagged[index]) not in texts
    assert augment(tagged, rules, copies=20, seed=0) == out  # the seed fixes it
    assert augment(tagged, rules, copies=20, seed=1) != out
