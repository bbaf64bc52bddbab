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

from app.manifest import (DataFileRecord, GenerationPoint, GenerationSpec, Manifest, Provenance, describe_file,
                          write_manifest)
from training.generation_eval import references, rouge
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
               batch_size: int = 32, num_beams: int | None = None) -> tuple[list[str], float, float, float]:
    """(texts, mean decoder layers per token, wall seconds, seconds in the decoder layers) of the
    ONNX engine over `sources` (beams: the bundle's default unless given)."""
    beams = spec.num_beams if num_beams is None else num_beams
    texts, layers, tokens, seconds, decoder_s = [], 0, 0, 0.0, 0.0
    for start in range(0, len(sources), batch_size):
        batch = encoder.encode(sources[start:start + batch_size])
        rows = batch.rows
        t0 = time.perf_counter()
        out = engine.generate(batch, max_new_tokens=np.full(rows, spec.max_new_tokens, dtype=np.int64),
                              num_beams=np.full(rows, beams, dtype=np.int64),
                              threshold=np.full(rows, threshold, dtype=np.float32),
                              no_repeat_ngram_size=np.full(rows, spec.no_repeat_ngram_size, dtype=np.int64))
        seconds += time.perf_counter() - t0
        decoder_s += engine.decoder_layers_s
        for g in out:
            texts.append(g.text)
            layers += sum(g.exit_layers)
            tokens += len(g.exit_layers)
    return texts, layers / max(1, tokens), seconds, decoder_s


def sweep(engine, encoder, pairs, spec: GenerationSpec, thresholds=THRESHOLDS) -> list[GenerationPoint]:
    """One point per threshold; the speed-up is wall time at threshold 0 over wall time here, in
    this one run (threshold 0 is run first and last and its faster time kept, so that warming up
    does not flatter the exits)."""
    sources, refs = [p.source for p in pairs], references(pairs)
    layers_full = engine.num_layers
    runs = {}
    for t in (*thresholds, 0.0):
        texts, mean_layers, seconds, decoder_s = run_engine(engine, encoder, sources, t, spec)
        if t in runs:
            seconds, decoder_s = min(seconds, runs[t][2]), min(decoder_s, runs[t][3])
        runs[t] = (texts, mean_layers, seconds, decoder_s)
    points = []
    for t in thresholds:
        texts, mean_layers, seconds, decoder_s = runs[t]
        scores = rouge(texts, refs)
        points.append(GenerationPoint(threshold=t, **scores, mean_exit_layer=round(mean_layers, 3),
                                      ideal_speedup=round(layers_full / max(mean_layers, 1e-9), 3),
                                      measured_speedup=round(runs[0.0][2] / seconds, 3),
                                      decoder_speedup=round(runs[0.0][3] / max(decoder_s, 1e-9), 3)))
        log.info("threshold %.2f: ROUGE-L %.2f, %.2f layers/token, %.2fx whole call, %.2fx decoder layers", t,
                 points[-1].rougeL, mean_layers, points[-1].measured_speedup, points[-1].decoder_speedup)
    return points


# A threshold is only recommended where it is measurably faster than full depth (beyond this
# machine's noise); else the default stays 0, full depth.
MIN_SPEEDUP = 1.05


def recommend(points: list[GenerationPoint], tolerance: float) -> float:
    """The fastest measured point within `tolerance` ROUGE-L of full depth, if it is faster."""
    full = next(p for p in points if p.threshold == 0.0)
    fits = [p for p in points if p.rougeL >= full.rougeL - tolerance
            and (p.measured_speedup or 0.0) >= MIN_SPEEDUP]
    return max(fits, key=lambda p: (p.measured_speedup, -p.threshold)).threshold if fits else 0.0


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
    write_card(staging, manifest(points, points[0], threshold), report)
    replace_folder(staging, out)
    log.info("generation bundle written to %s (recommended threshold %.2f)", out, threshold)
    print(f"bundle written to {out}")
    return out


def write_card(bundle: Path, m: Manifest, report: dict) -> Path:
    """README.md: what the bundle is, how it was made, its dev calibration and test ROUGE."""
    g = m.generation
    lines = [f"# {m.name}: headline generation, C-MLM student with per-token exits", "",
             f"A Transformer encoder-decoder ({report['parameters']:,} parameters, {m.num_layers} decoder layers) "
             f"{'distilled from a C-MLM teacher (' + m.provenance.teacher + ')' if report.get('distilled') else 'trained without a teacher'}"
             f" on {m.provenance.train.rows:,} Gigaword pairs. Served by `POST /v1/models/{m.name}/generate`; "
             f"defaults: {g.num_beams} beams, no_repeat_ngram_size {g.no_repeat_ngram_size}, "
             f"max_new_tokens {g.max_new_tokens}, threshold {m.recommended_threshold:g} (recommended on dev).", "",
             f"Command: `{m.provenance.command}`", "",
             "## Dev calibration (ONNX engine, default decoding, measured in one run)", "",
             "| threshold | ROUGE-1 | ROUGE-2 | ROUGE-L | decoder layers/token | ideal | decoder layers speed-up | whole call |",
             "|---|---|---|---|---|---|---|---|"]
    for p in g.calibration:
        lines.append(f"| {p.threshold:g} | {p.rouge1:.2f} | {p.rouge2:.2f} | {p.rougeL:.2f} | {p.mean_exit_layer:.2f} "
                     f"| {p.ideal_speedup:.2f}x | {p.decoder_speedup:.2f}x | {p.measured_speedup:.2f}x |")
    if report.get("test_onnx"):
        lines += ["", f"## Gigaword test, {report['test_pairs']:,} pairs (ONNX engine)", "",
                  "| threshold | ROUGE-1 | ROUGE-2 | ROUGE-L | decoder layers/token | decoder layers speed-up | whole call |",
                  "|---|---|---|---|---|---|---|"]
        for p in report["test_onnx"]:
            lines.append(f"| {p['threshold']:g} | {p['rouge1']:.2f} | {p['rouge2']:.2f} | {p['rougeL']:.2f} "
                         f"| {p['mean_exit_layer']:.2f} | {p['decoder_speedup']:.2f}x | {p['measured_speedup']:.2f}x |")
    lines += ["", "Speed-ups: wall time at threshold 0 over this threshold's, same run, same threads; of the decoder "
              "layers (and the cache fills of skipped layers), and of the whole generate call (encoder, embedding, "
              "projection and search included). ROUGE: rouge-score F1 x 100, no stemming. "
              "Trained on 10,000 pairs: published transformers trained on the full 3.8M reach 36-39 ROUGE-1."]
    path = bundle / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
