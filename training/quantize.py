"""int8 dynamic quantisation of a verified fp32 bundle, checked on dev and recalibrated.

Weights of MatMul and Gather (the embedding tables, most of a small model's bytes) become int8;
activations stay float and are quantised on the fly. The fp32 bundle's export verification stays
in the manifest; the quantised bundle adds its own dev accuracy next to the fp32 one, and the
calibration table and recommended threshold are measured again on the quantised engine.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from onnxruntime.quantization import QuantType, quantize_dynamic

from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import QuantizationReport, describe_file, read_manifest, write_manifest
from bench.sweep import calibrate, layer_probabilities, make_batches

log = logging.getLogger(__name__)

OP_TYPES = ["MatMul", "Gather"]


def layer_accuracy(engine: Engine, encoder: TextEncoder, inputs: Sequence, labels: np.ndarray) -> list[float]:
    probs = layer_probabilities(engine, make_batches(encoder, inputs, 64))
    return [float(x) for x in (probs.argmax(-1) == labels[None, :]).mean(axis=1)]


def quantize_bundle(source: Path, out_dir: Path, dev_inputs: Sequence, dev_labels: np.ndarray,
                    tolerance_points: float = 0.5, max_loss_points: float = 0.5) -> None:
    """Write the int8 bundle to out_dir, refusing it if full-depth dev accuracy drops by more
    than `max_loss_points` against the fp32 source."""
    source, out_dir = Path(source), Path(out_dir)
    manifest = read_manifest(source)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for graph in [manifest.graphs.embeddings, *manifest.graphs.layers]:
            quantize_dynamic(source / graph, staging / graph, op_types_to_quantize=OP_TYPES,
                             per_channel=True, weight_type=QuantType.QInt8)
        shutil.copyfile(source / manifest.tokenizer, staging / manifest.tokenizer)
        manifest.files = [describe_file(staging, f.path) for f in manifest.files]
        manifest.name = out_dir.name

        encoder = TextEncoder.from_file(staging / manifest.tokenizer, manifest.max_seq_length)
        fp32 = layer_accuracy(Engine(source, read_manifest(source)), encoder, dev_inputs, dev_labels)
        engine = Engine(staging, manifest)
        int8 = layer_accuracy(engine, encoder, dev_inputs, dev_labels)
        loss = (fp32[-1] - int8[-1]) * 100
        log.info("full-depth dev accuracy: fp32 %.4f, int8 %.4f (%.2f points)", fp32[-1], int8[-1], loss)
        if loss > max_loss_points:
            raise RuntimeError(f"int8 loses {loss:.2f} points of dev accuracy (> {max_loss_points})")
        manifest.quantization = QuantizationReport(
            method="onnxruntime dynamic int8, per-channel, " + "+".join(OP_TYPES),
            source_bytes=sum(f.bytes for f in read_manifest(source, verify_files=False).files),
            fp32_dev_accuracy=fp32, int8_dev_accuracy=int8,
        )
        for result, acc in zip(manifest.dev_results, int8):
            result.accuracy = acc
        manifest.calibration, manifest.recommended_threshold = calibrate(
            engine, encoder, dev_inputs, dev_labels, tolerance_points=tolerance_points)
        write_manifest(staging, manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
