"""The end of every training command: the trained model -> per-layer dev accuracy, the PyTorch
checkpoint moved into place complete, then the verified, calibrated ONNX bundle with its
provenance (what was trained, from what, how and where)."""

from __future__ import annotations

import argparse
import datetime
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from app.manifest import LayerResult, Provenance
from training.staging import Staged

log = logging.getLogger("offramp.train")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    import accelerate
    import onnx
    import torch
    import onnxruntime
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "accelerate": accelerate.__version__}


def save_and_export(args: argparse.Namespace, task, model, checkpoint: Staged, max_seq_length: int, seed: int,
                    recipe: dict, wall_s: float, meta: dict | None = None) -> list[float]:
    """What every recipe does after training: per-layer dev accuracy, the PyTorch checkpoint
    (with its tokenizer, so it can be a teacher on its own) moved into place complete, then the
    verified, calibrated bundle with its provenance. Returns the per-layer dev accuracy."""
    from training import loop
    from training.export import export_bundle
    from training.progress import phase

    runtime = task.runtime
    with phase("dev accuracy per layer", f"{len(task.dev):,} rows"):
        accuracy = loop.layer_accuracy(model, task.dev, runtime)
    if runtime is not None and not runtime.is_main:
        return accuracy  # the main process writes the checkpoint and the bundle
    for layer, acc in enumerate(accuracy, 1):
        log.info("dev accuracy at layer %d: %.4f", layer, acc)
    distributed = runtime.describe() if runtime is not None else None
    model.cpu()  # export, verification and calibration run on the CPU, in fp32
    staging = checkpoint.path
    model.save(staging, {"labels": task.labels, "source_labels": task.source_labels, "recipe": recipe,
                         "distributed": distributed, **(meta or {})})
    if task.tokenizer_file.resolve() != (staging / "tokenizer.json").resolve():
        shutil.copyfile(task.tokenizer_file, staging / "tokenizer.json")
    # The checkpoint is complete: it goes into place before the export, which may still fail.
    final = checkpoint.publish()
    task.tokenizer_file = final / "tokenizer.json"
    task.log_file = final / "train_log.jsonl"
    log.info("checkpoint written to %s", final)
    provenance = Provenance(
        teacher=task.teacher, train=task.records["train"], dev=task.records["dev"],
        unlabeled=task.records.get("unlabeled"), command=shlex.join(["offramp", *getattr(args, "argv", sys.argv[1:])]),
        seed=seed, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        recipe=recipe, versions=versions(), wall_time_s=round(wall_s, 1), checkpoint=str(final),
        distributed=distributed,
    )
    # Calibrated on held-out rows where the run has them, so the dev figures stay out of sample.
    rows = task.calibration if task.calibration is not None else task.dev
    calibration_inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in rows.examples]
    manifest = export_bundle(
        model, task.tokenizer_file, args.out, name=args.out.name, labels=task.labels,
        source_labels=task.source_labels, text_pair=task.text_pair, max_seq_length=max_seq_length,
        provenance=provenance, dev_results=[LayerResult(layer=i, accuracy=a) for i, a in enumerate(accuracy, 1)],
        calibration_inputs=calibration_inputs, calibration_labels=rows.labels,
        tolerance_points=args.calibration_tolerance,
        calibration_data=task.records.get("calibration", task.records["dev"]),
    )
    log.info("wrote %s: verification max |diff| %s, recommended threshold %.2f",
             args.out, max(manifest.verification.max_abs_logit_diff), manifest.recommended_threshold)
    print(f"bundle written to {args.out} (checkpoint {final})")
    return accuracy
