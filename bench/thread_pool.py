"""A pool per session against one shared, spin-waiting pool, in alternating processes.

    python -m bench.thread_pool models/sst2-minilm --data ../shared/data/glue/SST-2/dev.tsv \\
        [--batch-sizes 1,32] [--pairs 5] [--json out.json]

ONNX Runtime's global thread pool is process-wide, so each setting runs in its own
`python -m bench.engines` process (one repeat each), the two alternating `--pairs` times so that
a slow phase of the machine hits both alike; the report gives each pair's ratio and the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = {"per_session": [], "shared": ["--shared-thread-pool"]}


def run_once(bundle: str, data: Path, sizes: str, threads: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "engines.json"
        subprocess.run([sys.executable, "-m", "bench.engines", bundle, "--data", str(data), "--batch-sizes", sizes,
                        "--repeats", "1", "--threads", str(threads), "--json", str(out), *extra],
                       check=True, stdout=subprocess.DEVNULL)
        report = json.loads(out.read_text())
    return {f"{r['threshold']:g}": r["rows_per_s"] for r in report["runs"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m bench.thread_pool", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    pairs = [{name: run_once(args.bundle, args.data, args.batch_sizes, args.threads, extra)
              for name, extra in SETTINGS.items()} for _ in range(args.pairs)]
    summary = {}
    print(f"{'threshold':>9} | {'batch':>5} | {'per session':>11} | {'shared':>8} | ratio (median of pairs)")
    for threshold, sizes in pairs[0]["per_session"].items():
        for size in sizes:
            one, shared = ([pair[name][threshold][size] for pair in pairs] for name in SETTINGS)
            ratio = statistics.median(s / o for s, o in zip(shared, one))
            summary[f"{threshold}@b{size}"] = {"per_session": statistics.median(one),
                                               "shared": statistics.median(shared), "ratio": ratio}
            print(f"{threshold:>9} | {size:>5} | {statistics.median(one):11.0f} | {statistics.median(shared):8.0f} | "
                  f"{ratio:.2f}x")
    report = {"bundle": args.bundle, "data": str(args.data), "threads": args.threads, "pairs": pairs,
              "summary": summary}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
