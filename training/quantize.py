"""8-bit weight-only quantisation of a verified fp32 bundle, checked on dev and recalibrated.

MatMul weights become 8-bit blocks (ONNX Runtime's MatMulNBits, block 32, symmetric; activations
are quantised per row block at run time) and the embedding tables (Gather) int8 with one scale.
Every scale is fixed by the weights or by a single row, never by the batch, so a row's answer
still does not depend on its batch-mates. (Dynamic int8 quantisation, whose activation scale
spans the whole batch, was measured faster but breaks that: docs/quantization.md.) The quantised
bundle keeps the fp32 export's verification, records both dev accuracies, is checked for row
independence, and has its calibration table and recommended threshold measured again.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import QuantizationReport, describe_file, read_manifest, write_manifest
from bench.sweep import calibrate, layer_probabilities, make_batches

log = logging.getLogger(__name__)

BITS, BLOCK, ACCURACY_LEVEL = 8, 32, 4
METHOD = f"weight-only: MatMul {BITS}-bit blocks of {BLOCK} (MatMulNBits, accuracy level {ACCURACY_LEVEL}), Gather int8"
ROW_TOLERANCE = 1e-5


def quantize_graph(source: Path, target: Path) -> None:
    model = onnx.load(source)
    if any(node.op_type == "MatMul" for node in model.graph.node):
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                              accuracy_level=ACCURACY_LEVEL, bits=BITS)
        quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    onnx.save(model, target)
    if any(node.op_type == "Gather" for node in model.graph.node):
        quantize_dynamic(target, target, op_types_to_quantize=["Gather"], weight_type=QuantType.QInt8)


def row_independence(engine: Engine, encoder: TextEncoder, inputs: Sequence) -> float:
    """Largest probability difference of any row between two different batchings."""
    a = layer_probabilities(engine, make_batches(encoder, inputs, 64))
    b = layer_probabilities(engine, make_batches(encoder, inputs, 7))
    return float(np.abs(a - b).max())


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
            quantize_graph(source / graph, staging / graph)
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
        batch_dependence = row_independence(engine, encoder, dev_inputs[:256])
        if batch_dependence > ROW_TOLERANCE:
            raise RuntimeError(f"quantised rows depend on their batch: max |diff| {batch_dependence:.2e}")
        manifest.quantization = QuantizationReport(
            method=METHOD, batch_dependence=batch_dependence,
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
