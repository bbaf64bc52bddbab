"""Export an EarlyExitModel to a verified, calibrated ONNX bundle.

The graphs are split so the engine can stop after any layer: one for the embeddings and one per
layer returning that layer's hidden states and its exit logits. Export checks itself: every
layer's ONNX logits must match PyTorch on random and real inputs, and the result is recorded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from app.encoding import EncodedBatch, TextEncoder
from app.engine import Engine
from app.manifest import (
    DataFileRecord,
    Graphs,
    LayerResult,
    Manifest,
    Provenance,
    Verification,
    describe_file,
    write_manifest,
)
from training import progress
from training.model import EarlyExitModel
from training.staging import Staged

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-4
EMBEDDINGS_FILE = "embeddings.onnx"


def layer_file(index: int) -> str:
    return f"layer_{index + 1:02d}.onnx"


class _Embeddings(nn.Module):
    def __init__(self, model: EarlyExitModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, token_type_ids):
        return self.model.embed(input_ids, None, token_type_ids)


class _LayerWithExit(nn.Module):
    def __init__(self, model: EarlyExitModel, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, hidden, attention_mask):
        hidden = self.model.run_layer(self.index, hidden, attention_mask)
        return hidden, self.model.exit_logits(self.index, hidden, attention_mask)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    # The exporter restores the wrapper's own mode afterwards, recursively: a wrapper left in
    # training mode would switch the wrapped model's dropout back on.
    module.eval()
    axes = {name: {0: "rows", 1: "tokens"} for name in inputs + outputs if name != "logits"}
    axes["logits"] = {0: "rows"}
    torch.onnx.export(
        module, args, str(path), input_names=inputs, output_names=outputs,
        dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
        opset_version=OPSET, dynamo=False, do_constant_folding=True,
    )


def export_graphs(model: EarlyExitModel, out_dir: Path) -> Graphs:
    model.eval()
    rows, tokens = 2, 8
    ids = torch.ones(rows, tokens, dtype=torch.long)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    with torch.no_grad(), progress.bar(total=1 + model.num_layers, desc="ONNX export", unit="graph") as bar:
        _export(_Embeddings(model), (ids, torch.zeros_like(ids)), out_dir / EMBEDDINGS_FILE,
                ["input_ids", "token_type_ids"], ["hidden"])
        bar.update()
        # Each layer is traced on an input as wide as what reaches it (a BiLSTM's embeddings
        # need not be as wide as its output).
        hidden = model.embed(ids, mask, torch.zeros_like(ids))
        for index in range(model.num_layers):
            example = torch.randn_like(hidden)
            _export(_LayerWithExit(model, index), (example, mask),
                    out_dir / layer_file(index), ["hidden", "attention_mask"], ["hidden_out", "logits"])
            hidden = model.run_layer(index, example, mask)
            bar.update()
    return Graphs(embeddings=EMBEDDINGS_FILE,
                  layers=[layer_file(i) for i in range(model.num_layers)])


def _torch_layer_logits(model: EarlyExitModel, batch: EncodedBatch) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(batch.input_ids), torch.from_numpy(batch.attention_mask),
                       torch.from_numpy(batch.token_type_ids))
    return np.stack([l.numpy() for l in logits])


def onnx_layer_logits(engine: Engine, batch: EncodedBatch, bar=None) -> np.ndarray:
    """[layers, rows, classes] logits of every exit, through the engine's graphs."""
    hidden, out = engine.embed(batch), []
    for index in range(engine.num_layers):
        hidden, logits = engine.layer(index, hidden, batch.attention_mask)
        out.append(logits)
        if bar is not None:
            bar.update()
    return np.stack(out)


def random_batch(vocab_size: int, rows: int = 8, tokens: int = 24, seed: int = 0) -> EncodedBatch:
    """Random ids with ragged lengths, so padding is exercised too."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, size=(rows, tokens), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(rng.integers(2, tokens + 1, size=rows)):
        mask[row, :length] = 1
    ids = ids * mask
    types = np.zeros_like(ids)
    return EncodedBatch(ids, mask, types, np.zeros(rows, dtype=bool))


def verify(model: EarlyExitModel, engine: Engine, batches: dict[str, EncodedBatch],
           tolerance: float = TOLERANCE) -> Verification:
    """Largest |ONNX - PyTorch| logit difference per layer over all the given inputs."""
    worst = np.zeros(model.num_layers)
    with progress.bar(total=len(batches) * (1 + model.num_layers), desc="verification", unit="pass") as bar:
        for batch in batches.values():
            expected = _torch_layer_logits(model, batch)
            bar.update()
            diff = np.abs(expected - onnx_layer_logits(engine, batch, bar))
            worst = np.maximum(worst, diff.reshape(model.num_layers, -1).max(axis=1))
    return Verification(passed=bool((worst <= tolerance).all()), tolerance=tolerance,
                        max_abs_logit_diff=[float(x) for x in worst], inputs=sorted(batches))


def export_bundle(
    model: EarlyExitModel,
    tokenizer_file: Path,
    out_dir: Path,
    *,
    name: str,
    labels: list[str],
    source_labels: list[str] | None,
    text_pair: bool,
    max_seq_length: int,
    provenance: Provenance,
    dev_results: list[LayerResult],
    calibration_inputs: Sequence | None = None,
    calibration_labels: Sequence[int] | None = None,
    tolerance_points: float = 0.5,
    calibration_data: DataFileRecord | None = None,
) -> Manifest:
    """Write a complete bundle to out_dir (replacing it only once everything has passed)."""
    out_dir = Path(out_dir)
    # Staged beside the target so the final rename is atomic and a serving copy never sees
    # a half-written bundle; on failure nothing is left behind.
    with Staged(out_dir) as staged:
        staging = staged.path
        with progress.phase("ONNX export", f"{1 + model.num_layers} graphs for {out_dir}"):
            graphs = export_graphs(model, staging)
        shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
        files = [describe_file(staging, f) for f in ["tokenizer.json", graphs.embeddings, *graphs.layers]]
        manifest = Manifest(
            name=name, labels=labels, source_labels=source_labels, text_pair=text_pair, max_seq_length=max_seq_length,
            num_layers=model.num_layers, hidden_size=model.config.hidden_size,
            exit_head=model.exit_head, teacher_head=model.teacher_head, graphs=graphs, files=files,
            provenance=provenance, dev_results=dev_results,
        )
        engine = Engine(staging, manifest)
        encoder = TextEncoder.from_file(staging / "tokenizer.json", max_seq_length)
        checks = {"random": random_batch(model.config.vocab_size)}
        if calibration_inputs:
            checks["real"] = encoder.encode(list(calibration_inputs)[:32])
        with progress.phase("verification against PyTorch", f"{len(checks)} batches: {', '.join(checks)}") as p:
            manifest.verification = verify(model, engine, checks)
            p.result = f"max |diff| {max(manifest.verification.max_abs_logit_diff):.2e}"
        if not manifest.verification.passed:
            raise RuntimeError(
                f"ONNX export does not match PyTorch: max |diff| per layer "
                f"{manifest.verification.max_abs_logit_diff} > {TOLERANCE}"
            )
        if calibration_inputs is not None and calibration_labels is not None:
            manifest.calibration, manifest.recommended_threshold = progress.calibrate(
                engine, encoder, list(calibration_inputs), np.asarray(calibration_labels),
                tolerance_points=tolerance_points,
            )
            manifest.calibration_data = calibration_data
        write_manifest(staging, manifest)
        staged.publish()
        return manifest
