"""Engine throughput against batch size, at given thresholds (no HTTP): does batching pay?

    python -m bench.batch_sizes models/sst2-minilm --data ../shared/data/glue/SST-2/dev.tsv
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.registry import load_model
from bench.report import load_data
from app.calibration import make_batches, timed_run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.batch_sizes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=320)
    p.add_argument("--thresholds", default="0,recommended")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--order", choices=["length", "input"], default="length",
                   help="length: rows sorted by token count before batching, the batcher's best case "
                        "(little padding); input: file order, batches padded to a random longest row")
    args = p.parse_args(argv)
    model = load_model(args.bundle)
    inputs, _ = load_data(args.data, model.manifest)
    inputs = inputs[:args.rows]
    if args.order == "length":
        lengths = model.encoder.encode(inputs).attention_mask.sum(axis=1)
        inputs = [inputs[i] for i in lengths.argsort(kind="stable")]
    thresholds = [model.manifest.recommended_threshold if t == "recommended" else float(t)
                  for t in args.thresholds.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(f"{len(inputs)} rows in {args.order} order")
    print("threshold | " + " | ".join(f"batch {b}" for b in sizes) + "   (rows/s)")
    for threshold in thresholds:
        cells = []
        for size in sizes:
            _, seconds = timed_run(model.engine, make_batches(model.encoder, inputs, size), threshold)
            cells.append(f"{len(inputs) / seconds:7.0f}")
        print(f"{threshold:9.2f} | " + " | ".join(cells))


if __name__ == "__main__":
    main()
