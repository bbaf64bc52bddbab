"""Honest calibration: exits are calibrated on rows held out of training, never on the dev file."""

from __future__ import annotations

import numpy as np
import pytest

from app.calibration import layer_probabilities, make_batches
from app.manifest import read_manifest
from app.registry import load_model
from training.data import DataError
from training.labels import read_task_data


def test_a_tenth_of_train_is_held_out_the_same_whatever_the_seed(tiny_data):
    train, dev = tiny_data
    data = read_task_data(train, dev, calibration_split=0.1)
    again = read_task_data(train, dev, calibration_split=0.1)
    held = {e.line for e in data.calibration_examples}
    assert len(held) == 30 and len(data.train_examples) == 270
    assert held.isdisjoint(e.line for e in data.train_examples)  # never trained on
    assert held == {e.line for e in again.calibration_examples}
    assert read_task_data(train, dev).calibration_examples is None  # split 0: dev, in sample
    with pytest.raises(DataError, match="is the --dev file"):
        read_task_data(train, dev, calibration_path=dev)
    with pytest.raises(DataError, match="a fraction"):
        read_task_data(train, dev, calibration_split=1.0)


def test_the_export_calibrates_on_the_held_out_rows_not_on_dev(tiny_bundle, tiny_data):
    manifest = read_manifest(tiny_bundle["bundle"])
    train, dev = tiny_data
    assert manifest.calibration_data.path == str(train) and manifest.calibration_data.rows == 30
    assert manifest.provenance.train.rows == 270 and manifest.provenance.dev.path == str(dev)
    held = read_task_data(train, dev, calibration_split=0.1).calibration_examples
    model = load_model(tiny_bundle["bundle"])
    probs = layer_probabilities(model.engine, make_batches(model.encoder, [e.text for e in held], 32))
    labels = np.array(model.manifest.label_ids([e.label for e in held]))
    full = next(p for p in manifest.calibration if p.threshold == 0.0)
    assert full.accuracy == pytest.approx(float((probs[-1].argmax(-1) == labels).mean()))
    assert len(manifest.dev_results) == manifest.num_layers  # dev: reported, out of sample


def test_quantisation_recalibrates_on_the_same_held_out_rows(tiny_bundle, tiny_int8_bundle):
    source, quantised = read_manifest(tiny_bundle["bundle"]), read_manifest(tiny_int8_bundle)
    assert quantised.calibration_data == source.calibration_data
    assert quantised.calibration_data.held_out_fraction == 0.1
