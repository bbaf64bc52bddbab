"""int8 BERT layers rebuilt around ONNX Runtime's fused kernels (`offramp quantize --method fused`).

The exported layer graph (torch's BertLayer: six projections, two LayerNorms, erf GELU, about 60
nodes of attention arithmetic with the additive mask, the heads' Reshape/Transpose pairs) is read
back into its weights and written again as a handful of fused operators:

    QuantizeLinear -> QAttention (int8 Q/K/V projection, attention on the row's own length)
    -> QuantizeLinear -> MatMulIntegerToFloat (output projection, + bias) -> SkipLayerNormalization
    -> QuantizeLinear -> MatMulIntegerToFloat -> Gelu -> QuantizeLinear -> MatMulIntegerToFloat
    -> SkipLayerNormalization -> hidden_out

and the layer's exit head copied unchanged from the source graph. No Reshape or Transpose is left
in the layer, and the attention mask becomes one length per row (ReduceSum, Cast) instead of an
additive [rows, 1, 1, tokens] bias built in every graph.

Every scale is fixed offline, so a row's answer never depends on its batch-mates: weights int8
per output column (symmetric), activations uint8 per tensor (ONNX Runtime's u8 x s8 VNNI path),
their ranges the 0.01 / 99.99 percentiles of what enters each quantiser on calibration rows
produced by the already-quantised layers below. Before anything is quantised the same fused
structure is built in fp32 and checked against the source graph: a layer that is not this
architecture (or a head count that does not fit) is refused, never approximated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import TensorProto
from onnx import helper as H
from onnx import numpy_helper

from app.backends import ort_session_options

CLIP_PERCENTILE = 99.99
MATCH_TOLERANCE = 1e-4
PROBES = ("fz_x", "fz_ctx", "fz_h1", "fz_g")  # what enters each activation quantiser
HEAD_PROBES = ("hidden_out", "fz_hn")  # ... and those of a rebuilt FastBERT exit
CONTRIB = {"Attention", "QAttention", "MatMulIntegerToFloat", "SkipLayerNormalization", "Gelu",
           "MultiHeadAttention"}


class UnsupportedLayer(ValueError):
    """The layer graph is not the BERT layer this module rebuilds."""


@dataclass
class BertLayer:
    hidden: int
    qkv: np.ndarray  # [hidden, 3 * hidden]: query | key | value, input-major
    qkv_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray, float]  # gamma, beta, epsilon
    ffn_in: np.ndarray
    ffn_in_bias: np.ndarray
    ffn_out: np.ndarray
    ffn_out_bias: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray, float]
    head_dims: list[int]  # candidate attention head widths seen in the graph's reshapes


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _ancestors(graph: onnx.GraphProto, outputs: Sequence[str], stop: set[str]) -> list[onnx.NodeProto]:
    """The nodes `outputs` need, in graph order; the tensors in `stop` count as inputs."""
    producer = {out: node for node in graph.node for out in node.output}
    needed, todo = set(), [o for o in outputs if o not in stop]
    while todo:
        node = producer.get(todo.pop())
        if node is None or id(node) in needed:
            continue
        needed.add(id(node))
        todo.extend(i for i in node.input if i and i not in stop)
    return [n for n in graph.node if id(n) in needed]


def read_bert_layer(model: onnx.ModelProto) -> BertLayer:
    graph = model.graph
    values = _constants(graph)
    backbone = _ancestors(graph, ["hidden_out"], {"hidden", "attention_mask"})
    ops = [n.op_type for n in backbone]
    projections = [n for n in backbone if n.op_type == "MatMul" and n.input[1] in values]
    norms = [n for n in backbone if n.op_type == "LayerNormalization"]
    if len(projections) != 6 or len(norms) != 2 or "Erf" not in ops or "Softmax" not in ops:
        raise UnsupportedLayer(f"not a BERT layer ({len(projections)} weight MatMuls, {len(norms)} "
                               f"LayerNormalizations, erf GELU {'Erf' in ops})")
    consumers = _consumers(backbone)

    def norm(node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, float]:
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        return values[node.input[1]].astype(np.float32), values[node.input[2]].astype(np.float32), epsilon

    w = [values[n.input[1]].astype(np.float32) for n in projections]
    hidden = w[0].shape[0]
    shapes = [x.shape for x in w]
    if shapes[:4] != [(hidden, hidden)] * 4 or shapes[4][0] != hidden or shapes[5] != shapes[4][::-1]:
        raise UnsupportedLayer(f"projection shapes {shapes} are not BERT's")
    head_dims = _head_dims(backbone, values, hidden)
    b = [_bias(n, consumers, values) for n in projections]
    return BertLayer(hidden, np.concatenate(w[:3], axis=1), np.concatenate(b[:3]), w[3], b[3], norm(norms[0]),
                     w[4], b[4], w[5], b[5], norm(norms[1]), head_dims)


@dataclass
class SplicedHead:
    """An exit head copied as exported: every node `logits` needs beyond `hidden_out`."""
    nodes: list
    initializers: list


@dataclass
class FastBertHead:
    """FastBERT's exit (training/model.py FastBertHead), rebuilt on int8 projections and one
    MultiHeadAttention whose only query is [CLS]."""
    narrow: np.ndarray  # [hidden, width], input-major like every weight here
    narrow_bias: np.ndarray
    query: np.ndarray
    query_bias: np.ndarray
    kv: np.ndarray  # [width, 2 * width]: key | value
    kv_bias: np.ndarray
    dense: tuple[np.ndarray, np.ndarray]  # Gemm B (output-major, transB) and bias, as exported
    out: tuple[np.ndarray, np.ndarray]
    head_dims: list[int]


def head_subgraph(model: onnx.ModelProto) -> SplicedHead:
    nodes = _ancestors(model.graph, ["logits"], {"hidden_out", "hidden", "attention_mask"})
    used = {i for n in nodes for i in n.input}
    return SplicedHead(nodes, [t for t in model.graph.initializer if t.name in used])


def read_fastbert_head(model: onnx.ModelProto) -> FastBertHead:
    spliced = head_subgraph(model)
    values = _constants(model.graph)
    ops = [n.op_type for n in spliced.nodes]
    projections = [n for n in spliced.nodes if n.op_type == "MatMul" and n.input[1] in values]
    gemms = [n for n in spliced.nodes if n.op_type == "Gemm"]
    if (len(projections) != 4 or len(gemms) != 2 or ops.count("Tanh") != 2 or ops.count("Softmax") != 1
            or any(not any(a.name == "transB" and a.i == 1 for a in n.attribute) for n in gemms)):
        raise UnsupportedLayer("not a FastBERT exit head")
    consumers = _consumers(spliced.nodes)
    w = [values[n.input[1]].astype(np.float32) for n in projections]
    b = [_bias(n, consumers, values) for n in projections]
    width = w[0].shape[1]
    if [x.shape for x in w[1:]] != [(width, width)] * 3:
        raise UnsupportedLayer("not a FastBERT exit head")
    dense, out = ((values[n.input[1]].astype(np.float32), values[n.input[2]].astype(np.float32)) for n in gemms)
    return FastBertHead(w[0], b[0], w[1], b[1], np.concatenate(w[2:], axis=1), np.concatenate(b[2:]),
                        dense, out, _head_dims(spliced.nodes, values, width))


def _consumers(nodes) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _bias(matmul: onnx.NodeProto, consumers: dict, values: dict) -> np.ndarray:
    for node in consumers.get(matmul.output[0], []):
        if node.op_type == "Add":
            constant = [values[i] for i in node.input if i in values]
            if constant and constant[0].ndim == 1:
                return constant[0].astype(np.float32)
    raise UnsupportedLayer(f"projection {matmul.name} has no bias")


def _head_dims(nodes, values: dict, width: int) -> list[int]:
    """Candidate attention head widths: the last entries of the Reshape targets
    ([rows, tokens, heads, width] or [rows, tokens, -1, width])."""
    parts = [values[i] for n in nodes if n.op_type == "Concat" for i in n.input if i in values]
    return list(dict.fromkeys(int(v.ravel()[0]) for v in parts if v.size == 1 and 1 < v.ravel()[0] < width
                              and width % int(v.ravel()[0]) == 0)) or [64, 32]


# -- building -----------------------------------------------------------------------------------

@dataclass
class ActivationScale:
    scale: np.float32
    zero_point: np.uint8

    @classmethod
    def fit(cls, values: np.ndarray) -> ActivationScale:
        low = min(float(np.percentile(values, 100 - CLIP_PERCENTILE)), 0.0)
        high = max(float(np.percentile(values, CLIP_PERCENTILE)), 0.0)
        scale = max(high - low, 1e-8) / 255.0
        return cls(np.float32(scale), np.uint8(np.clip(round(-low / scale), 0, 255)))


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output column: (int8 weight, fp32 scale per column)."""
    scale = np.abs(weight).max(axis=0) / 127.0
    scale[scale == 0] = 1.0
    return np.clip(np.round(weight / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attributes) -> str:
        domain = "com.microsoft" if op in CONTRIB else ""
        self.nodes.append(H.make_node(op, inputs, [output], name=output, domain=domain, **attributes))
        return output

    def quantizer(self, tensor: str, scales: dict | None, key: str) -> tuple[str, ActivationScale] | None:
        if scales is None:
            return None
        s = scales[key]
        q = self.node("QuantizeLinear", [tensor, self.const(f"{key}_scale", s.scale),
                                         self.const(f"{key}_zero", s.zero_point)], f"{key}_u8")
        return q, s

    def linear(self, tensor: str, weight: np.ndarray, bias: np.ndarray, output: str,
               scales: dict | None, key: str) -> str:
        quantized = self.quantizer(tensor, scales, key)
        if quantized is None:
            product = self.node("MatMul", [tensor, self.const(f"{output}_w", weight)], f"{output}_mm")
            return self.node("Add", [product, self.const(f"{output}_b", bias)], output)
        q, s = quantized
        w8, w_scale = quantize_columns(weight)
        return self.node("MatMulIntegerToFloat", [
            q, self.const(f"{output}_w", w8), self.const(f"{output}_as", s.scale),
            self.const(f"{output}_ws", w_scale), self.const(f"{output}_az", s.zero_point),
            self.const(f"{output}_wz", np.zeros(w8.shape[1], np.int8)), self.const(f"{output}_b", bias)], output)


def probe_names(head) -> tuple[str, ...]:
    return PROBES + (HEAD_PROBES if isinstance(head, FastBertHead) else ())


def _fastbert_head(g: _Graph, head: FastBertHead, num_heads: int, scales: dict | None, lengths: str) -> None:
    narrowed = g.linear("hidden_out", head.narrow, head.narrow_bias, "fz_hn_in", scales, "hidden_out")
    states = g.node("Tanh", [narrowed], "fz_hn")
    kv = g.linear(states, head.kv, head.kv_bias, "fz_kv", scales, "fz_hn")
    width = head.query.shape[0]
    g.nodes.append(H.make_node("Split", [kv, g.const("fz_kv_split", np.array([width, width], np.int64))],
                               ["fz_k", "fz_v"], name="fz_kv_split", axis=2))
    one = g.const("fz_one", np.array([1], np.int64))
    cls = g.node("Slice", [states, g.const("fz_zero", np.array([0], np.int64)), one, one], "fz_cls")
    query = g.linear(cls, head.query, head.query_bias, "fz_q", None, "")  # one token a row: fp32
    pooled = g.node("MultiHeadAttention", [query, "fz_k", "fz_v", "", lengths], "fz_pooled", num_heads=num_heads)
    pooled = g.node("Squeeze", [pooled, one], "fz_pooled_rows")
    dense = g.node("Gemm", [pooled, g.const("fz_dense_w", head.dense[0]), g.const("fz_dense_b", head.dense[1])],
                   "fz_dense", transB=1)
    dense = g.node("Tanh", [dense], "fz_dense_tanh")
    g.node("Gemm", [dense, g.const("fz_out_w", head.out[0]), g.const("fz_out_b", head.out[1])], "logits", transB=1)


def build_layer(layer: BertLayer, num_heads: int, head: SplicedHead | FastBertHead, exit_heads: int = 0,
                scales: dict | None = None, probes: bool = False) -> onnx.ModelProto:
    """The fused layer: fp32 (`scales` None) or int8 with the given activation scales; with
    `probes` the tensors entering each quantiser are extra outputs (for calibration)."""
    g = _Graph()
    lengths = g.node("ReduceSum", ["attention_mask", g.const("fz_axis", np.array([1], np.int64))],
                     "fz_lengths64", keepdims=0)
    lengths = g.node("Cast", [lengths], "fz_lengths", to=TensorProto.INT32)
    x = "hidden"
    if probes:  # a graph input cannot be listed as an output under another name
        x = "fz_x"
        g.nodes.append(H.make_node("Identity", ["hidden"], [x], name=x))
    quantized = g.quantizer(x, scales, "fz_x")
    if quantized is None:
        ctx = g.node("Attention", [x, g.const("fz_qkv_w", layer.qkv), g.const("fz_qkv_b", layer.qkv_bias),
                                   lengths], "fz_ctx", num_heads=num_heads)
    else:
        q, s = quantized
        w8, w_scale = quantize_columns(layer.qkv)
        ctx = g.node("QAttention", [
            q, g.const("fz_qkv_w", w8), g.const("fz_qkv_b", layer.qkv_bias), g.const("fz_qkv_as", s.scale),
            g.const("fz_qkv_ws", w_scale), lengths, g.const("fz_qkv_az", s.zero_point),
            g.const("fz_qkv_wz", np.zeros(w8.shape[1], np.int8))], "fz_ctx", num_heads=num_heads)
    attended = g.linear(ctx, layer.out, layer.out_bias, "fz_attn", scales, "fz_ctx")
    gamma, beta, eps = layer.ln1
    h1 = g.node("SkipLayerNormalization", [attended, "hidden", g.const("fz_ln1_g", gamma),
                                           g.const("fz_ln1_b", beta)], "fz_h1", epsilon=eps)
    inner = g.linear(h1, layer.ffn_in, layer.ffn_in_bias, "fz_ffn_in", scales, "fz_h1")
    activated = g.node("Gelu", [inner], "fz_g")
    outer = g.linear(activated, layer.ffn_out, layer.ffn_out_bias, "fz_ffn_out", scales, "fz_g")
    gamma, beta, eps = layer.ln2
    g.node("SkipLayerNormalization", [outer, h1, g.const("fz_ln2_g", gamma), g.const("fz_ln2_b", beta)],
           "hidden_out", epsilon=eps)
    if isinstance(head, FastBertHead):
        _fastbert_head(g, head, exit_heads, scales, lengths)
    else:
        g.nodes.extend(head.nodes)
        g.initializers.extend(head.initializers)
    width = layer.hidden
    outputs = [H.make_tensor_value_info("hidden_out", TensorProto.FLOAT, ["rows", "tokens", width]),
               H.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", None])]
    if probes:
        outputs += [H.make_tensor_value_info(p, TensorProto.FLOAT, None) for p in probe_names(head)
                    if p != "hidden_out"]
    graph = H.make_graph(g.nodes, "fused_layer", [
        H.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", "tokens", width]),
        H.make_tensor_value_info("attention_mask", TensorProto.INT64, ["rows", "tokens"])], outputs,
        g.initializers)
    model = H.make_model(graph, opset_imports=[H.make_opsetid("", 17), H.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def session(model: onnx.ModelProto | Path):
    """A CPU session of a graph in memory or on disk, with the engine's options."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, sess_options=ort_session_options(0), providers=["CPUExecutionProvider"])


def check_inputs(width: int, real: Sequence[dict]) -> list[dict]:
    """Random padded batches (rows of different lengths) and a few real ones."""
    rng = np.random.default_rng(0)
    mask = np.ones((3, 11), np.int64)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    random = {"hidden": rng.normal(size=(3, 11, width)).astype(np.float32), "attention_mask": mask}
    return [random, *real[:4]]


def fused_fp32(source: onnx.ModelProto, feeds: Sequence[dict]) -> tuple:
    """(weights, head count, exit head, its head count) of a source layer whose fused fp32
    rebuild reproduces it on `feeds` within MATCH_TOLERANCE; UnsupportedLayer otherwise. A FastBERT
    exit is rebuilt too; any other exit head is copied as exported."""
    try:
        head = read_fastbert_head(source)
    except UnsupportedLayer:
        head = head_subgraph(source)
    return fit_heads(source, read_bert_layer(source), head, feeds)


def fit_heads(source: onnx.ModelProto, layer: BertLayer, head, feeds: Sequence[dict]) -> tuple:
    """The first head counts among the candidates whose rebuild reproduces `source`."""
    reference = session(source)
    expected = [reference.run(["hidden_out", "logits"], f) for f in feeds]
    exit_widths = head.head_dims if isinstance(head, FastBertHead) else [0]
    worst = {}
    for dim in layer.head_dims:
        for exit_dim in exit_widths:
            heads, exit_heads = layer.hidden // dim, exit_dim and head.query.shape[0] // exit_dim
            rebuilt = session(build_layer(layer, heads, head, exit_heads))
            got = [rebuilt.run(["hidden_out", "logits"], f) for f in feeds]
            diff = max(float(np.abs((a - b)[f["attention_mask"].astype(bool)] if a.ndim == 3 else a - b).max())
                       for e, o, f in zip(expected, got, feeds) for a, b in zip(e, o))
            if diff <= MATCH_TOLERANCE:
                return layer, heads, head, exit_heads
            worst[(heads, exit_heads)] = diff
    raise UnsupportedLayer("the fused rebuild does not reproduce the layer (max |diff| by head counts: "
                           + ", ".join(f"{k}: {v:.1e}" for k, v in worst.items()) + ")")


def quantize_layer(source: onnx.ModelProto, calibration: Sequence[dict]) -> onnx.ModelProto:
    """The int8 fused layer, its activation ranges fitted on `calibration` (one unpadded row a
    feed: padding would widen the ranges)."""
    layer, heads, head, exit_heads = fused_fp32(
        source, check_inputs(int(calibration[0]["hidden"].shape[-1]), calibration))
    probe = session(build_layer(layer, heads, head, exit_heads, probes=True))
    names = list(probe_names(head))
    seen = {p: [] for p in names}
    for feed in calibration:
        for name, value in zip(names, probe.run(names, feed)):
            seen[name].append(value.reshape(-1))
    scales = {name: ActivationScale.fit(np.concatenate(values)) for name, values in seen.items()}
    return build_layer(layer, heads, head, exit_heads, scales)
