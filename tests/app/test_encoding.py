"""Tokenising: long texts are tokenised from a prefix only where that changes nothing."""

from __future__ import annotations

import random

import numpy as np
import pytest

from app.encoding import TextEncoder
from tests.tiny import SST2
from training.data import read_examples


@pytest.fixture(scope="module")
def encoders(tiny_bundle):
    path = tiny_bundle["bundle"] / "tokenizer.json"
    fast, plain = TextEncoder.from_file(path, 32), TextEncoder.from_file(path, 32)
    plain._word_chars = None  # the whole text, always
    assert fast._word_chars == 100
    return fast, plain


def long_texts() -> list[str]:
    sentences = [e.text for e in read_examples(SST2 / "dev.tsv").examples]
    rng = random.Random(0)
    joined = " ".join(rng.choices(sentences, k=80))
    cut = 32 * 12
    return [
        joined[:7700],
        joined[:cut + 101], joined[:cut + 150],  # just past the point where the prefix is tried
        " " * 2000 + joined[:3000],  # blank runs: the prefix holds no tokens
        "\u200b" * 600 + joined[:1000],  # invisible characters the tokenizer drops
        joined[:cut - 40] + "x" * 500 + " " + joined[:2000],  # a word longer than 100 across the cut
        joined[:cut - 30] + "unbelievably" * 8 + " " + joined[:2000],  # a long word that fits
        "naïve café résumé " * 60,  # accents the normalizer strips (offsets still in the original)
        "电影很好看" * 300,  # every CJK character is a word
        "word " * 40 + "\u0301" * 900,  # a tail of combining marks only
        " " * (cut - 20) + "a b c " + "x" * 500 + " " + joined[:2000],  # kept tokens reach the cut
        ("a" + " " * 12) * 40 + joined[:2000],  # ... and are truncated there
    ]


def test_long_texts_give_the_same_tokens_as_the_whole_text(encoders):
    fast, plain = encoders
    texts = long_texts()
    a, b = fast.encode(texts), plain.encode(texts)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.attention_mask, b.attention_mask)
    np.testing.assert_array_equal(a.token_type_ids, b.token_type_ids)
    np.testing.assert_array_equal(a.truncated, b.truncated)
    np.testing.assert_array_equal(a.empty, b.empty)
    for text in texts:  # alone too
        np.testing.assert_array_equal(fast.encode([text]).input_ids, plain.encode([text]).input_ids)


def test_the_prefix_is_used_where_it_is_certain(encoders):
    fast, _ = encoders
    cut = fast._prefix_chars
    text = long_texts()[0]
    prefix = fast.tokenizer.encode(text[:cut])
    assert fast._prefix_suffices(prefix, cut)  # a plain long review: the prefix is enough
    for crossing in long_texts()[-2:]:  # the cut falls among (or just after) the kept tokens
        assert not fast._prefix_suffices(fast.tokenizer.encode(crossing[:cut]), cut)


def test_pairs_are_never_cut(encoders):
    fast, plain = encoders
    pair = [long_texts()[0], long_texts()[1]]
    np.testing.assert_array_equal(fast.encode([pair]).input_ids, plain.encode([pair]).input_ids)
