import json
import shutil

import pytest

from app.manifest import ManifestError, read_manifest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    return shutil.copytree(tiny_bundle["bundle"], tmp_path / "b")


def test_exported_manifest_verifies_and_records_provenance(bundle_copy):
    m = read_manifest(bundle_copy)
    assert m.num_layers == len(m.graphs.layers) == len(m.dev_results) == 3
    assert m.verification.passed and max(m.verification.max_abs_logit_diff) <= 1e-4
    assert set(m.verification.inputs) == {"random", "real"}
    assert m.provenance.seed == 42 and m.provenance.train.rows == 270  # 30 held out for calibration
    assert m.provenance.unlabeled.rows == 100 and m.source_labels == ["0", "1"]
    assert len(m.provenance.train.sha256) == 64 and m.provenance.command.startswith("offramp train")
    assert m.calibration[0].threshold == 0.0 and m.calibration[-1].threshold == 1.0
    assert 0.0 <= m.recommended_threshold <= 1.0


def test_tampered_file_is_rejected(bundle_copy):
    with open(bundle_copy / "layer_02.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ManifestError, match="layer_02.onnx does not match its sha256"):
        read_manifest(bundle_copy)
    read_manifest(bundle_copy, verify_files=False)  # the schema itself is still fine


def test_missing_file_and_bad_manifest(bundle_copy):
    (bundle_copy / "tokenizer.json").unlink()
    with pytest.raises(ManifestError, match="missing file tokenizer.json"):
        read_manifest(bundle_copy)
    data = json.loads((bundle_copy / "manifest.json").read_text())
    data["num_layers"] = 5
    (bundle_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="num_layers is 5"):
        read_manifest(bundle_copy, verify_files=False)
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="invalid manifest"):
        read_manifest(bundle_copy)
