"""The generation bundle shipped in models/: verified, within the size budget, served by a plain
`offramp serve` beside the default classifier, and as good on Gigaword dev as its manifest says."""

from pathlib import Path

import numpy as np
import pytest

from app.manifest import read_manifest
from app.registry import Registry, find_bundles, load_model
from app.settings import Settings
from training.generation_eval import rouge
from training.seq2seq_data import read_pairs

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "gigaword-cmlm"
GIGAWORD = Path(__file__).resolve().parents[2] / "shared" / "data" / "gigaword"


def test_files_match_their_sha256_and_fit_the_budget():
    manifest = read_manifest(BUNDLE)  # raises on any checksum mismatch
    assert manifest.task == "generation" and manifest.verification.passed
    assert sum(f.bytes for f in manifest.files) <= 30_000_000
    g = manifest.generation
    assert g.calibration and g.full_depth.mean_exit_layer == manifest.num_layers
    assert manifest.recommended_threshold in [p.threshold for p in g.calibration]


def test_served_by_default_beside_the_classifier():
    assert BUNDLE in find_bundles(Settings().model_dir)
    registry = Registry(Settings().model_dir)
    registry.versions = {"gigaword-cmlm": {1: load_model(BUNDLE, intra_op_threads=1)}}
    assert registry.default_name == "gigaword-cmlm"  # the only model
    classifier = load_model(BUNDLE.parent / "sst2-minilm", intra_op_threads=1)
    registry.versions["sst2-minilm"] = {1: classifier}
    assert registry.default_name == "sst2-minilm"  # /v1/predict classifies


def test_greedy_dev_rouge_matches_the_calibration():
    if not GIGAWORD.is_dir():
        pytest.skip("shared data not found")
    model = load_model(BUNDLE, intra_op_threads=2)
    g = model.manifest.generation
    pairs = read_pairs(GIGAWORD / "dev", limit=100)
    batch = model.encoder.encode([p.source for p in pairs])
    rows = batch.rows
    out = model.engine.generate(batch, max_new_tokens=np.full(rows, g.max_new_tokens),
                                num_beams=np.full(rows, g.num_beams),
                                threshold=np.full(rows, 0.0, dtype=np.float32),
                                no_repeat_ngram_size=np.full(rows, g.no_repeat_ngram_size))
    scores = rouge([o.text for o in out], [p.target for p in pairs])
    # 100 of the 1,000 calibration rows: within 5 ROUGE-L points of the full-depth figure
    assert abs(scores["rougeL"] - g.full_depth.rougeL) <= 5.0, (scores, g.full_depth)
    assert all(o.mean_exit_layer == model.manifest.num_layers for o in out if o.exit_layers)
