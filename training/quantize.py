"""int8 quantisation of a verified fp32 bundle, checked on dev and recalibrated.

Two methods; both fix every scale offline (from the weights, or from calibration text), never
from the batch, so a row's answer does not depend on its batch-mates (docs/quantization.md):

- `static` (the default): int8 compute. Each layer graph is quantised by NNCF's post-training
  quantisation (transformer preset: SmoothQuant, int8 per-channel weights, int8 activations with
  scales calibrated on the hidden states that really enter that layer, produced by the layers
  already quantised below it, one unpadded training row at a time). The activations are then
  re-expressed as uint8 with zero point 128, the same grid exactly, because ONNX Runtime's x86
  int8 kernels (VNNI) want u8 activations x s8 weights; s8 x s8 falls back to a slow path.
- `weight-only`: MatMul weights in 8-bit blocks of 32 (MatMulNBits); fp32 compute.

The embedding tables (Gather) are int8 with one scale in both. The quantised bundle keeps the fp32
export's verification, records both dev accuracies, is checked for row independence, refused if
it loses more than `max_loss_points` of full-depth dev accuracy, and is recalibrated.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

from app.encoding import TextEncoder
from app.engine import Engine
from app.manifest import DataFileRecord, QuantizationReport, describe_file, read_manifest, write_manifest
from app.calibration import layer_probabilities, make_batches
from training import fused_int8, progress
from training.errors import QuantizationRefused
from training.staging import Staged

log = logging.getLogger(__name__)

METHODS = ("static", "fused", "weight-only")
BITS, BLOCK, ACCURACY_LEVEL = 8, 32, 4
WEIGHT_ONLY = (f"weight-only: MatMul {BITS}-bit blocks of {BLOCK} (MatMulNBits, accuracy level "
               f"{ACCURACY_LEVEL}), Gather int8")
STATIC = ("static int8: NNCF post-training quantisation per layer (transformer preset, SmoothQuant), "
          "int8 per-channel weights, uint8 activations calibrated on {rows} training rows, Gather int8")
FUSED = ("fused static int8: BERT layers rebuilt as QAttention, MatMulIntegerToFloat and "
         "SkipLayerNormalization, int8 per-column weights, uint8 activations (0.01-99.99 percentile "
         "ranges) calibrated on {rows} training rows, Gather int8")
ROW_TOLERANCE = 1e-5
CALIBRATION_ROWS = 300


def quantize_gather(target: Path) -> None:
    if any(node.op_type == "Gather" for node in onnx.load(target).graph.node):
        quantize_dynamic(target, target, op_types_to_quantize=["Gather"], weight_type=QuantType.QInt8)


def quantize_weight_only(source: Path, target: Path) -> None:
    model = onnx.load(source)
    if any(node.op_type == "MatMul" for node in model.graph.node):
        config = DefaultWeightOnlyQuantConfig(block_size=BLOCK, is_symmetric=True,
                                              accuracy_level=ACCURACY_LEVEL, bits=BITS)
        quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=BLOCK, is_symmetric=True,
                                         accuracy_level=ACCURACY_LEVEL, algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    onnx.save(model, target)
    quantize_gather(target)


# -- static int8 -----------------------------------------------------------------------------

def activations_to_uint8(model: onnx.ModelProto) -> int:
    """Rewrite int8 activation quantisers (zero point z) as uint8 ones (zero point z + 128):
    q_u8 = q_s8 + 128 on the same scale, so every dequantised value is unchanged. Weights (whose
    QuantizeLinear input is a constant) stay int8. Returns how many quantisers changed."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    constants = {n.output[0]: n for n in graph.node if n.op_type == "Constant"}

    def read(name: str):
        if name in initializers:
            return numpy_helper.to_array(initializers[name])
        if name in constants:
            return numpy_helper.to_array(constants[name].attribute[0].t)
        return None

    def write(name: str, value: np.ndarray) -> None:
        tensor = numpy_helper.from_array(value, name)
        (initializers[name] if name in initializers else constants[name].attribute[0].t).CopyFrom(tensor)

    changed_outputs, shifted = set(), set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3 or read(node.input[0]) is not None:
            continue
        zero_point = read(node.input[2])
        if zero_point is None or zero_point.dtype != np.int8:
            continue
        changed_outputs.add(node.output[0])
        if node.input[2] not in shifted:
            write(node.input[2], (zero_point.astype(np.int16) + 128).astype(np.uint8))
            shifted.add(node.input[2])
    for node in graph.node:  # the paired DequantizeLinear must read the same grid
        if node.op_type == "DequantizeLinear" and node.input[0] in changed_outputs and len(node.input) > 2:
            name = node.input[2]
            if name not in shifted:
                write(name, (read(name).astype(np.int16) + 128).astype(np.uint8))
                shifted.add(name)
    # Recorded intermediate types would still say int8.
    del graph.value_info[:]
    return len(changed_outputs)


def _embedding_feeds(source: Path, staging: Path, embeddings: str, encoder: TextEncoder,
                     calibration_inputs: Sequence) -> list[dict]:
    """Embeddings: Gather int8; what they give each calibration row, one row at a time (padding
    would widen the ranges)."""
    shutil.copyfile(source / embeddings, staging / embeddings)
    quantize_gather(staging / embeddings)
    session = fused_int8.session(staging / embeddings)
    wanted = {i.name for i in session.get_inputs()}
    feeds = []
    for item in progress.bar(calibration_inputs, desc="calibration rows: embeddings", unit="row"):
        batch = encoder.encode([item])
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "token_type_ids": batch.token_type_ids}
        (hidden,) = session.run(None, {k: v for k, v in inputs.items() if k in wanted})
        feeds.append({"hidden": hidden, "attention_mask": batch.attention_mask})
    return feeds


def _next_feeds(layer_path: Path, feeds: list[dict]) -> list[dict]:
    layer = fused_int8.session(layer_path)
    return [{"hidden": layer.run(["hidden_out"], feed)[0], "attention_mask": feed["attention_mask"]}
            for feed in feeds]


def quantize_static(source: Path, staging: Path, graphs: list[str], encoder: TextEncoder,
                    calibration_inputs: Sequence) -> None:
    """Embeddings: Gather int8. Layers: NNCF int8, each calibrated on what enters it."""
    import nncf

    embeddings, layers = graphs[0], graphs[1:]
    feeds = _embedding_feeds(source, staging, embeddings, encoder, calibration_inputs)
    for graph in progress.bar(layers, desc="int8 calibration", unit="layer"):
        quantized = nncf.quantize(onnx.load(source / graph), nncf.Dataset(feeds),
                                  model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
        changed = activations_to_uint8(quantized)
        onnx.save(quantized, staging / graph)
        log.info("%s: int8, %d activation quantisers", graph, changed)
        feeds = _next_feeds(staging / graph, feeds)


def quantize_fused(source: Path, staging: Path, graphs: list[str], encoder: TextEncoder,
                   calibration_inputs: Sequence) -> None:
    """Embeddings: Gather int8. Layers: rebuilt fused and int8 (training/fused_int8.py), each
    calibrated on what the quantised layers below give it."""
    embeddings, layers = graphs[0], graphs[1:]
    feeds = _embedding_feeds(source, staging, embeddings, encoder, calibration_inputs)
    for graph in progress.bar(layers, desc="fused int8 calibration", unit="layer"):
        try:
            quantized = fused_int8.quantize_layer(onnx.load(source / graph), feeds)
        except fused_int8.UnsupportedLayer as exc:
            raise QuantizationRefused(f"--method fused rebuilds BERT layers only; {graph}: {exc}. "
                                      f"Use --method static") from exc
        onnx.save(quantized, staging / graph)
        feeds = _next_feeds(staging / graph, feeds)


# the methods whose activation scales come from calibration text: (quantiser, phase, description)
CALIBRATED = {"static": (quantize_static, "static int8 quantisation", STATIC),
              "fused": (quantize_fused, "fused static int8 quantisation", FUSED)}


# -- the bundle --------------------------------------------------------------------------------

def row_independence(engine: Engine, encoder: TextEncoder, inputs: Sequence) -> float:
    """Largest probability difference of any row between two different batchings."""
    batchings = [make_batches(encoder, inputs, 64), make_batches(encoder, inputs, 7)]
    with progress.bar(total=sum(map(len, batchings)), desc="row independence", unit="batch") as bar:
        a, b = (layer_probabilities(progress.CountingEngine(engine, bar), batches) for batches in batchings)
    return float(np.abs(a - b).max())


def layer_accuracy(engine: Engine, encoder: TextEncoder, inputs: Sequence, labels: np.ndarray,
                   desc: str = "dev accuracy") -> list[float]:
    batches = make_batches(encoder, inputs, 64)
    with progress.bar(total=len(batches), desc=desc, unit="batch") as bar:
        probs = layer_probabilities(progress.CountingEngine(engine, bar), batches)
    return [float(x) for x in (probs.argmax(-1) == labels[None, :]).mean(axis=1)]


def quantize_bundle(source: Path, out_dir: Path, dev_inputs: Sequence, dev_labels: np.ndarray,
                    tolerance_points: float = 0.5, max_loss_points: float = 0.5,
                    method: str = "static", calibration_inputs: Sequence | None = None,
                    threshold_rows: tuple[Sequence, np.ndarray, DataFileRecord] | None = None,
                    max_batch_dependence: float = ROW_TOLERANCE) -> None:
    """Write the int8 bundle to out_dir, refusing it if full-depth dev accuracy drops by more
    than `max_loss_points` against the fp32 source, or if a row's answer depends on its batch."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method in CALIBRATED and not calibration_inputs:
        raise ValueError("static quantisation needs calibration text (training rows)")
    source, out_dir = Path(source), Path(out_dir)
    manifest = read_manifest(source)
    if manifest.stages:
        raise QuantizationRefused(f"{source} is a cascade: quantise its stages, then cascade them again")
    with Staged(out_dir) as staged:
        staging = staged.path
        encoder = TextEncoder.from_file(source / manifest.tokenizer, manifest.max_seq_length)
        graphs = [manifest.graphs.embeddings, *manifest.graphs.layers]
        if method in CALIBRATED:
            calibration_inputs = list(calibration_inputs)
            quantize, phase, template = CALIBRATED[method]
            with progress.phase(phase, f"{len(graphs)} graphs, {len(calibration_inputs):,} calibration rows"):
                quantize(source, staging, graphs, encoder, calibration_inputs)
            description = template.format(rows=len(calibration_inputs))
        else:
            with progress.phase("weight-only quantisation", f"{len(graphs)} graphs"):
                for graph in progress.bar(graphs, desc="weight-only quantisation", unit="graph"):
                    quantize_weight_only(source / graph, staging / graph)
            description = WEIGHT_ONLY
        shutil.copyfile(source / manifest.tokenizer, staging / manifest.tokenizer)
        manifest.files = [describe_file(staging, f.path) for f in manifest.files]
        manifest.name = out_dir.name

        with progress.phase("dev accuracy, fp32 and int8", f"{len(dev_inputs):,} rows") as p:
            fp32 = layer_accuracy(Engine(source, read_manifest(source)), encoder, dev_inputs, dev_labels,
                                  "dev accuracy fp32")
            engine = Engine(staging, manifest)
            int8 = layer_accuracy(engine, encoder, dev_inputs, dev_labels, "dev accuracy int8")
            loss = (fp32[-1] - int8[-1]) * 100
            p.result = f"full depth: fp32 {fp32[-1]:.4f}, int8 {int8[-1]:.4f}, {loss:.2f} points"
        log.info("full-depth dev accuracy: fp32 %.4f, int8 %.4f (%.2f points)", fp32[-1], int8[-1], loss)
        if loss > max_loss_points:
            raise QuantizationRefused(f"int8 loses {loss:.2f} points of dev accuracy (> {max_loss_points}, "
                                      f"--max-loss); the int8 bundle is not written")
        with progress.phase("row independence check", f"{min(len(dev_inputs), 256)} rows, two batchings"):
            batch_dependence = row_independence(engine, encoder, dev_inputs[:256])
        if batch_dependence > max_batch_dependence:
            raise QuantizationRefused(f"quantised rows depend on their batch: max |diff| {batch_dependence:.2e} "
                                      f"(> {max_batch_dependence:g}, --max-batch-dependence); "
                                      "the int8 bundle is not written")
        manifest.quantization = QuantizationReport(
            method=description, batch_dependence=batch_dependence,
            source_bytes=sum(f.bytes for f in read_manifest(source, verify_files=False).files),
            fp32_dev_accuracy=fp32, int8_dev_accuracy=int8,
        )
        for result, acc in zip(manifest.dev_results, int8):
            result.accuracy = acc
        # The exits' calibration again, on the rows the source was calibrated on when they are
        # known (held out of training), else on dev.
        cal_inputs, cal_labels, record = threshold_rows or (dev_inputs, dev_labels, manifest.provenance.dev)
        manifest.calibration, manifest.recommended_threshold = progress.calibrate(
            engine, encoder, cal_inputs, cal_labels, tolerance_points=tolerance_points,
            name="calibration sweep" if threshold_rows else "dev calibration sweep")
        manifest.calibration_data = record
        write_manifest(staging, manifest)
        staged.publish()
