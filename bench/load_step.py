"""A load step against the latency controller: 8 clients, then 64, then 8 again, with the
controller off and on (OFFRAMP_TARGET_P99_MS), p99 latency, accuracy and the threshold in force
over time, in one run on this machine (app/controller.py).

    python -m bench.load_step --model-dir models --data ../shared/data/glue/SST-2/dev.tsv \\
        --target-p99-ms 150 --max-accuracy-drop 3 --json docs/bench/load-step.json --plot docs/images/load-step.png

Each client sends one labelled sentence per request (drawn from the file at random, one seed
for both runs) and never sets a threshold, so every request gets the default one, which is
what the controller moves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import httpx
import numpy as np

from bench.load import Connection, start_server, stop_server
from bench.report import machine_info
from training.data import read_examples


async def run_schedule(url: str, model: str, rows: list[tuple[str, str]], labels: list[str],
                       schedule: list[tuple[int, float]], seed: int = 0) -> list[dict]:
    """Every request of the schedule: when it was answered (s from the start), its latency, the
    threshold it got and whether its label was right."""
    parsed = httpx.URL(url)
    route = f"/v1/models/{model}/predict"
    records: list[dict] = []
    start = time.perf_counter()
    rng = random.Random(seed)

    async def client(until: float) -> None:
        connection = Connection(parsed.host, parsed.port)
        while time.perf_counter() - start < until:
            text, label = rows[rng.randrange(len(rows))]
            sent = time.perf_counter()
            status, payload = await connection.post(route, json.dumps({"inputs": [text]}).encode())
            done = time.perf_counter()
            record = {"t": done - start, "latency_s": done - sent, "status": status}
            if status == 200:
                body = json.loads(payload)
                record.update(threshold=body["threshold"], correct=body["predictions"][0]["label"] == label)
            records.append(record)
        connection.close()

    elapsed = 0.0
    for clients, seconds in schedule:
        elapsed += seconds
        await asyncio.gather(*(client(elapsed) for _ in range(clients)))
    return records


def timeline(records: list[dict], bin_s: float) -> list[dict]:
    """Per time bin: requests, p99 latency (ms), accuracy and mean threshold of the answers."""
    end = max(r["t"] for r in records)
    bins = []
    for lo in np.arange(0.0, end, bin_s):
        part = [r for r in records if lo <= r["t"] < lo + bin_s]
        ok = [r for r in part if r["status"] == 200]
        bins.append({"t": float(lo + bin_s), "requests": len(part),
                     "p99_ms": float(np.percentile([r["latency_s"] for r in part], 99) * 1000) if part else None,
                     "accuracy": float(np.mean([r["correct"] for r in ok])) if ok else None,
                     "threshold": float(np.mean([r["threshold"] for r in ok])) if ok else None,
                     "errors": len(part) - len(ok)})
    return bins


def phase_summary(records: list[dict], schedule: list[tuple[int, float]]) -> list[dict]:
    out, lo = [], 0.0
    for clients, seconds in schedule:
        part = [r for r in records if lo <= r["t"] < lo + seconds]
        ok = [r for r in part if r["status"] == 200]
        out.append({"clients": clients, "from_s": lo, "to_s": lo + seconds, "requests": len(part),
                    "p99_ms": float(np.percentile([r["latency_s"] for r in part], 99) * 1000) if part else None,
                    "p50_ms": float(np.percentile([r["latency_s"] for r in part], 50) * 1000) if part else None,
                    "accuracy": float(np.mean([r["correct"] for r in ok])) if ok else None,
                    "mean_threshold": float(np.mean([r["threshold"] for r in ok])) if ok else None})
        lo += seconds
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    for name, run in report["runs"].items():
        t = [b["t"] for b in run["timeline"]]
        for axis, key, scale in ((axes[0], "p99_ms", 1), (axes[1], "accuracy", 100), (axes[2], "threshold", 1)):
            axis.plot(t, [None if b[key] is None else b[key] * scale for b in run["timeline"]], label=name)
    axes[0].axhline(report["target_p99_ms"], color="gray", linestyle=":", label="target p99")
    axes[0].set_ylabel("p99 latency (ms)")
    axes[1].set_ylabel("accuracy (%)")
    axes[2].set_ylabel("default threshold")
    axes[2].set_xlabel("seconds (clients: " + " -> ".join(str(c) for c, _ in report["schedule"]) + ")")
    for axis in axes:
        axis.legend(loc="upper right", fontsize=8)
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.load_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--model", default="sst2-minilm")
    p.add_argument("--data", type=Path, required=True, help="labelled file (labels as the model serves them "
                                                             "or as the file writes them)")
    p.add_argument("--schedule", default="8:20,64:20,8:20", help="CLIENTS:SECONDS,... (default 8:20,64:20,8:20)")
    p.add_argument("--target-p99-ms", type=float, required=True)
    p.add_argument("--max-accuracy-drop", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bin-s", type=float, default=2.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    schedule = [(int(c), float(s)) for c, s in (item.split(":") for item in args.schedule.split(","))]
    from app.manifest import read_manifest

    manifest = read_manifest(args.model_dir / args.model, verify_files=False)
    served = {raw: name for raw, name in zip(manifest.source_labels or manifest.labels, manifest.labels)}
    examples = read_examples(args.data).examples
    rows = [(e.text, served.get(e.label, e.label)) for e in examples]
    report = {"data": str(args.data), "model": args.model, "schedule": schedule, "target_p99_ms": args.target_p99_ms,
              "max_accuracy_drop": args.max_accuracy_drop, "threads": args.threads, "machine": machine_info(),
              "runs": {}}
    for name, settings in (("controller off", {}),
                           ("controller on", {"target_p99_ms": args.target_p99_ms,
                                              "max_accuracy_drop": args.max_accuracy_drop})):
        proc, url = start_server(args.model_dir, intra_op_threads=args.threads, **settings)
        try:
            records = asyncio.run(run_schedule(url, args.model, rows, list(manifest.labels), schedule))
        finally:
            stop_server(proc)
        report["runs"][name] = {"settings": settings, "phases": phase_summary(records, schedule),
                                "timeline": timeline(records, args.bin_s)}
        for phase in report["runs"][name]["phases"]:
            print(f"{name:>14} | {phase['clients']:>3} clients | {phase['requests']:>5} requests | "
                  f"p50 {phase['p50_ms']:7.1f} ms | p99 {phase['p99_ms']:7.1f} ms | accuracy "
                  f"{100 * phase['accuracy']:.2f} | threshold {phase['mean_threshold']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, args.plot)
    return report


if __name__ == "__main__":
    main()
