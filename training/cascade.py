"""`offramp cascade`: bundles in order -> one cascade bundle, calibrated as one model.

    offramp cascade --stages models/sst2-bilstm,models/sst2-minilm --dev dev.tsv --out models/sst2-cascade

Each stage bundle is copied (hard-linked where the file system allows) into `stages/` of the new
bundle, whose manifest lists every stage file with its sha256, so the cascade is verified and
served like any bundle (app/cascade.py runs it). The calibration table and the recommended
threshold come from the same sweep through the real engine as every export's; with
`--calibration FILE` they are fitted there and `--dev` is only reported, out of sample.
"""

from __future__ import annotations

import datetime
import logging
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from app.bundle import open_encoder, open_engine
from app.calibration import fit_temperature, layer_probabilities, make_batches
from app.cascade import label_order
from app.manifest import (MANIFEST_NAME, DataFileRecord, LayerResult, Manifest, Provenance, Stage,
                          describe_file, read_manifest, write_manifest)
from training import progress
from training.errors import CommandError
from training.staging import Staged

log = logging.getLogger("offramp.cascade")


def check_stages(stage_dirs: Sequence[Path]) -> list[Manifest]:
    """Every stage verified, and all of them answering the same question."""
    if len(stage_dirs) < 2:
        raise CommandError(f"--stages: a cascade needs at least two bundles, got {len(stage_dirs)}")
    names = [Path(d).name for d in stage_dirs]
    if len(set(names)) != len(names):
        raise CommandError(f"--stages: two stages share the folder name in {names}")
    manifests = [read_manifest(Path(d)) for d in stage_dirs]
    first = manifests[0]
    for directory, manifest in zip(stage_dirs, manifests):
        if manifest.stages:
            raise CommandError(f"--stages: {directory} is itself a cascade; list its stages instead")
        if manifest.text_pair != first.text_pair:
            raise CommandError(f"--stages: {directory} takes {'pairs' if manifest.text_pair else 'single texts'}, "
                               f"{stage_dirs[0]} does not")
        try:
            label_order(manifest.labels, manifests[-1].labels)
        except ValueError as exc:
            raise CommandError(f"--stages: {directory}: {exc}: stages must share one label set") from None
    return manifests


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _record(path: Path, rows: int) -> DataFileRecord:
    from app.manifest import sha256_of

    return DataFileRecord(path=str(path), sha256=sha256_of(path), rows=rows)


def build_cascade(stage_dirs: Sequence[Path], out_dir: Path, dev: tuple[Path, list, np.ndarray],
                  calibration: tuple[Path, list, np.ndarray] | None = None, tolerance_points: float = 0.5,
                  threads: int | None = None, command: str = "", fit_temperatures: bool = True) -> Manifest:
    """Write the cascade bundle to out_dir. `dev` and `calibration` are (file, inputs, class ids).
    With fit_temperatures, each stage's temperature is fitted on the calibration rows first."""
    stage_dirs = [Path(d) for d in stage_dirs]
    manifests = check_stages(stage_dirs)
    last = manifests[-1]
    out_dir = Path(out_dir)
    with Staged(out_dir) as staged:
        stages, files, first = [], [], 1
        for number, (directory, manifest) in enumerate(zip(stage_dirs, manifests), start=1):
            folder = f"stages/{number}-{directory.name}"
            for entry in [*manifest.files, describe_file(directory, MANIFEST_NAME)]:
                _link_or_copy(directory / entry.path, staged.path / folder / entry.path)
                files.append(entry.model_copy(update={"path": f"{folder}/{entry.path}"}))
            stages.append(Stage(name=directory.name, path=folder, num_layers=manifest.num_layers,
                                first_layer=first, exit_head=manifest.exit_head,
                                max_seq_length=manifest.max_seq_length))
            first += manifest.num_layers
        dev_path, dev_inputs, dev_labels = dev
        cal_path, cal_inputs, cal_labels = calibration or dev
        manifest = Manifest(
            name=out_dir.name, labels=last.labels, source_labels=last.source_labels, text_pair=last.text_pair,
            max_seq_length=max(m.max_seq_length for m in manifests), num_layers=first - 1,
            hidden_size=last.hidden_size, exit_head="cascade", stages=stages, files=files,
            provenance=Provenance(
                teacher=last.provenance.teacher, dev=_record(dev_path, len(dev_inputs)), command=command,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                recipe={"stages": [s.name for s in stages], "tolerance_points": tolerance_points,
                        "calibration": str(cal_path), "stage_temperature": "fit" if fit_temperatures else "none"}))
        encoder = open_encoder(staged.path, manifest)
        if fit_temperatures:
            with progress.phase("stage temperatures", f"{len(cal_inputs):,} rows") as p:
                probs = layer_probabilities(open_engine(staged.path, manifest, intra_op_threads=threads),
                                            make_batches(encoder, cal_inputs, 64))
                for stage in manifest.stages:
                    stage.temperature = fit_temperature(probs[stage.first_layer - 1:stage.last_layer], cal_labels)
                p.result = ", ".join(f"{s.name} {s.temperature:.2f}" for s in manifest.stages)
        engine = open_engine(staged.path, manifest, intra_op_threads=threads)
        with progress.phase("dev accuracy per layer", f"{len(dev_inputs):,} rows"):
            probs = layer_probabilities(engine, make_batches(encoder, dev_inputs, 64))
        manifest.dev_results = [LayerResult(layer=i + 1, accuracy=float(acc))
                                for i, acc in enumerate((probs.argmax(-1) == dev_labels[None, :]).mean(axis=1))]
        manifest.calibration, manifest.recommended_threshold = progress.calibrate(
            engine, encoder, cal_inputs, cal_labels, tolerance_points,
            name="calibration sweep" if calibration else "dev calibration sweep")
        manifest.calibration_data = _record(cal_path, len(cal_inputs))
        write_manifest(staged.path, manifest)
        from training.card import plot_calibration

        plot_calibration(manifest, staged.path / "calibration.png")
        staged.publish()
    log.info("wrote cascade %s: stages %s, %d layers, recommended threshold %.2f", out_dir,
             " -> ".join(s.name for s in stages), manifest.num_layers, manifest.recommended_threshold)
    return manifest


def run_cascade(args) -> None:
    from training.labelled import load_data
    from training.staging import BUNDLE_MARKER, check_replaceable

    stage_dirs = [Path(s) for s in args.stages.split(",") if s.strip()]
    check_replaceable(args.out, BUNDLE_MARKER, "--out")
    manifests = check_stages(stage_dirs)
    columns = args.text_columns.split(",") if args.text_columns else None
    dev_inputs, dev_labels = load_data(args.dev, manifests[-1], columns, args.label_column)
    calibration = None
    if args.calibration:
        if args.calibration.resolve() == args.dev.resolve():
            raise CommandError("--calibration is the --dev file: leave it out to calibrate on dev")
        calibration = (args.calibration, *load_data(args.calibration, manifests[-1], columns, args.label_column))
    command = shlex.join(["offramp", *getattr(args, "argv", sys.argv[1:])])
    manifest = build_cascade(stage_dirs, args.out, (args.dev, dev_inputs, dev_labels), calibration,
                             args.calibration_tolerance, args.threads, command,
                             fit_temperatures=args.stage_temperature == "fit")
    at = next(p for p in manifest.calibration if p.threshold == manifest.recommended_threshold)
    print(f"cascade bundle written to {args.out}: "
          f"{' -> '.join(f'{s.name} (T {s.temperature:.2f})' for s in manifest.stages)}, "
          f"{manifest.num_layers} layers, recommended threshold {manifest.recommended_threshold:.2f} "
          f"({100 * at.accuracy:.2f} on {'the calibration file' if calibration else 'dev'}, "
          f"full depth {100 * manifest.dev_results[-1].accuracy:.2f} on dev)")

