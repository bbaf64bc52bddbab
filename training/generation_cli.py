"""`offramp train cmlm-teacher` and `offramp train cmlm`: text generation by C-MLM distillation.

    offramp train cmlm-teacher --teacher ENCODER --train DATA/gigaword/train --out runs/cmlm-teacher
    offramp train cmlm --teacher-dir runs/cmlm-teacher --train DATA/gigaword/train \\
        --dev DATA/gigaword/dev --out models/gigaword-cmlm          # distilled student
    offramp train cmlm --no-teacher --tokenizer-from runs/cmlm-teacher ...  # the baseline

A data set is a path prefix: PREFIX.src and PREFIX.tgt (training/seq2seq_data.py). The teacher
folder keeps the fine-tuned MLM, the student's tokenizer (the teacher's wordpieces the training
data uses) and the cached top-K targets of the training pairs, keyed by the training files'
sha256 so that a student trained on other data refuses them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from training.cli import command
from training.errors import CommandError

log = logging.getLogger("offramp.train")

STUDENT_TOKENIZER = "student_tokenizer.json"
TEACHER_MAP = "teacher_to_student.npy"


def encoder_tokenizer(encoder: str) -> Path:
    path = Path(encoder) / "tokenizer.json"
    if not path.is_file():
        raise CommandError(f"{encoder}: no tokenizer.json (a local encoder folder is needed: its wordpieces are "
                           f"the student's vocabulary)")
    return path


def add_teacher_arguments(p: argparse.ArgumentParser) -> None:
    from training.methods.cmlm_teacher import TeacherConfig

    p.add_argument("--teacher", required=True, help="local folder of the BERT-family encoder to fine-tune")
    p.add_argument("--train", required=True, type=Path, help="data prefix: PREFIX.src and PREFIX.tgt")
    p.add_argument("--out", required=True, type=Path, help="teacher folder to write, e.g. runs/cmlm-teacher")
    p.add_argument("--limit-train", type=int, help="train on the first N pairs")
    defaults = TeacherConfig()
    for field in dataclasses.fields(TeacherConfig):
        p.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                       default=getattr(defaults, field.name))


@command
def run_teacher(args: argparse.Namespace) -> None:
    import numpy as np

    from training.methods.cmlm_teacher import CACHE_NAME, TeacherConfig, teacher_topk, train_teacher
    from training.seq2seq_data import (encode_pairs, file_record, plain_tokenizer, read_pairs, special_ids,
                                       student_tokenizer)

    cfg = TeacherConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TeacherConfig)})
    pairs = read_pairs(args.train, args.limit_train)
    tokenizer_file = encoder_tokenizer(args.teacher)
    teacher_tok = plain_tokenizer(tokenizer_file)
    student_tok, mapping = student_tokenizer(tokenizer_file, pairs)
    data = encode_pairs(teacher_tok, pairs, cfg.max_source, cfg.max_target)
    args.out.mkdir(parents=True, exist_ok=True)
    model, meta = train_teacher(args.teacher, data, special_ids(teacher_tok), cfg, args.out)
    teacher_tok.save(str(args.out / "tokenizer.json"))
    student_tok.save(str(args.out / STUDENT_TOKENIZER))
    np.save(args.out / TEACHER_MAP, mapping)
    cache = teacher_topk(model, data, special_ids(teacher_tok), cfg)
    cache["student_ids"] = np.where(cache["ids"] >= 0, mapping[cache["ids"]], -1).astype(np.int32)
    np.savez(args.out / CACHE_NAME, **cache)
    meta["train"] = file_record(args.train, len(pairs))
    meta["cache"] = {"positions": int(cache["offsets"][-1]), "top_k": cfg.top_k,
                     "outside_student_vocab": float((cache["student_ids"] < 0).mean())}
    (args.out / "cmlm_teacher.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("cmlm teacher: %s (%.0f s), top-k cache of %d positions", args.out, meta["wall_time_s"],
             meta["cache"]["positions"])


def register(methods) -> None:
    p = methods.add_parser("cmlm-teacher", help="fine-tune an encoder as a conditional MLM and cache its top-K "
                                                "targets (C-MLM)")
    add_teacher_arguments(p)
    p.set_defaults(func=run_teacher)
    p = methods.add_parser("cmlm", help="train a Transformer encoder-decoder student from C-MLM top-K targets (or "
                                        "without, --no-teacher), give it per-token exits, bundle it")
    add_student_arguments(p)
    p.set_defaults(func=run_student)


def add_student_arguments(p: argparse.ArgumentParser) -> None:
    from training.methods.cmlm import StudentConfig

    p.add_argument("--train", required=True, type=Path, help="data prefix: PREFIX.src and PREFIX.tgt")
    p.add_argument("--dev", required=True, type=Path, help="dev data prefix (per-epoch check, exit calibration)")
    p.add_argument("--test", type=Path, help="test data prefix: ROUGE of the student reported in the bundle")
    p.add_argument("--out", required=True, type=Path, help="bundle folder to write, e.g. models/gigaword-cmlm")
    p.add_argument("--teacher-dir", type=Path, help="an `offramp train cmlm-teacher` folder: its top-K targets "
                                                    "and tokenizer")
    p.add_argument("--no-teacher", action="store_true",
                   help="train the same student on the references alone (the baseline); the tokenizer still "
                        "comes from --teacher-dir")
    p.add_argument("--checkpoint", type=Path, help="run folder (default runs/NAME); a rerun resumes from it")
    p.add_argument("--limit-train", type=int)
    p.add_argument("--limit-dev", type=int)
    p.add_argument("--limit-test", type=int)
    p.add_argument("--num-beams", type=int, default=4, help="the bundle's default beam width")
    p.add_argument("--no-repeat-ngram-size", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--rouge-tolerance", type=float, default=0.5,
                   help="ROUGE-L points below full depth the recommended exit threshold may lose on dev")
    p.add_argument("--no-bundle", action="store_true",
                   help="stop after the PyTorch model and its ROUGE (results.json in the run folder)")
    p.add_argument("--weights", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: weights stored as float16 (half the bundle; computed in fp32)")
    defaults = StudentConfig()
    for f in dataclasses.fields(StudentConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))


def teacher_targets(teacher_dir: Path, train: Path, rows: int, data):
    """The teacher's cached top-K, refused unless made for these training files."""
    import numpy as np

    from training.methods.cmlm import TeacherTargets
    from training.methods.cmlm_teacher import CACHE_NAME, META_NAME
    from training.seq2seq_data import file_record

    meta = json.loads((teacher_dir / META_NAME).read_text())
    mine = file_record(train, rows)
    if meta["train"]["sha256"] != mine["sha256"] or meta["train"]["rows"] != rows:
        raise CommandError(f"{teacher_dir}: its top-K targets are of {meta['train']['path']} "
                           f"({meta['train']['rows']} pairs), not of {train} ({rows} pairs): run "
                           f"`offramp train cmlm-teacher` on these files")
    cache = np.load(teacher_dir / CACHE_NAME)
    offsets = cache["offsets"]
    lengths = np.diff(offsets)
    mine = np.array([len(t) + 1 for t in data.targets])
    if len(lengths) != len(mine) or not (lengths == mine).all():
        raise CommandError(f"{teacher_dir}: the cached targets do not line up with the student's tokens of {train} "
                           f"(different --max-target or tokenizer)")
    return TeacherTargets(cache["student_ids"], cache["logits"], offsets)


@command
def run_student(args: argparse.Namespace) -> None:
    import time

    from training.methods.cmlm import StudentConfig, train_exits, train_student
    from training.seq2seq_model import Seq2SeqStudent
    from training.seq2seq_data import encode_pairs, plain_tokenizer, read_pairs, special_ids

    if args.teacher_dir is None:
        raise CommandError("--teacher-dir is needed (its tokenizer, and unless --no-teacher its top-K targets)")
    cfg = StudentConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudentConfig)})
    tokenizer = plain_tokenizer(args.teacher_dir / STUDENT_TOKENIZER)
    specials = special_ids(tokenizer)
    train_pairs, dev_pairs = read_pairs(args.train, args.limit_train), read_pairs(args.dev, args.limit_dev)
    test_pairs = read_pairs(args.test, args.limit_test) if args.test else None
    data = encode_pairs(tokenizer, train_pairs, cfg.max_source, cfg.max_target)
    dev = encode_pairs(tokenizer, dev_pairs, cfg.max_source, cfg.max_target)
    teacher = None if args.no_teacher else teacher_targets(args.teacher_dir, args.train, len(train_pairs), data)
    run_dir = args.checkpoint or Path("runs") / args.out.name
    done = run_dir / "trained.json"  # both stages finished: a rerun goes straight to evaluation
    if done.is_file():
        model, report = Seq2SeqStudent.load(run_dir / "model"), json.loads(done.read_text())
        log.info("cmlm student: %s is trained, evaluating it", run_dir)
    else:
        model, report = train_student(data, dev, specials, tokenizer.get_vocab_size(), cfg, run_dir, teacher)
        if not args.no_bundle:  # exits serve the bundle; ROUGE is measured at full depth
            report["exits"] = train_exits(model, data, specials, cfg)
        report["train_wall_time_s"] = round(report["wall_time_s"] + report.get("exits", {}).get("wall_time_s", 0.0), 1)
        model.save(run_dir / "model")
        done.write_text(json.dumps(report, indent=2) + "\n")
    from training.generation_eval import decode, references, rouge

    decoding = dict(max_source=cfg.max_source, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                    no_repeat_ngram_size=args.no_repeat_ngram_size)
    for name, pairs in (("dev", dev_pairs), ("test", test_pairs)):
        if pairs is None:
            continue
        t0 = time.monotonic()
        texts, exits = decode(model, tokenizer, [p.source for p in pairs], desc=f"{name} decode", **decoding)
        report[f"{name}_rouge"] = rouge(texts, references(pairs))
        report[f"{name}_decode_s"] = round(time.monotonic() - t0, 1)
        log.info("%s ROUGE (pytorch, full depth, beams %d): %s", name, args.num_beams, report[f"{name}_rouge"])
        (run_dir / f"{name}_outputs.txt").write_text("".join(t + "\n" for t in texts))
    report.update(config=dataclasses.asdict(cfg), decoding=decoding, parameters=sum(p.numel() for p in model.parameters()))
    (run_dir / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.no_bundle:
        print(f"results written to {run_dir / 'results.json'} (no bundle: --no-bundle)")
        return
    from training.generation_bundle import write_bundle

    write_bundle(model, tokenizer, args, cfg, report, train_pairs, dev_pairs, test_pairs, run_dir)
