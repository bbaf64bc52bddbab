"""Execution backends of the engine: ONNX Runtime (CPU, CUDA) and OpenVINO (CPU).

Each runs a bundle's graphs one at a time, holding a layer's hidden states in whatever form the
next layer takes them (numpy, or an ONNX Runtime value on the GPU); the engine above them owns
the exit rule and never sees the difference. One backend serves a bundle: a row's answer never
depends on which runtime its batch size would have picked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from app.encoding import EncodedBatch
from app.manifest import Manifest

log = logging.getLogger(__name__)

ORT_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_NAMES = ("cpu", "cuda", "openvino")
# On the CPU, a graph call this small (rows x tokens) runs faster on one thread than on several:
# waking the pool costs more than it shares (measured, MiniLM int8 layer: 1 thread 364 rows/s
# against 2 threads 277 at one row of ~25 tokens; level at ~60 tokens; docs/benchmarks.md).
SINGLE_THREAD_TOKENS = 64


# One intra-op pool for every session of the process (ONNX Runtime's global thread pool), or None:
# a pool per session. Shared, the pool's threads go straight from one layer's call to the next
# instead of waking a sleeping pool each time; its threads spin-wait (ONNX Runtime's global pools
# always do), which per-session pools must not: an idle session's spinning threads would take
# the CPU from the running one. Measured in docs/benchmarks.md; off by default.
_shared_pool_threads: int | None = None


def use_shared_thread_pool(threads: int) -> None:
    """Every ONNX Runtime session this process creates from now on runs on one pool of `threads`
    threads. Call before the process's first session: ONNX Runtime ignores it afterwards."""
    import onnxruntime as ort

    global _shared_pool_threads
    if _shared_pool_threads is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads


def shared_thread_pool() -> int | None:
    return _shared_pool_threads


class BackendUnavailable(RuntimeError):
    """The requested runtime is not installed."""


def ort_providers(provider: str) -> list[str]:
    """The providers to ask ONNX Runtime for; CUDA falls back to CPU with a warning."""
    import onnxruntime as ort

    if provider == "cuda":
        if ORT_PROVIDERS["cuda"] in ort.get_available_providers():
            return [ORT_PROVIDERS["cuda"], ORT_PROVIDERS["cpu"]]
        log.warning("CUDA provider requested but not available in onnxruntime; using CPU")
    return [ORT_PROVIDERS["cpu"]]


def ort_session_options(intra_op_threads: int, denormal_as_zero: bool = False):
    """Options of every offramp session: many small sessions per bundle, one running at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _shared_pool_threads is not None:  # the process's one pool (use_shared_thread_pool)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # One session per layer: threads spinning in idle sessions would steal the CPU
        # from the session that is running.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # No CPU memory arena: with ever-changing shapes (rows x tokens) it keeps the peak of
    # every shape it has seen, so memory climbs with each new longest batch (one batch of
    # 32 long rows took a process from 250 to 807 MB, for good); without it memory
    # follows the work and speed is the same (measured: docs/serving.md).
    options.enable_cpu_mem_arena = False
    if denormal_as_zero:
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def _embedding_feeds(batch: EncodedBatch, wanted: set[str]) -> dict[str, np.ndarray]:
    # Position-only embeddings need no mask, and the exporter drops unused inputs.
    feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
             "token_type_ids": batch.token_type_ids}
    return {k: v for k, v in feeds.items() if k in wanted}


class OrtBackend:
    def __init__(self, bundle_dir: Path, manifest: Manifest, provider: str, threads: int,
                 io_binding: bool | None = None):
        import onnxruntime as ort

        self._ort = ort
        self.providers = ort_providers(provider)

        def session(name: str, opts):
            return ort.InferenceSession(str(bundle_dir / name), sess_options=opts, providers=self.providers)

        wide = ort_session_options(threads)
        self.embeddings = session(manifest.graphs.embeddings, wide)
        self.layers = [session(name, wide) for name in manifest.graphs.layers]
        # A multi-task bundle's layers are its shared trunk (hidden_out alone); every task has
        # its own exit head per layer (app/multitask.py).
        head_files = [task.exits for task in manifest.tasks or []]
        self.heads = [[session(name, wide) for name in files] for files in head_files]
        self.active_provider = self.embeddings.get_providers()[0]
        self._embedding_inputs = {i.name for i in self.embeddings.get_inputs()}
        self._layer_outputs = [[o.name for o in s.get_outputs()] for s in self.layers]
        # With I/O binding the hidden states stay on the provider's device from layer to
        # layer; only the small logits come back. Default: on wherever the device is not the CPU.
        self.device = "cuda" if self.active_provider == ORT_PROVIDERS["cuda"] else "cpu"
        self.io_binding = self.device != "cpu" if io_binding is None else io_binding
        # Small calls on the CPU go to one-thread twins of the layer sessions (same graphs, same
        # kernels: the answer does not change, only who computes it).
        self.narrow_layers = self.narrow_heads = None
        if self.device == "cpu" and threads > 1 and _shared_pool_threads is None:
            narrow = ort_session_options(1)
            self.narrow_layers = [session(name, narrow) for name in manifest.graphs.layers]
            self.narrow_heads = [[session(name, narrow) for name in files] for files in head_files]

    def _bound_run(self, session, inputs: dict, outputs: dict[str, str]) -> list:
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, device in outputs.items():
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def embed(self, batch: EncodedBatch):
        feeds = _embedding_feeds(batch, self._embedding_inputs)
        if not self.io_binding:
            return self.embeddings.run(None, feeds)[0]
        (hidden,) = self._bound_run(self.embeddings, feeds, {"hidden": self.device})
        return hidden

    def layer(self, index: int, hidden, attention_mask: np.ndarray):
        """Layer `index` (0-based) -> (hidden states, exit logits as numpy); the logits are None
        for a multi-task bundle's shared layer, which has no exit of its own."""
        feeds = {"hidden": hidden, "attention_mask": attention_mask}
        names = self._layer_outputs[index]
        if not self.io_binding:
            sessions = self.layers
            if self.narrow_layers is not None and attention_mask.size <= SINGLE_THREAD_TOKENS:
                sessions = self.narrow_layers
            outputs = dict(zip(names, sessions[index].run(None, feeds)))
            return outputs["hidden_out"], outputs.get("logits")
        # Only the outputs the graph has can be bound.
        devices = {"hidden_out": self.device, "logits": "cpu"}
        bound = {n: devices[n] for n in names if n in devices}
        outputs = dict(zip(bound, self._bound_run(self.layers[index], feeds, bound)))
        logits = outputs.get("logits")
        return outputs["hidden_out"], None if logits is None else logits.numpy()

    def head(self, task: int, index: int, hidden, attention_mask: np.ndarray) -> np.ndarray:
        """A multi-task bundle's exit of task `task` (position in manifest.tasks) after layer
        `index` (0-based) -> logits as numpy, [rows, classes] (a regression task: [rows, 1])."""
        feeds = {"hidden": hidden, "attention_mask": attention_mask}
        if not self.io_binding:
            sessions = self.heads
            if self.narrow_heads is not None and attention_mask.size <= SINGLE_THREAD_TOKENS:
                sessions = self.narrow_heads
            return sessions[task][index].run(["logits"], feeds)[0]
        (logits,) = self._bound_run(self.heads[task][index], feeds, {"logits": "cpu"})
        return logits.numpy()

    def select(self, hidden, rows: np.ndarray, longest: int):
        """The staying rows, trimmed to their longest; on the device this is one round trip,
        paid only at layers where some but not all rows leave."""
        if not self.io_binding:
            return hidden[rows, :longest]
        kept = np.ascontiguousarray(hidden.numpy()[rows, :longest])
        return self._ort.OrtValue.ortvalue_from_numpy(kept, self.device, 0)

    def to_numpy(self, hidden) -> np.ndarray:
        return hidden if isinstance(hidden, np.ndarray) else hidden.numpy()


class OpenVinoBackend:
    """OpenVINO's CPU runtime on the bundle's ONNX graphs (int8 QDQ graphs run its int8 kernels).

    Precision is pinned to f32 for what is not quantised: OpenVINO's default on CPUs with
    AVX-512 BF16 is bf16, whose rounding would make a row's answer depend on the graph's shapes.
    """

    active_provider = "OpenVINOExecutionProvider"
    io_binding = False
    device = "cpu"

    def __init__(self, bundle_dir: Path, manifest: Manifest, threads: int, precision: str = "f32"):
        try:
            import openvino as ov
        except ImportError as exc:
            raise BackendUnavailable(
                "provider openvino needs the openvino package: pip install 'offramp[openvino]'"
            ) from exc
        core = ov.Core()
        # No run-time activation quantisation either (OpenVINO's default for weight-compressed
        # graphs): its groups would span the batch.
        config = {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": precision, "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}

        def compiled(name: str):
            return core.compile_model(core.read_model(str(bundle_dir / name)), "CPU", config)

        embeddings = compiled(manifest.graphs.embeddings)
        self._embedding_inputs = {i.get_any_name() for i in embeddings.inputs}
        self.embeddings = embeddings.create_infer_request()
        self.layers = [compiled(name).create_infer_request() for name in manifest.graphs.layers]

    def embed(self, batch: EncodedBatch) -> np.ndarray:
        self.embeddings.infer(_embedding_feeds(batch, self._embedding_inputs))
        return self.embeddings.get_output_tensor(0).data.copy()

    def layer(self, index: int, hidden: np.ndarray, attention_mask: np.ndarray):
        request = self.layers[index]
        request.infer({"hidden": np.ascontiguousarray(hidden), "attention_mask": attention_mask})
        # The request's output buffers are reused by its next call: copy them out.
        return request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()

    def select(self, hidden: np.ndarray, rows: np.ndarray, longest: int) -> np.ndarray:
        return hidden[rows, :longest]

    def to_numpy(self, hidden) -> np.ndarray:
        return hidden


def make_backend(bundle_dir: Path, manifest: Manifest, provider: str, threads: int,
                 io_binding: bool | None = None):
    if provider not in PROVIDER_NAMES:
        raise ValueError(f"provider must be one of {list(PROVIDER_NAMES)}, not {provider!r}")
    if provider == "openvino":
        if manifest.tasks:
            raise ValueError("provider openvino does not serve multi-task bundles: their shared layers and "
                             "per-task exit heads run on ONNX Runtime (provider cpu or cuda)")
        if io_binding:
            raise ValueError("I/O binding is an ONNX Runtime feature; provider openvino has none")
        if manifest.quantization and manifest.quantization.method.startswith("fused"):
            raise ValueError("provider openvino does not run fused int8 bundles (`offramp quantize --method "
                             "fused`): their layers are ONNX Runtime operators (QAttention, "
                             "MatMulIntegerToFloat); use provider cpu, or quantise with --method static")
        return OpenVinoBackend(bundle_dir, manifest, threads)
    return OrtBackend(bundle_dir, manifest, provider, threads, io_binding)
