"""The default bundle shipped in models/: verified, small enough, as accurate as its card says,
and what `offramp serve` serves with no arguments."""

import re
from pathlib import Path

import numpy as np
import pytest

from app.manifest import read_manifest
from app.registry import find_bundles, load_model
from app.settings import Settings
from tests.tiny import SST2
from training.data import read_examples

BUNDLE = Path(__file__).resolve().parents[1] / "models" / "sst2-minilm"


def test_files_match_their_sha256_and_fit_the_budget():
    manifest = read_manifest(BUNDLE)  # raises on any checksum mismatch
    assert sum(f.bytes for f in manifest.files) <= 30_000_000
    assert manifest.labels == ["negative", "positive"] and manifest.source_labels == ["0", "1"]
    assert manifest.verification.passed and manifest.calibration
    assert manifest.quantization.batch_dependence <= 1e-5


def test_served_by_default():
    assert BUNDLE in find_bundles(Settings().model_dir)


def test_first_200_dev_rows_within_2_points_of_the_card():
    if not SST2.is_dir():
        pytest.skip("shared data not found")
    card = (BUNDLE / "README.md").read_text()
    row = re.search(r"\| accuracy \|(.*)\|", card).group(1)
    card_full_depth = float(row.split("|")[-1]) / 100
    model = load_model(BUNDLE, intra_op_threads=2)
    examples = read_examples(SST2 / "dev.tsv").examples[:200]
    labels = np.array(model.manifest.label_ids(e.label for e in examples))
    result = model.engine.run(model.encoder.encode([e.text for e in examples]), 0.0)
    accuracy = float((result.probabilities.argmax(axis=1) == labels).mean())
    assert abs(accuracy - card_full_depth) <= 0.02, (accuracy, card_full_depth)


def test_recommended_threshold_exits_early_and_answers_sentiment():
    model = load_model(BUNDLE, intra_op_threads=2)
    batch = model.encoder.encode(["a gripping, beautifully acted and deeply moving film",
                                  "a dull, lifeless and utterly predictable mess"])
    result = model.engine.run(batch, model.manifest.recommended_threshold)
    assert [model.labels[i] for i in result.probabilities.argmax(axis=1)] == ["positive", "negative"]
    assert result.exit_layer.max() < model.manifest.num_layers


@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_a_row_alone_answers_as_in_a_mixed_batch(provider):
    """The engine's contract on the shipped int8 bundle, on every backend offered: each row,
    alone vs in a batch of other lengths and thresholds (split into length groups, compacted
    after every layer): same label, same exit layer, probabilities within 1e-5."""
    from app.engine import Engine

    manifest = read_manifest(BUNDLE)
    if provider == "openvino":
        pytest.importorskip("openvino", reason="provider openvino needs: pip install 'offramp[openvino]'")
        if manifest.quantization.method.startswith("fused"):
            # ONNX Runtime operators only: refused with a clear error, never half-run
            with pytest.raises(ValueError, match="does not run fused int8 bundles"):
                Engine(BUNDLE, manifest, provider=provider, intra_op_threads=2)
            return
    if not SST2.is_dir():
        pytest.skip("shared data not found")
    model = load_model(BUNDLE, intra_op_threads=2)
    engine = Engine(BUNDLE, manifest, provider=provider, intra_op_threads=2)
    texts = [e.text for e in read_examples(SST2 / "dev.tsv").examples[:48]]
    thresholds = np.linspace(0.0, 1.0, len(texts)).astype(np.float32)
    batch = model.encoder.encode(texts)
    assert len(engine.groups(batch)) > 1
    mixed = engine.run(batch, thresholds)
    assert len(set(mixed.exit_layer.tolist())) > 2
    for i, text in enumerate(texts):
        alone = engine.run(model.encoder.encode([text]), thresholds[i])
        assert alone.exit_layer[0] == mixed.exit_layer[i]
        assert alone.probabilities[0].argmax() == mixed.probabilities[i].argmax()
        np.testing.assert_allclose(alone.probabilities[0], mixed.probabilities[i], atol=1e-5)
