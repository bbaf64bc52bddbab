"""The peer runtimes of `bench.peers`: the same full-depth classifier built for each runtime a
user would pick instead of offramp. Every builder imports its package when it runs, so this
module imports without torch; a missing package makes that peer `PeerSkipped`.

Each peer is `Peer(name, predict, details)`: `predict(EncodedBatch) -> logits [rows, classes]`,
fed the same numpy id arrays the offramp engine gets (any conversion is part of its time).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from app.backends import shared_thread_pool
from app.encoding import EncodedBatch, TextEncoder
from app.manifest import Manifest
from bench.report import BenchError, pytorch_classifier, resolve_checkpoint

PEERS = ("torch", "ort", "ort-int8", "openvino", "openvino-int8", "ct2-int8")
INSTALL_HINT = "pip install 'offramp[bench]'"
RANDOM_HEAD = "random-head (speed only)"
OPSET = 17
FEEDS = ("input_ids", "attention_mask", "token_type_ids")


class PeerSkipped(Exception):
    """This peer cannot run here; the message says why."""


@dataclass
class Peer:
    name: str
    predict: Callable[[EncodedBatch], np.ndarray]
    details: dict = field(default_factory=dict)


@dataclass
class PeerSource:
    """What every peer is built from: one checkpoint folder (the bundle's own, or a staged
    random-head one), the bundle's tokenizer, the thread count and a scratch folder."""

    checkpoint: Path
    manifest: Manifest
    encoder: TextEncoder
    tokenizer_file: Path
    threads: int
    work: Path
    calibration: Callable[[], tuple[list[EncodedBatch], dict]]
    _graphs: dict = field(default_factory=dict)

    def onnx(self) -> Path:
        """The whole model (backbone + teacher head) as one ONNX graph, eager attention."""
        if "plain" not in self._graphs:
            self._graphs["plain"] = export_onnx(self, self.work / "model.onnx")
        return self._graphs["plain"]

    def fused(self) -> tuple[Path, dict]:
        """`onnx()` through onnxruntime.transformers' BERT fusion; (path, fused op counts)."""
        if "fused" not in self._graphs:
            from onnxruntime.transformers.optimizer import optimize_model

            config = _config(self.checkpoint)
            # opt_level 0: the fusions alone, no ONNX Runtime session (which would make its own
            # thread pool, refused once the process has the global one); the peer's session
            # applies ONNX Runtime's graph optimisations when it loads, as at any level.
            optimized = optimize_model(str(self.onnx()), model_type="bert",
                                       num_heads=config["num_attention_heads"],
                                       hidden_size=config["hidden_size"], opt_level=0)
            path = self.work / "model.fused.onnx"
            optimized.save_model_to_file(str(path))
            stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
            self._graphs["fused"] = (path, stats)
        return self._graphs["fused"]


def _config(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / "config.json").read_text())


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()  # the missing-pooler load report, every load


# -- the weights every peer runs -----------------------------------------------------------------

def stage_random_head(manifest: Manifest, work: Path) -> Path:
    """A checkpoint of the bundle's architecture from its teacher backbone, with a random
    classifier: the peers' speed is meaningful, their accuracy is not."""
    from training.model import EarlyExitModel, load_backbone

    _quiet_transformers()
    backbone = load_backbone(manifest.provenance.teacher)
    config = backbone.config
    if config.hidden_size != manifest.hidden_size or len(backbone.encoder.layer) < manifest.num_layers:
        raise ValueError(f"{len(backbone.encoder.layer)} layers of width {config.hidden_size}, the bundle "
                         f"has {manifest.num_layers} of width {manifest.hidden_size}")
    # A student distilled from a deeper teacher: keep the bundle's depth.
    del backbone.encoder.layer[manifest.num_layers:]
    config.num_hidden_layers = manifest.num_layers
    model = EarlyExitModel(backbone, len(manifest.labels), manifest.exit_head,
                           teacher_head=manifest.teacher_head)
    path = Path(work) / "random-head-checkpoint"
    model.save(path, {"labels": list(manifest.labels)})
    return path


def peer_weights(manifest: Manifest, checkpoint: Path | None, work: Path) -> tuple[Path, str, str | None]:
    """(checkpoint folder the peers load, "checkpoint" or RANDOM_HEAD, why no checkpoint)."""
    if checkpoint is not None:
        return resolve_checkpoint(manifest, checkpoint), "checkpoint", None
    try:
        return resolve_checkpoint(manifest, None), "checkpoint", None
    except BenchError as exc:
        reason = str(exc)
    try:
        return stage_random_head(manifest, work), RANDOM_HEAD, reason
    except Exception as exc:  # noqa: BLE001 - any failure to load the teacher means the same
        raise BenchError(f"no checkpoint for the peers ({reason}), and the bundle's architecture "
                         f"cannot be built from its teacher {manifest.provenance.teacher!r} "
                         f"({type(exc).__name__}: {exc}); pass --checkpoint DIR") from exc


# -- builders ----------------------------------------------------------------------------------

def export_onnx(src: PeerSource, path: Path) -> Path:
    import torch

    module, _ = pytorch_classifier(src.checkpoint, src.manifest, attn_implementation="eager")
    sample = src.encoder.encode(["an example sentence of a few words to trace the graph", "short"])
    args = tuple(torch.from_numpy(getattr(sample, k)) for k in FEEDS)
    axes = {0: "batch", 1: "tokens"}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=list(FEEDS), output_names=["logits"],
                          dynamic_axes={**{k: axes for k in FEEDS}, "logits": {0: "batch"}},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)
    return path


def _feeds(batch: EncodedBatch, wanted) -> dict[str, np.ndarray]:
    return {k: getattr(batch, k) for k in FEEDS if k in wanted}


def build_torch(src: PeerSource) -> Peer:
    import torch
    import transformers

    _quiet_transformers()
    module, _ = pytorch_classifier(src.checkpoint, src.manifest)  # transformers' default attention
    torch.set_num_threads(src.threads)  # run_peers has set it already; a peer built alone too

    def predict(batch: EncodedBatch) -> np.ndarray:
        with torch.inference_mode():
            return module(*(torch.from_numpy(getattr(batch, k)) for k in FEEDS)).numpy()

    return Peer("torch", predict, {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "attn_implementation": getattr(module.model.backbone.config, "_attn_implementation", None),
        "threads": torch.get_num_threads(), "precision": "fp32"})


def ort_peer_pool() -> str:
    """The pool the ort peers run on: the engine's, as ONNX Runtime allows no other once the
    process has its global pool (bench.peers --spin-wait on)."""
    return "per session, no spinning" if shared_thread_pool() is None else "global, spin-waiting"


def _ort_peer(name: str, path: Path, threads: int, details: dict) -> Peer:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if shared_thread_pool() is not None:  # ONNX Runtime's global pool: it always spins
        options.use_per_session_threads = False
    else:  # as offramp's engine: its own pool, sleeping between calls
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}

    def predict(batch: EncodedBatch) -> np.ndarray:
        return session.run(None, _feeds(batch, wanted))[0]

    return Peer(name, predict, {"onnxruntime": ort.__version__, "opset": OPSET,
                                "graph_bytes": path.stat().st_size, "threads": threads,
                                "thread_pool": ort_peer_pool(), **details})


def build_ort(src: PeerSource) -> Peer:
    path, stats = src.fused()
    return _ort_peer("ort", path, src.threads, {"precision": "fp32", "fused_operators": stats})


def build_ort_int8(src: PeerSource) -> Peer:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused, stats = src.fused()
    path = src.work / "model.fused.int8.onnx"
    # ONNX shape inference does not know the fused contrib ops: their outputs are fp32.
    quantize_dynamic(str(fused), str(path), weight_type=QuantType.QInt8,
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return _ort_peer("ort-int8", path, src.threads, {
        "precision": "int8 weights (quantize_dynamic, QInt8), activations quantised per batch",
        "fused_operators": stats})


def _type_name(value) -> str:
    return value.get_type_name() if hasattr(value, "get_type_name") else str(value)  # "f32", "bf16"


def _openvino_peer(name: str, model, threads: int, precision: str | None, details: dict) -> Peer:
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    wanted = {i.get_any_name() for i in compiled.inputs}

    def predict(batch: EncodedBatch) -> np.ndarray:
        request.infer(_feeds(batch, wanted))
        return request.get_output_tensor(0).data.copy()

    return Peer(name, predict, {
        "openvino": ov.__version__, "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        "streams": int(compiled.get_property("NUM_STREAMS")), "performance_hint": "LATENCY",
        "inference_precision_hint": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "cpu_default_inference_precision_hint": _type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
        **details})


def build_openvino(src: PeerSource) -> Peer:
    import openvino as ov

    # As a user gets it: the CPU's default precision (bf16 on a CPU with AVX-512 BF16 or AMX,
    # which is faster than f32 there), recorded in the details.
    return _openvino_peer("openvino", ov.Core().read_model(str(src.onnx())), src.threads, None,
                          {"precision": "fp32 weights, the CPU's default inference precision",
                           "source": "the unfused ONNX graph"})


def build_openvino_int8(src: PeerSource) -> Peer:
    import nncf
    import openvino as ov

    rows, info = src.calibration()
    model = ov.Core().read_model(str(src.onnx()))
    wanted = {i.get_any_name() for i in model.inputs}
    quantized = nncf.quantize(model, nncf.Dataset([_feeds(b, wanted) for b in rows]),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(rows))
    # The CPU's default precision for what NNCF left unquantised (bf16 where the CPU has it).
    return _openvino_peer("openvino-int8", quantized, src.threads, None, {
        "precision": "int8 (NNCF post-training, static activation scales)", "nncf": nncf.__version__,
        "calibration": info})


def _hf_tokenizer(tokenizer_file: Path):
    import transformers

    specials = {}
    model = json.loads(Path(tokenizer_file).read_text()).get("model", {})
    if model.get("unk_token"):
        specials["unk_token"] = model["unk_token"]
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **specials)


def build_ct2_int8(src: PeerSource) -> Peer:
    import ctranslate2
    import torch

    _quiet_transformers()
    module, meta = pytorch_classifier(src.checkpoint, src.manifest)
    if meta.get("backbone_kind"):
        raise PeerSkipped(f"CTranslate2 converts transformers models; this checkpoint's backbone is "
                          f"{meta['backbone_kind']}")

    class Converter(ctranslate2.converters.TransformersConverter):
        def load_model(self, model_class, name, **kwargs):
            model = super().load_model(model_class, name, **kwargs)
            # transformers 5 dropped the option (BERT has absolute positions only); the converter asserts it.
            if not hasattr(model.config, "position_embedding_type"):
                model.config.position_embedding_type = "absolute"
            return model

        def load_tokenizer(self, tokenizer_class, name, **kwargs):
            try:
                return super().load_tokenizer(tokenizer_class, name, **kwargs)
            except Exception:  # noqa: BLE001 - e.g. a checkpoint with a bare tokenizer.json
                return _hf_tokenizer(src.tokenizer_file)

    out = src.work / "ct2-int8"
    try:
        Converter(str(src.checkpoint)).convert(str(out), quantization="int8", force=True)
    except (ValueError, AssertionError, NotImplementedError, KeyError, AttributeError) as exc:
        raise PeerSkipped(f"the CTranslate2 converter cannot convert this backbone: "
                          f"{type(exc).__name__}: {exc}") from exc
    encoder = ctranslate2.Encoder(str(out), device="cpu", intra_threads=src.threads,
                                  inter_threads=1, compute_type="int8")
    head = module.model.heads[-1]

    def predict(batch: EncodedBatch) -> np.ndarray:
        ids = ctranslate2.StorageView.from_array(np.ascontiguousarray(batch.input_ids, dtype=np.int32))
        lengths = ctranslate2.StorageView.from_array(batch.attention_mask.sum(1).astype(np.int32))
        types = batch.token_type_ids.tolist() if batch.token_type_ids.any() else None
        hidden = np.array(encoder.forward_batch(ids, lengths, types).last_hidden_state)
        with torch.inference_mode():
            return head(torch.from_numpy(hidden), torch.from_numpy(batch.attention_mask)).numpy()

    return Peer("ct2-int8", predict, {
        "ctranslate2": ctranslate2.__version__, "compute_type": encoder.compute_type,
        "threads": src.threads, "precision": "int8 encoder (CTranslate2), fp32 teacher head (PyTorch)"})


BUILDERS = {"torch": build_torch, "ort": build_ort, "ort-int8": build_ort_int8,
            "openvino": build_openvino, "openvino-int8": build_openvino_int8,
            "ct2-int8": build_ct2_int8}


def build_peer(name: str, src: PeerSource) -> Peer:
    """The peer, or PeerSkipped naming the missing package and the extra that installs it."""
    try:
        return BUILDERS[name](src)
    except ImportError as exc:
        package = exc.name or str(exc)
        raise PeerSkipped(f"{name} needs the Python package {package!r} ({INSTALL_HINT}): {exc}") from exc
