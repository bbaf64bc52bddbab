"""The C-MLM results table (docs/generation.md) from the runs' results.json, with the teacher's
size and speed measured here for scale.

    python -m bench.generation_report --baseline runs/giga-base --distilled runs/giga-cmlm \\
        --teacher runs/cmlm-teacher --test ../shared/data/gigaword/test --json docs/bench/gigaword.json

The teacher is a masked LM, not a generator: its speed is one forward pass over [source; target]
per pair (what a single C-MLM prediction costs it), against the student's whole beam-search
generation per pair, both at batch 32 on this machine's threads.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def teacher_scale(teacher_dir: Path, test_prefix: Path, pairs: int = 256, batch_size: int = 32) -> dict:
    import torch
    from transformers import AutoModelForMaskedLM

    from training.methods.cmlm_teacher import teacher_inputs
    from training.seq2seq_data import encode_pairs, plain_tokenizer, read_pairs, special_ids

    model = AutoModelForMaskedLM.from_pretrained(teacher_dir).eval()
    tok = plain_tokenizer(teacher_dir / "tokenizer.json")
    sp = special_ids(tok)
    data = encode_pairs(tok, read_pairs(test_prefix, pairs), 62, 24)
    seconds = 0.0
    with torch.no_grad():
        for start in range(0, pairs, batch_size):
            ids, types, mask, _ = teacher_inputs(data.sources[start:start + batch_size],
                                                 data.targets[start:start + batch_size], sp["bos"], sp["eos"], sp["pad"])
            t0 = time.perf_counter()
            model(input_ids=torch.from_numpy(ids), token_type_ids=torch.from_numpy(types),
                  attention_mask=torch.from_numpy(mask))
            seconds += time.perf_counter() - t0
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "bytes_fp32": sum(p.numel() * 4 for p in model.parameters()),
            "ms_per_pair_forward": round(1000 * seconds / pairs, 2)}


def row(name: str, rouge: dict) -> str:
    return f"| {name} | {rouge['rouge1']:.2f} | {rouge['rouge2']:.2f} | {rouge['rougeL']:.2f} |"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", type=Path, required=True, help="run folder of `train cmlm --no-teacher`")
    p.add_argument("--distilled", type=Path, required=True, help="run folder of `train cmlm`")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--test", type=Path, required=True)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    base = json.loads((args.baseline / "results.json").read_text())
    dist = json.loads((args.distilled / "results.json").read_text())
    report = {"baseline": base, "distilled": dist, "teacher": teacher_scale(args.teacher, args.test)}
    lines = ["| student | ROUGE-1 | ROUGE-2 | ROUGE-L |", "|---|---|---|---|",
             row("without the teacher (PyTorch, full depth)", base["test_rouge"]),
             row("C-MLM distilled (PyTorch, full depth)", dist["test_rouge"])]
    for point in dist.get("test_onnx", []):
        lines.append(row(f"C-MLM distilled, ONNX, threshold {point['threshold']:g} "
                         f"({point['mean_exit_layer']:.2f} decoder layers/token, decoder layers {point['decoder_speedup']:.2f}x, "
                         f"whole call {point['measured_speedup']:.2f}x)",
                         point))
    gap = dist["test_rouge"]["rougeL"] - base["test_rouge"]["rougeL"]
    lines.append(f"\nROUGE-L gain of distillation: {gap:+.2f}; train wall time baseline "
                 f"{base['train_wall_time_s']:.0f} s, distilled {dist['train_wall_time_s']:.0f} s; "
                 f"student parameters {dist['parameters']:,}; teacher {report['teacher']['parameters']:,} "
                 f"({report['teacher']['ms_per_pair_forward']} ms per pair for one forward pass)")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o)) + "\n")


if __name__ == "__main__":
    main()
