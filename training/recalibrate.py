"""`offramp calibrate BUNDLE --data FILE`: a bundle's calibration fitted again, on rows you choose.

Every policy's table (entropy, max_prob with its exit temperatures, patience) and recommended
setting are fitted on FILE through the real engine, the file is recorded in the manifest
(`calibration_data`), and only the manifest changes (written whole, then renamed into place, so a
server watching the folder never reads half of it). Use rows the model was not trained on and
that you will not report on, so the figures measured elsewhere stay out of sample.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from app.bundle import open_encoder, open_engine
from app.manifest import MANIFEST_NAME, DataFileRecord, Manifest, read_manifest, sha256_of
from training import progress

log = logging.getLogger("offramp.calibrate")


def recalibrate(bundle: Path, data: Path, inputs: list, labels, tolerance_points: float = 0.5,
                threads: int | None = None) -> Manifest:
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    engine = open_engine(bundle, manifest, intra_op_threads=threads)
    manifest.calibration, manifest.recommended_threshold = progress.calibrate(
        engine, open_encoder(bundle, manifest), inputs, labels, tolerance_points, name="calibration sweep")
    manifest.calibration_data = DataFileRecord(path=str(data), sha256=sha256_of(data), rows=len(inputs))
    partial = bundle / f".{MANIFEST_NAME}.partial"
    partial.write_text(manifest.model_dump_json(indent=2) + "\n")
    os.replace(partial, bundle / MANIFEST_NAME)
    return manifest


def run_calibrate(args) -> None:
    from training.labelled import load_data

    manifest = read_manifest(args.bundle)
    columns = args.text_columns.split(",") if args.text_columns else None
    inputs, labels = load_data(args.data, manifest, columns, args.label_column)
    manifest = recalibrate(args.bundle, args.data, inputs, labels, args.calibration_tolerance, args.threads)
    lines = [f"entropy: threshold {manifest.recommended_threshold:.2f}"]
    for name, table in manifest.policies.items():
        setting = (f"threshold {table.recommended_threshold:.2f}" if table.recommended_threshold is not None
                   else f"patience {table.recommended_patience}")
        lines.append(f"{name}: {setting}")
    print(f"{args.bundle} calibrated on {args.data} ({len(inputs):,} rows): " + "; ".join(lines))
