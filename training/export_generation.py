"""Export a Seq2SeqStudent to the graphs of a generation bundle, and check them against PyTorch.

The graphs and their inputs and outputs are app/manifest.py GenerationSpec's. The decoder is cut
per layer, one position at a time with its self-attention cache passed in and out, so the engine
(app/generation.py) can send each token on through only as many layers as it needs and compact
the batch between layers; decoder_kv_NN fills the cache of a layer a token skipped.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from app.manifest import GenerationSpec, Verification
from training.export import OPSET
from training.seq2seq_model import Seq2SeqStudent, padding_bias

log = logging.getLogger(__name__)

ENCODER_FILE, CROSS_KV_FILE = "encoder.onnx", "cross_kv.onnx"
EMBED_FILE, PROJECTION_FILE = "decoder_embed.onnx", "output_projection.onnx"
# Float initializers above this many elements are stored as float16 by weights="fp16"; smaller
# ones (LayerNorms, biases) save nothing worth a Cast.
FP16_MIN_ELEMENTS = 4096
# fp32 ONNX Runtime against fp32 PyTorch, after several cached decoder steps (measured on tiny
# random models: ~1e-6; log-probs over a vocabulary are the largest numbers compared).
TOLERANCE = 1e-4


def layer_file(index: int) -> str:
    return f"decoder_layer_{index + 1:02d}.onnx"


def kv_file(index: int) -> str:
    return f"decoder_kv_{index + 1:02d}.onnx"


def kv_from_file(index: int) -> str:
    return f"decoder_kv_from_{index + 1:02d}.onnx"


class _Encoder(nn.Module):
    def __init__(self, model: Seq2SeqStudent):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model.encode(input_ids, attention_mask)


class _CrossKV(nn.Module):
    def __init__(self, model: Seq2SeqStudent):
        super().__init__()
        self.model = model

    def forward(self, memory):
        return self.model.cross_keys_values(memory)


class _Embed(nn.Module):
    def __init__(self, model: Seq2SeqStudent):
        super().__init__()
        self.model = model

    def forward(self, token_ids, positions):
        return self.model.embed(token_ids, positions)


class _DecoderLayer(nn.Module):
    """One decoder layer at one new position, with its own exit."""

    def __init__(self, model: Seq2SeqStudent, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden, past_key, past_value, cross_key, cross_value, attention_mask):
        layer = self.model.decoder_layers[self.index]
        out, key, value = layer(hidden[:, None, :], past_key, past_value, cross_key, cross_value, None,
                                padding_bias(attention_mask))
        out = out[:, 0]
        exit_hidden, uncertainty = self.model.exit_state(self.index, out)
        return out, key, value, exit_hidden, uncertainty


class _KVFill(nn.Module):
    def __init__(self, model: Seq2SeqStudent, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden):
        return self.model.decoder_layers[self.index].self_keys_values(hidden[:, None, :])


class _Projection(nn.Module):
    def __init__(self, model: Seq2SeqStudent):
        super().__init__()
        self.model = model

    def forward(self, exit_hidden):
        return F.log_softmax(self.model.project(exit_hidden), dim=-1)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    module.eval()  # the exporter restores the wrapper's mode, recursively (training/export.py)
    torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs, dynamic_axes=axes,
                      opset_version=OPSET, dynamo=False, do_constant_folding=True)


def store_fp16(path: Path, min_elements: int = FP16_MIN_ELEMENTS) -> None:
    """Float initializers of `path` larger than min_elements stored as float16 behind a Cast to
    float32: the file halves, and ONNX Runtime folds the Cast at load, so compute stays fp32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    casts, kept = [], []
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT and int(np.prod(init.dims)) > min_elements:
            half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "__fp16")
            kept.append(half)
            casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT,
                                          name=init.name + "__cast"))
        else:
            kept.append(init)
    if not casts:
        return
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(graph_model, str(path))


def _on_cpu(model: Seq2SeqStudent) -> Seq2SeqStudent:
    """The model in eval mode on the CPU; a copy when it is elsewhere (training may have left it
    on a GPU, and the caller keeps it there)."""
    if model.embedding.weight.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    return model.eval()


@torch.no_grad()
def round_weights_to_fp16(model: Seq2SeqStudent) -> Seq2SeqStudent:
    """Every float parameter and buffer rounded to float16 and back, in place: what the fp16
    graphs hold, so that PyTorch (verification, training-time ROUGE) computes what they compute."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(torch.float16).to(tensor.dtype))
    return model


@torch.no_grad()
def export_generation(model: Seq2SeqStudent, out_dir: Path, weights: str = "fp32",
                      fp16_min_elements: int = FP16_MIN_ELEMENTS) -> dict:
    """Write every graph of GenerationSpec to out_dir; returns its graph fields (file names).
    weights="fp16" (initializers over fp16_min_elements stored as float16): call
    round_weights_to_fp16(model) first."""
    if weights not in ("fp32", "fp16"):
        raise ValueError(f"weights must be fp32 or fp16, not {weights!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _on_cpu(model)
    cfg, layers = model.config, len(model.decoder_layers)
    # Example shapes avoid 1 on every dynamic axis (the tracer would keep a 1 as a constant).
    rows, source, past = 2, 5, 3
    ids = torch.randint(4, cfg.vocab_size, (rows, source))
    mask = torch.ones(rows, source, dtype=torch.long)
    mask[1, -2:] = 0
    memory = model.encode(ids, mask)
    cross_key, cross_value = model.cross_keys_values(memory)
    hidden = torch.randn(rows, cfg.d_model)
    past_kv = torch.randn(rows, cfg.num_heads, past, cfg.head_dim)
    by_rows = {0: "rows"}

    _export(_Encoder(model), (ids, mask), out_dir / ENCODER_FILE, ["input_ids", "attention_mask"], ["memory"],
            {n: {0: "rows", 1: "source"} for n in ("input_ids", "attention_mask", "memory")})
    _export(_CrossKV(model), (memory,), out_dir / CROSS_KV_FILE, ["memory"], ["cross_key", "cross_value"],
            {"memory": {0: "rows", 1: "source"}, "cross_key": {1: "rows", 3: "source"},
             "cross_value": {1: "rows", 3: "source"}})
    _export(_Embed(model), (torch.tensor([cfg.bos_id, cfg.eos_id]), torch.tensor([0, 2])), out_dir / EMBED_FILE,
            ["token_ids", "positions"], ["hidden"], {"token_ids": by_rows, "positions": by_rows, "hidden": by_rows})
    cache = {0: "rows", 2: "past"}
    layer_axes = {"hidden": by_rows, "past_key": cache, "past_value": cache, "cross_key": {0: "rows", 2: "source"},
                  "cross_value": {0: "rows", 2: "source"}, "attention_mask": {0: "rows", 1: "source"},
                  "hidden_out": by_rows, "present_key": {0: "rows", 2: "present"},
                  "present_value": {0: "rows", 2: "present"}, "exit_hidden": by_rows, "exit_uncertainty": by_rows}
    for i in range(layers):
        _export(_DecoderLayer(model, i), (hidden, past_kv, past_kv, cross_key[i], cross_value[i], mask),
                out_dir / layer_file(i),
                ["hidden", "past_key", "past_value", "cross_key", "cross_value", "attention_mask"],
                ["hidden_out", "present_key", "present_value", "exit_hidden", "exit_uncertainty"], layer_axes)
        _export(_KVFill(model, i), (hidden,), out_dir / kv_file(i), ["hidden"], ["key", "value"],
                {"hidden": by_rows, "key": by_rows, "value": by_rows})
    _export(_Projection(model), (hidden,), out_dir / PROJECTION_FILE, ["exit_hidden"], ["log_probs"],
            {"exit_hidden": by_rows, "log_probs": by_rows})
    add_top_tokens(out_dir / PROJECTION_FILE)
    graphs = dict(encoder=ENCODER_FILE, cross_kv=CROSS_KV_FILE, embed=EMBED_FILE,
                  layers=[layer_file(i) for i in range(layers)], kv_fill=[kv_file(i) for i in range(layers)],
                  projection=PROJECTION_FILE)
    if weights == "fp16":
        for name in (ENCODER_FILE, CROSS_KV_FILE, EMBED_FILE, PROJECTION_FILE, *graphs["layers"], *graphs["kv_fill"]):
            store_fp16(out_dir / name, fp16_min_elements)
    graphs["kv_fill_from"] = write_kv_fill_from(out_dir, graphs["kv_fill"])
    return graphs


def write_kv_fill_from(out_dir: Path, kv_fill: list[str]) -> list[str]:
    """GenerationSpec's kv_fill_from, written beside the kv_fill graphs they are made of: graph j
    holds kv_fill[j:] side by side, on one input, their keys and values stacked, so a token that
    leaves costs one call for all the layers it skips rather than one call a layer. The nodes are
    the kv_fill graphs' own, renamed, so the entries are the same numbers."""
    import onnx
    from onnx import compose, helper, numpy_helper

    parts = [onnx.load(str(Path(out_dir) / name)) for name in kv_fill]
    written = []
    for first in range(len(parts)):
        nodes, initializers, stacked = [], [numpy_helper.from_array(np.array([0], dtype=np.int64), "axis_0")], {}
        for i in range(first, len(parts)):
            part = compose.add_prefix(parts[i], f"layer_{i + 1}/")
            for node in part.graph.node:
                node.input[:] = ["hidden" if name == f"layer_{i + 1}/hidden" else name for name in node.input]
            nodes.extend(part.graph.node)
            initializers.extend(part.graph.initializer)
            for output in ("key", "value"):
                name = f"layer_{i + 1}/{output}"
                nodes.append(helper.make_node("Unsqueeze", [name, "axis_0"], [name + "_stacked"]))
                stacked.setdefault(output, []).append(name + "_stacked")
        for output, names in stacked.items():
            nodes.append(helper.make_node("Concat", names, [output], axis=0))
        source = parts[first].graph
        outputs = []
        for out in source.output:
            dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
            outputs.append(helper.make_tensor_value_info(out.name, out.type.tensor_type.elem_type,
                                                         [len(parts) - first, *dims]))
        graph = helper.make_graph(nodes, f"kv_fill_from_{first + 1}", list(source.input), outputs, initializers)
        joined = helper.make_model(graph, opset_imports=list(parts[first].opset_import))
        joined.ir_version = parts[first].ir_version
        onnx.checker.check_model(joined)
        onnx.save(joined, str(Path(out_dir) / kv_from_file(first)))
        written.append(kv_from_file(first))
    return written


def add_top_tokens(path: Path) -> None:
    """The projection graph gets an input k and a TopK over its log-probs: top_log_probs and
    top_ids [rows, k], best first, ties by lower id, so the search reads a few candidates per
    hypothesis instead of scanning the vocabulary (app/search.py step_top)."""
    import onnx
    from onnx import TensorProto, helper

    graph_model = onnx.load(str(path))
    graph = graph_model.graph
    graph.input.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
    graph.node.append(helper.make_node("TopK", ["log_probs", "k"], ["top_log_probs", "top_ids"], axis=-1,
                                       largest=1, sorted=1, name="top_tokens"))
    graph.output.extend([helper.make_tensor_value_info("top_log_probs", TensorProto.FLOAT, ["rows", "k"]),
                         helper.make_tensor_value_info("top_ids", TensorProto.INT64, ["rows", "k"])])
    onnx.checker.check_model(graph_model)
    onnx.save(graph_model, str(path))


def _random_sources(cfg, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    length = max(3, min(cfg.max_source_length, 12))
    ids = rng.integers(4, cfg.vocab_size, size=(rows, length), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(rng.integers(2, length + 1, size=rows)):
        mask[row, :n] = 1
    mask[0] = 1  # one row as long as the batch
    ids[:, 0], ids[mask == 0] = cfg.bos_id, cfg.pad_id
    return ids, mask


@torch.no_grad()
def verify_generation(model: Seq2SeqStudent, bundle_dir: Path, spec: GenerationSpec, *, rows: int = 3,
                      steps: int = 6, seed: int = 0, tolerance: float = TOLERANCE) -> Verification:
    """ONNX against PyTorch on random ragged sources, token by token through the caches.

    Each side runs on its own states (the ONNX one on the graphs' outputs), every token through
    every layer; compared: the encoder's memory and cross K/V, then at each step every layer's
    hidden_out, present K/V, exit_uncertainty, its kv_fill entries and its exit's log-probs.
    max_abs_logit_diff is per decoder layer, the largest of those of that layer."""
    from app.generation import DecoderGraphs

    model = _on_cpu(model)  # ONNX Runtime's CPU kernels against PyTorch's: a GPU's would differ more
    cfg, layers = model.config, len(model.decoder_layers)
    graphs = DecoderGraphs(Path(bundle_dir), spec, threads=1)
    ids, mask = _random_sources(cfg, rows, seed)
    rng = np.random.default_rng(seed + 1)
    tokens = rng.integers(4, cfg.vocab_size, size=(steps, rows), dtype=np.int64)
    tokens[0] = cfg.bos_id
    worst = np.zeros(layers)

    def diff(a, b) -> float:
        return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32)).max(initial=0.0))

    memory = model.encode(torch.from_numpy(ids), torch.from_numpy(mask))
    cross_key, cross_value = model.cross_keys_values(memory)
    onnx_memory = graphs.encode(ids, mask)
    onnx_cross_key, onnx_cross_value = graphs.cross_kv(onnx_memory)
    worst_encoder = max(diff(memory, onnx_memory), diff(cross_key, onnx_cross_key),
                        diff(cross_value, onnx_cross_value))
    bias = padding_bias(torch.from_numpy(mask))
    empty = np.zeros((rows, cfg.num_heads, 0, cfg.head_dim), dtype=np.float32)
    keys, values = [torch.from_numpy(empty)] * layers, [torch.from_numpy(empty)] * layers
    onnx_keys, onnx_values = [empty] * layers, [empty] * layers
    for t in range(steps):
        positions = np.full(rows, t, dtype=np.int64)
        x = model.embed(torch.from_numpy(tokens[t]), torch.from_numpy(positions))
        h = graphs.embed(tokens[t], positions)
        worst_encoder = max(worst_encoder, diff(x, h))
        for i, layer in enumerate(model.decoder_layers):
            fill_key, fill_value = layer.self_keys_values(x[:, None])
            onnx_fill_key, onnx_fill_value = graphs.kv_fill(i, h)
            out, keys[i], values[i] = layer(x[:, None], keys[i], values[i], cross_key[i], cross_value[i], None, bias)
            x = out[:, 0]
            normed, uncertainty = model.exit_state(i, x)
            log_probs = torch.log_softmax(model.project(normed), dim=-1)
            h, onnx_keys[i], onnx_values[i], onnx_normed, onnx_uncertainty = graphs.layer(
                i, h, onnx_keys[i], onnx_values[i], onnx_cross_key[i], onnx_cross_value[i], mask)
            worst[i] = max(worst[i], diff(x, h), diff(keys[i], onnx_keys[i]), diff(values[i], onnx_values[i]),
                           diff(uncertainty, onnx_uncertainty), diff(fill_key, onnx_fill_key),
                           diff(fill_value, onnx_fill_value), diff(log_probs, graphs.project(onnx_normed)))
    per_layer = [max(float(w), worst_encoder) for w in worst]
    passed = bool(max(per_layer) <= tolerance)
    log.info("generation graphs against PyTorch: max |diff| encoder %.2e, decoder layers %s", worst_encoder,
             ", ".join(f"{w:.2e}" for w in worst))
    return Verification(passed=passed, tolerance=tolerance, max_abs_logit_diff=per_layer,
                        inputs=[f"random: {rows} ragged sources, {steps} cached decoder steps"])


def add_kv_fill_from(bundle_dir: Path) -> list[str]:
    """A bundle made before kv_fill_from gets it, from its own kv_fill graphs, in its manifest and
    file list (python -c "from training.export_generation import add_kv_fill_from; add_kv_fill_from(...)")."""
    from app.manifest import describe_file, read_manifest, write_manifest

    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if manifest.generation is None:
        raise ValueError(f"{bundle_dir}: not a generation bundle")
    names = write_kv_fill_from(bundle_dir, manifest.generation.kv_fill)
    files = [f for f in manifest.files if f.path not in names] + [describe_file(bundle_dir, n) for n in names]
    write_manifest(bundle_dir, manifest.model_copy(update={
        "generation": manifest.generation.model_copy(update={"kv_fill_from": names}),
        "files": sorted(files, key=lambda f: f.path)}))
    read_manifest(bundle_dir)  # validates what was written
    return names
