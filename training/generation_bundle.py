"""A trained generation student -> a verified, calibrated generation bundle.

Export (training/export_generation.py), verification against PyTorch token by token, then the
calibration the server's default comes from: dev ROUGE-L and decoder layers per token of the
ONNX engine at a ladder of per-token exit thresholds, each with its decoder wall time measured
in the same run against full depth; the recommended threshold is the one with fewest layers per
token within --rouge-tolerance ROUGE-L of full depth. With --test, the same at full depth and
at the recommended threshold on the test pairs (results.json beside the checkpoint, and the card).
"""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from app.manifest import (DataFileRecord, GenerationPoint, GenerationSpec, Manifest, Provenance, Verification,
                          describe_file, write_manifest)
from training.generation_eval import ROUGE_TYPES, references, rouge
from training.publish import git_commit, versions
from training.seq2seq_data import file_record, special_ids
from training.staging import BUNDLE_MARKER, check_replaceable, replace_folder

log = logging.getLogger("offramp.train")

THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6)
EXIT_HEAD = "calm-classifier"


def _record(prefix: Path, rows: int) -> DataFileRecord:
    r = file_record(prefix, rows)
    return DataFileRecord(path=r["path"], sha256=r["sha256"], rows=rows)


def run_engine(engine, encoder, sources: list[str], threshold: float, spec: GenerationSpec,
               batch_size: int = 32) -> tuple[list[str], float, float]:
    """(texts, mean decoder layers per token, wall seconds) of the ONNX engine over `sources`."""
    texts, layers, tokens, seconds = [], 0, 0, 0.0
    for start in range(0, len(sources), batch_size):
        batch = encoder.encode(sources[start:start + batch_size])
        rows = batch.rows
        t0 = time.perf_counter()
        out = engine.generate(batch, max_new_tokens=np.full(rows, spec.max_new_tokens, dtype=np.int64),
                              num_beams=np.full(rows, spec.num_beams, dtype=np.int64),
                              threshold=np.full(rows, threshold, dtype=np.float32),
                              no_repeat_ngram_size=np.full(rows, spec.no_repeat_ngram_size, dtype=np.int64))
        seconds += time.perf_counter() - t0
        for g in out:
            texts.append(g.text)
            layers += sum(g.exit_layers)
            tokens += len(g.exit_layers)
    return texts, layers / max(1, tokens), seconds


def sweep(engine, encoder, pairs, spec: GenerationSpec, thresholds=THRESHOLDS) -> list[GenerationPoint]:
    """One point per threshold; the speed-up is wall time at threshold 0 over wall time here, in
    this one run (threshold 0 is run first and last and its faster time kept, so that warming up
    does not flatter the exits)."""
    sources, refs = [p.source for p in pairs], references(pairs)
    layers_full = engine.num_layers
    runs = {}
    for t in (*thresholds, 0.0):
        texts, mean_layers, seconds = run_engine(engine, encoder, sources, t, spec)
        if t in runs:
            seconds = min(seconds, runs[t][2])
        runs[t] = (texts, mean_layers, seconds)
    points = []
    for t in thresholds:
        texts, mean_layers, seconds = runs[t]
        scores = rouge(texts, refs)
        points.append(GenerationPoint(threshold=t, **scores, mean_exit_layer=round(mean_layers, 3),
                                      ideal_speedup=round(layers_full / max(mean_layers, 1e-9), 3),
                                      measured_speedup=round(runs[0.0][2] / seconds, 3)))
        log.info("threshold %.2f: ROUGE-L %.2f, %.2f layers/token, %.2fx", t, points[-1].rougeL,
                 mean_layers, points[-1].measured_speedup)
    return points


def recommend(points: list[GenerationPoint], tolerance: float) -> float:
    full = next(p for p in points if p.threshold == 0.0)
    fits = [p for p in points if p.rougeL >= full.rougeL - tolerance]
    return min(fits, key=lambda p: (p.mean_exit_layer, p.threshold)).threshold


def write_bundle(model, tokenizer, args, cfg, report: dict, train_pairs, dev_pairs, test_pairs, run_dir: Path) -> Path:
    from app.generation import GenerationEncoder, GenerationEngine
    from training.export_generation import export_generation, round_weights_to_fp16, verify_generation

    started = time.monotonic()
    out = Path(args.out)
    check_replaceable(out, BUNDLE_MARKER, "--out")
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    if args.weights == "fp16":
        round_weights_to_fp16(model)
    graphs = export_generation(model, staging, weights=args.weights)
    tokenizer.save(str(staging / "tokenizer.json"))
    c, specials = model.config, special_ids(tokenizer)
    spec = GenerationSpec(**graphs, num_encoder_layers=c.encoder_layers, num_heads=c.num_heads, head_dim=c.head_dim,
                          vocab_size=c.vocab_size, max_target_length=c.max_target_length, bos_id=specials["bos"],
                          eos_id=specials["eos"], pad_id=specials["pad"], unk_id=specials["unk"],
                          max_new_tokens=min(args.max_new_tokens, c.max_target_length - 1), num_beams=args.num_beams,
                          no_repeat_ngram_size=args.no_repeat_ngram_size)
    verification = verify_generation(model, staging, spec)
    if not verification.passed:
        raise RuntimeError(f"ONNX graphs differ from PyTorch: {verification}")
    teacher = "none (baseline)" if args.no_teacher else str(args.teacher_dir)
    provenance = Provenance(
        teacher=teacher, train=_record(args.train, len(train_pairs)), dev=_record(args.dev, len(dev_pairs)),
        command=shlex.join(["offramp", *sys.argv[1:]]), seed=cfg.seed, git_commit=git_commit(),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        recipe={"method": "cmlm", "distilled": not args.no_teacher, **report["config"]}, versions=versions(),
        wall_time_s=report.get("train_wall_time_s"), checkpoint=str(run_dir))

    def manifest(calibration, full, threshold) -> Manifest:
        files = [describe_file(staging, f) for f in sorted(spec.files() | {"tokenizer.json"})]
        return Manifest(name=out.name, task="generation", max_seq_length=c.max_source_length, num_layers=c.decoder_layers,
                        hidden_size=c.d_model, exit_head=EXIT_HEAD, recommended_threshold=threshold,
                        generation=spec.model_copy(update={"calibration": calibration, "full_depth": full}),
                        files=files, provenance=provenance, verification=verification)

    write_manifest(staging, manifest([], None, 0.0))
    engine = GenerationEngine(staging, manifest([], None, 0.0))
    encoder = GenerationEncoder.from_file(staging / "tokenizer.json", c.max_source_length)
    points = sweep(engine, encoder, dev_pairs, spec)
    threshold = recommend(points, args.rouge_tolerance)
    write_manifest(staging, manifest(points, points[0], threshold))
    if test_pairs:
        at = sweep(engine, encoder, test_pairs, spec, thresholds=(0.0, threshold) if threshold else (0.0,))
        report["test_onnx"] = [p.model_dump() for p in at]
        report["test_pairs"] = len(test_pairs)
    report["recommended_threshold"] = threshold
    report["bundle_s"] = round(time.monotonic() - started, 1)
    (Path(run_dir) / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    replace_folder(staging, out)
    log.info("generation bundle written to %s (recommended threshold %.2f)", out, threshold)
    print(f"bundle written to {out}")
    return out
