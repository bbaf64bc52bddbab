"""ONNX Runtime engine: runs a bundle layer by layer with per-row early exit.

After every layer, rows whose uncertainty is under their own threshold leave; the others go on
as a smaller batch, trimmed to their own longest row, so the cost follows the layers (and tokens)
each row really needs. Rows never influence each other: padding is masked and on the right.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.encoding import EncodedBatch
from app.manifest import Manifest, read_manifest
from app.threads import cpu_quota
from app.uncertainty import exits_at, normalized_entropy, softmax

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


@dataclass
class ExitResult:
    probabilities: np.ndarray  # float32 [rows, classes], from the exit each row left at
    exit_layer: np.ndarray  # int64 [rows], 1-based
    uncertainty: np.ndarray  # float32 [rows], at the exit layer

    @property
    def layers_executed(self) -> int:
        return int(self.exit_layer.sum())


def _as_rows(value, rows: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    return np.full(rows, arr, dtype=dtype) if arr.ndim == 0 else arr


def choose_providers(provider: str) -> list[str]:
    """The providers to ask ONNX Runtime for; CUDA falls back to CPU with a warning."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, not {provider!r}")
    if provider == "cuda":
        if PROVIDERS["cuda"] in ort.get_available_providers():
            return [PROVIDERS["cuda"], PROVIDERS["cpu"]]
        log.warning("CUDA provider requested but not available in onnxruntime; using CPU")
    return [PROVIDERS["cpu"]]


class Engine:
    def __init__(
        self,
        bundle_dir: Path,
        manifest: Manifest | None = None,
        provider: str = "cpu",
        intra_op_threads: int | None = None,
        io_binding: bool | None = None,
    ):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or read_manifest(self.bundle_dir)
        self.num_layers = self.manifest.num_layers
        self.providers = choose_providers(provider)
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads or cpu_quota()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One session per layer: threads spinning in idle sessions would steal the CPU from
        # the session that is running.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.intra_op_threads = options.intra_op_num_threads

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(
                str(self.bundle_dir / name), sess_options=options, providers=self.providers
            )

        self.embeddings = session(self.manifest.graphs.embeddings)
        self.layers = [session(name) for name in self.manifest.graphs.layers]
        self.active_provider = self.embeddings.get_providers()[0]
        # Position-only embeddings need no mask, and the exporter drops unused inputs.
        self._embedding_inputs = {i.name for i in self.embeddings.get_inputs()}
        # With I/O binding the hidden states stay on the provider's device from layer to
        # layer; only the small logits come back. Default: on wherever the device is not the CPU.
        self.device = "cuda" if self.active_provider == PROVIDERS["cuda"] else "cpu"
        self.io_binding = self.device != "cpu" if io_binding is None else io_binding

    def _bound_run(self, session: ort.InferenceSession, inputs: dict, outputs: dict[str, str]) -> list:
        binding = session.io_binding()
        for name, value in inputs.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, device in outputs.items():
            binding.bind_output(name, device)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _embed_state(self, batch: EncodedBatch):
        """The embeddings as the next layer takes them: numpy, or an OrtValue on the device."""
        if not self.io_binding:
            return self.embed(batch)
        feeds = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                 "token_type_ids": batch.token_type_ids}
        (hidden,) = self._bound_run(self.embeddings, {k: v for k, v in feeds.items()
                                                      if k in self._embedding_inputs}, {"hidden": self.device})
        return hidden

    def _layer_state(self, index: int, hidden, attention_mask: np.ndarray):
        if not self.io_binding:
            return self.layer(index, hidden, attention_mask)
        hidden, logits = self._bound_run(self.layers[index], {"hidden": hidden, "attention_mask": attention_mask},
                                         {"hidden_out": self.device, "logits": "cpu"})
        return hidden, logits.numpy()

    def _select(self, hidden, rows: np.ndarray, longest: int):
        """The staying rows, trimmed to their longest; on the device this is one round trip,
        paid only at layers where some but not all rows leave."""
        if not self.io_binding:
            return hidden[rows, :longest]
        kept = np.ascontiguousarray(hidden.numpy()[rows, :longest])
        return ort.OrtValue.ortvalue_from_numpy(kept, self.device, 0)

    def embed(self, batch: EncodedBatch) -> np.ndarray:
        feeds = {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
        }
        (hidden,) = self.embeddings.run(
            None, {k: v for k, v in feeds.items() if k in self._embedding_inputs}
        )
        return hidden

    def layer(self, index: int, hidden: np.ndarray, attention_mask: np.ndarray):
        """Layer `index` (0-based) -> (hidden states, exit logits)."""
        return self.layers[index].run(None, {"hidden": hidden, "attention_mask": attention_mask})

    def run(
        self,
        batch: EncodedBatch,
        threshold: float | np.ndarray,
        min_layers: int | np.ndarray = 1,
        max_layers: int | np.ndarray | None = None,
    ) -> ExitResult:
        rows = batch.input_ids.shape[0]
        classes = len(self.manifest.labels)
        threshold = _as_rows(threshold, rows, np.float32)
        min_layers = _as_rows(min_layers, rows, np.int64)
        max_layers = _as_rows(self.num_layers if max_layers is None else max_layers, rows, np.int64)

        probabilities = np.zeros((rows, classes), dtype=np.float32)
        exit_layer = np.zeros(rows, dtype=np.int64)
        uncertainty = np.zeros(rows, dtype=np.float32)

        active = np.arange(rows)  # original row index of each row still running
        hidden, mask = self._embed_state(batch), batch.attention_mask
        for index in range(self.num_layers):
            layer = index + 1
            hidden, logits = self._layer_state(index, hidden, mask)
            probs = softmax(logits)
            u = normalized_entropy(probs)
            leaving = exits_at(
                layer, self.num_layers, u, threshold[active], min_layers[active], max_layers[active]
            )
            if leaving.any():
                done = active[leaving]
                probabilities[done] = probs[leaving]
                exit_layer[done] = layer
                uncertainty[done] = u[leaving]
                staying = ~leaving
                if not staying.any():
                    break
                active = active[staying]
                longest = int(mask[staying].sum(axis=1).max())
                hidden = self._select(hidden, staying, longest)
                mask = mask[staying, :longest]
        return ExitResult(probabilities, exit_layer, uncertainty)

    def all_layer_probabilities(self, batch: EncodedBatch) -> np.ndarray:
        """Probabilities of every exit for every row, [layers, rows, classes] (full depth)."""
        hidden, out = self._embed_state(batch), []
        for index in range(self.num_layers):
            hidden, logits = self._layer_state(index, hidden, batch.attention_mask)
            out.append(softmax(logits))
        return np.stack(out)
