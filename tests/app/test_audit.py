"""The online agreement monitor (app/audit.py): its sampling, and its figures on /metrics."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.audit import Auditor, expected_agreement
from app.manifest import read_manifest
from app.policies import ENTROPY
from app.registry import load_model
from app.server import create_app
from app.settings import Settings
from training.data import read_examples


def test_the_sampler_takes_its_fraction_and_counts_full_depth_rows_without_rerunning(tiny_bundle):
    manifest = read_manifest(tiny_bundle["bundle"])
    seen = []
    auditor = Auditor(0.3, manifest, lambda *counts: seen.append(counts), seed=0)
    model = load_model(tiny_bundle["bundle"])
    batch = model.encoder.encode(["a fine film"] * 4)
    rows, total = 0, 20000
    for _ in range(total // 4):
        exit_layer = np.full(4, manifest.num_layers)
        auditor.sample(batch, np.full((4, 2), 0.5, np.float32), exit_layer, np.zeros(4, np.int64),
                       np.zeros(4, np.float32), np.zeros(4, np.int64))
    rows = sum(c[0] for c in seen)
    assert abs(rows - 0.3 * total) < 4 * np.sqrt(total * 0.3 * 0.7)
    assert all(c[0] == c[1] for c in seen) and not auditor.pending  # full depth agrees, nothing to run
    early = Auditor(1.0, manifest, lambda *c: None, seed=0)
    early.sample(batch, np.full((4, 2), 0.5, np.float32), np.ones(4, np.int64), np.zeros(4, np.int64),
                 np.full(4, 0.3, np.float32), np.zeros(4, np.int64))
    assert len(early.pending) == 4
    assert expected_agreement(manifest, ENTROPY, 0.3, 0) == \
        min(manifest.calibration, key=lambda p: abs(p.threshold - 0.3)).agreement


def _metric(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{model="tiny"}} ([0-9.e+-]+)$', text, re.M)
    return float(match.group(1)) if match else float("nan")


def test_metrics_report_how_often_early_answers_agree_with_full_depth(tiny_bundle):
    texts = [e.text for e in read_examples(tiny_bundle["dev"]).examples][:32]
    settings = Settings(model_dir=tiny_bundle["models"], audit_fraction=1.0)
    with TestClient(create_app(settings)) as client:
        early = client.post("/v1/models/tiny/predict", json={"inputs": texts, "threshold": 1.0}).json()
        full = client.post("/v1/models/tiny/predict", json={"inputs": texts, "threshold": 0.0}).json()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = client.get("/metrics").text
            if _metric(text, "offramp_audit_rows_total") >= 2 * len(texts):
                break
            time.sleep(0.1)
    agree = sum(a["label"] == b["label"] for a, b in zip(early["predictions"], full["predictions"]))
    assert _metric(text, "offramp_audit_rows_total") == 2 * len(texts)
    assert _metric(text, "offramp_audit_agreed_total") == agree + len(texts)
    assert _metric(text, "offramp_audit_agreement") == pytest.approx((agree + len(texts)) / (2 * len(texts)))
    manifest = read_manifest(tiny_bundle["bundle"])
    at = {p.threshold: p.agreement for p in manifest.calibration}
    assert _metric(text, "offramp_audit_expected_agreement") == pytest.approx((at[1.0] + at[0.0]) / 2, abs=1e-6)
