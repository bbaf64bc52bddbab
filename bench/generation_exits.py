"""Per-token exits of a generation bundle, measured: ROUGE, decoder layers per token and wall time
at each threshold, and how the engine runs the rows that go on (app/generation.py COMPACT_BELOW),
all in one interleaved run against full depth.

    python -m bench.generation_exits models/gigaword-cmlm --data ../shared/data/gigaword/dev \\
        --limit 256 --thresholds 0,0.1,0.2,0.3 --compact-below 0,0.5,1 --repeats 3 --json out.json

Every (threshold, compact_below) setting runs once per repeat, in turn, and the median wall time
is kept: the decoder's (its layers and the cache fills of the layers tokens skipped, what exits
cut) and the whole generate call's. The outputs do not depend on compact_below (tested in
tests/app/test_generation.py); this script checks they are the same texts here too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from app.generation import GenerationEngine
from app.manifest import read_manifest
from training.generation_bundle import run_engine
from training.generation_eval import references, rouge
from training.seq2seq_data import read_pairs


def floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


def measure(engine: GenerationEngine, pairs, thresholds, compacts, repeats: int, batch_size: int,
            num_beams: int | None = None) -> list[dict]:
    sources, refs = [p.source for p in pairs], references(pairs)
    spec = engine.spec
    runs: dict[tuple[float, float], list[tuple[float, float]]] = {}
    texts: dict[tuple[float, float], list[str]] = {}
    layers: dict[float, float] = {}
    for _ in range(repeats):
        for t in thresholds:
            for c in compacts:
                engine.compact_below = c
                out, mean_layers, seconds, decoder_s = run_engine(engine, engine.encoder, sources, t, spec, batch_size,
                                                                    num_beams)
                runs.setdefault((t, c), []).append((decoder_s, seconds))
                if texts.setdefault((t, c), out) != out:
                    raise RuntimeError(f"threshold {t}, compact_below {c}: the outputs changed between repeats")
                layers[t] = mean_layers
    rows = []
    base_decoder = min(np.median([d for d, _ in runs[(0.0, c)]]) for c in compacts)
    base_whole = min(np.median([w for _, w in runs[(0.0, c)]]) for c in compacts)
    for t in thresholds:
        first = texts[(t, compacts[0])]
        if any(texts[(t, c)] != first for c in compacts):
            raise RuntimeError(f"threshold {t}: compact_below changed the outputs")
        scores = rouge(first, refs)
        for c in compacts:
            decoder_s = float(np.median([d for d, _ in runs[(t, c)]]))
            whole_s = float(np.median([w for _, w in runs[(t, c)]]))
            rows.append({"threshold": t, "compact_below": c, **scores, "mean_exit_layer": round(layers[t], 3),
                         "decoder_s": round(decoder_s, 3), "whole_s": round(whole_s, 3),
                         "decoder_speedup": round(base_decoder / decoder_s, 3),
                         "whole_speedup": round(base_whole / whole_s, 3)})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--data", type=Path, required=True, help="data prefix: PREFIX.src and PREFIX.tgt")
    p.add_argument("--limit", type=int, default=256)
    p.add_argument("--thresholds", type=floats, default=[0.0, 0.1, 0.2, 0.3])
    p.add_argument("--compact-below", type=floats, default=[0.0, 0.5, 1.0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-beams", type=int, default=None, help="beam width (default: the bundle's; 1 = greedy)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if 0.0 not in args.thresholds:
        args.thresholds = [0.0, *args.thresholds]
    engine = GenerationEngine(args.bundle, read_manifest(args.bundle), intra_op_threads=args.threads)
    engine.warm_up()
    rows = measure(engine, read_pairs(args.data, args.limit), args.thresholds, args.compact_below, args.repeats,
                   args.batch_size, args.num_beams)
    print("| threshold | compact below | ROUGE-L | decoder layers / token | decoder s | decoder speed-up "
          "| whole call s | whole speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['threshold']:g} | {r['compact_below']:g} | {r['rougeL']:.2f} | {r['mean_exit_layer']:.2f} "
              f"| {r['decoder_s']:.2f} | {r['decoder_speedup']:.2f}x | {r['whole_s']:.2f} | {r['whole_speedup']:.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "pairs": args.limit, "repeats": args.repeats,
                                         "batch_size": args.batch_size, "num_beams": args.num_beams or engine.spec.num_beams,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
