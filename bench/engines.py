"""Engine configurations side by side, in one run: bundles, backends and length grouping.

    python -m bench.engines models/sst2-minilm OLD_BUNDLE:groups=none models/sst2-minilm:provider=openvino \\
        --data ../shared/data/glue/SST-2/dev.tsv [--batch-sizes 1,32] [--repeats 3] [--json out.json]

Each argument is a bundle folder with optional `:key=value` settings: `groups=none|N` (the
engine's `group_call_cost_tokens`; none: a batch always runs whole), `provider=cpu|openvino`,
`order=file|shuffled` (rows in file order, the default, or shuffled with a fixed seed: what a
server's batches of concurrent single-sentence requests hold, lengths mixed).
Every configuration runs at full depth, at its bundle's recommended threshold and at any
`--thresholds`, at each batch size, interleaved, median of the repeats; engine only (pre-tokenised, no HTTP).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from app.backends import shared_thread_pool, use_shared_thread_pool
from app.bundle import open_encoder, open_engine
from app.engine import GROUP_CALL_COST_TOKENS
from app.manifest import read_manifest
from bench.report import load_data, machine_info
from app.calibration import make_batches


def parse_config(spec: str) -> dict:
    path, *settings = spec.split(":")
    config = {"label": spec, "bundle": Path(path), "provider": "cpu", "groups": GROUP_CALL_COST_TOKENS,
              "order": "file"}
    for item in settings:
        key, _, value = item.partition("=")
        if key == "groups":
            config["groups"] = None if value == "none" else float(value)
        elif key == "provider":
            config["provider"] = value
        elif key == "order" and value in ("file", "shuffled"):
            config["order"] = value
        else:
            raise SystemExit(f"python -m bench.engines: error: unknown setting {key!r} in {spec!r}")
    return config


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.engines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("configs", nargs="+", metavar="BUNDLE[:key=value...]")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--thresholds", default="", metavar="LIST",
                   help="more thresholds to run every configuration at (an accuracy/speed curve per "
                        "configuration, measured in the same run)")
    p.add_argument("--shared-thread-pool", action="store_true",
                   help="every session on one spin-waiting pool (the server's OFFRAMP_SHARED_THREAD_POOL); "
                        "process-wide, so compare it in separate runs: python -m bench.thread_pool")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.shared_thread_pool:
        use_shared_thread_pool(args.threads)
    sizes = [int(x) for x in args.batch_sizes.split(",")]
    runs = []
    for config in map(parse_config, args.configs):
        manifest = read_manifest(config["bundle"])
        inputs, labels = load_data(args.data, manifest)
        if config["order"] == "shuffled":
            order = np.random.default_rng(0).permutation(len(inputs))
            inputs, labels = [inputs[i] for i in order], labels[order]
        encoder = open_encoder(config["bundle"], manifest)
        engine = open_engine(config["bundle"], manifest, provider=config["provider"], intra_op_threads=args.threads,
                             group_call_cost_tokens=config["groups"])
        batches = {b: make_batches(encoder, inputs, b) for b in sizes}
        for b in sizes:
            for batch in batches[b][:3]:
                engine.run(batch, 0.0)
        extra = {float(t) for t in args.thresholds.split(",") if t.strip()}
        for threshold in sorted({0.0, manifest.recommended_threshold, *extra}):
            runs.append({"config": config["label"], "threshold": threshold, "engine": engine,
                         "recommended": manifest.recommended_threshold,
                         "batches": batches, "labels": labels, "seconds": {b: [] for b in sizes}})
    for _ in range(args.repeats):
        for run in runs:
            for b in sizes:
                start = time.perf_counter()
                results = [run["engine"].run(batch, run["threshold"]) for batch in run["batches"][b]]
                run["seconds"][b].append(time.perf_counter() - start)
                predictions = np.concatenate([r.probabilities.argmax(1) for r in results])
                run["accuracy"] = float((predictions == run["labels"]).mean())
                run["mean_exit_layer"] = float(np.concatenate([r.exit_layer for r in results]).mean())
    report = {"data": str(args.data), "threads": args.threads, "repeats": args.repeats,
              "shared_thread_pool": shared_thread_pool() is not None,
              "machine": machine_info(), "runs": []}
    print(f"{'configuration':<48} | threshold | accuracy | " + " | ".join(f"rows/s b{b}" for b in sizes))
    for run in runs:
        rates = {str(b): len(run["labels"]) / statistics.median(run["seconds"][b]) for b in sizes}
        report["runs"].append({"config": run["config"], "threshold": run["threshold"],
                               "recommended": run["threshold"] == run["recommended"],
                               "mean_exit_layer": run["mean_exit_layer"],
                               "accuracy": run["accuracy"], "rows_per_s": rates,
                               "pass_seconds": {str(b): s for b, s in run["seconds"].items()}})
        print(f"{run['config']:<48} | {run['threshold']:9.2f} | {run['accuracy']:8.4f} | "
              + " | ".join(f"{rates[str(b)]:10.0f}" for b in sizes))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
