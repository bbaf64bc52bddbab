"""Sequence-to-sequence data: aligned source/target line files -> pairs -> wordpiece ids.

A data set is a path prefix: PREFIX.src and PREFIX.tgt, one example per line, aligned (Gigaword
as ../shared/data/gigaword ships it). Lines are normalised the way the Rush et al. preprocessing
needs: its unknown-word marks (`<unk>` in train/dev, `UNK` in test) become the tokenizer's
[UNK], its PTB brackets (-lrb-, -rrb-, ...) the characters they stand for.

The student's vocabulary is the teacher's wordpieces that the training data uses, plus every
single-character piece (so no word becomes [UNK] that the teacher could spell): the same
WordPiece tokenizer with a smaller vocabulary. On the training data it splits every word exactly
as the teacher does (greedy longest match over a subset that holds every piece the teacher
chose), so the teacher's distribution at a target position is the student's at that position.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from training.data import DataError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PTB_BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}
_UNKNOWN = re.compile(r"<unk>|\bUNK\b")
_BRACKET = re.compile("|".join(map(re.escape, PTB_BRACKETS)))


def normalise(line: str) -> str:
    line = _UNKNOWN.sub("[UNK]", line.strip())
    return _BRACKET.sub(lambda m: PTB_BRACKETS[m.group(0)], line)


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    line: int  # 1-based line in both files


def files_of(prefix: Path) -> tuple[Path, Path]:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".src"), prefix.with_name(prefix.name + ".tgt")


def read_pairs(prefix: Path, limit: int | None = None) -> list[Pair]:
    """The aligned pairs of PREFIX.src / PREFIX.tgt; a missing file, an empty line or files of
    different lengths is a DataError naming the file and line."""
    source_file, target_file = files_of(prefix)
    for f in (source_file, target_file):
        if not f.is_file():
            raise DataError(f"{f}: no such file (a data set is PREFIX.src and PREFIX.tgt)")
    sources = source_file.read_text(encoding="utf-8").splitlines()
    targets = target_file.read_text(encoding="utf-8").splitlines()
    if len(sources) != len(targets):
        shorter, line = (source_file, len(sources)) if len(sources) < len(targets) else (target_file, len(targets))
        raise DataError(f"{shorter}:{line + 1}: file ends here but {source_file.name} has {len(sources)} lines "
                        f"and {target_file.name} {len(targets)}: the two files must be aligned line by line")
    pairs = []
    for number, (s, t) in enumerate(zip(sources, targets), start=1):
        for f, text in ((source_file, s), (target_file, t)):
            if not text.strip():
                raise DataError(f"{f}:{number}: empty line (every example needs a source and a target)")
        pairs.append(Pair(normalise(s), normalise(t), number))
        if limit is not None and len(pairs) >= limit:
            break
    return pairs


def file_record(prefix: Path, rows: int) -> dict:
    """Both files' sha256 (for the manifest's provenance and the teacher cache's key)."""
    digest = hashlib.sha256()
    for f in files_of(prefix):
        digest.update(f.read_bytes())
    return {"path": str(prefix), "sha256": digest.hexdigest(), "rows": rows}


def plain_tokenizer(path: Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def student_tokenizer(teacher_tokenizer: Path, pairs: list[Pair]) -> tuple[Tokenizer, np.ndarray]:
    """The student's tokenizer (the teacher's WordPiece over the pieces `pairs` use, plus single
    characters) and teacher id -> student id (-1: not in the student's vocabulary)."""
    teacher = plain_tokenizer(teacher_tokenizer)
    spec = json.loads(teacher.to_str())
    if spec["model"]["type"] != "WordPiece":
        raise DataError(f"{teacher_tokenizer}: C-MLM needs a WordPiece tokenizer, got {spec['model']['type']}")
    teacher_vocab: dict[str, int] = spec["model"]["vocab"]
    missing = [s for s in SPECIALS if s not in teacher_vocab]
    if missing:
        raise DataError(f"{teacher_tokenizer}: the vocabulary lacks {missing}")
    used = Counter()
    for encoding in teacher.encode_batch([p.source for p in pairs] + [p.target for p in pairs],
                                         add_special_tokens=False):
        used.update(encoding.tokens)
    singles = [w for w in teacher_vocab if len(w) == 1 or (w.startswith("##") and len(w) == 3)]
    pieces = list(SPECIALS) + sorted(set(singles) - set(SPECIALS))
    pieces += [w for w, _ in used.most_common() if w not in set(pieces)]
    vocab = {w: i for i, w in enumerate(pieces)}
    spec["model"]["vocab"] = vocab
    for added in spec.get("added_tokens", []):
        added["id"] = vocab.get(added["content"], added["id"])
    spec["added_tokens"] = [a for a in spec.get("added_tokens", []) if a["content"] in vocab]
    post = spec.get("post_processor") or {}
    for name, special in (post.get("special_tokens") or {}).items():
        special["ids"] = [vocab[t] for t in special["tokens"]]
    for key in ("cls", "sep"):  # BertProcessing keeps [token, id] pairs
        if isinstance(post.get(key), list):
            post[key][1] = vocab[post[key][0]]
    spec["truncation"], spec["padding"] = None, None
    student = Tokenizer.from_str(json.dumps(spec))
    mapping = np.full(teacher.get_vocab_size(), -1, dtype=np.int64)
    for piece, teacher_id in teacher_vocab.items():
        if piece in vocab:
            mapping[teacher_id] = vocab[piece]
    return student, mapping


@dataclass
class EncodedPairs:
    """Wordpiece ids without special tokens, cut to the model's lengths."""

    sources: list[list[int]]
    targets: list[list[int]]  # the target pieces; the decoder learns them followed by [SEP]


def encode_pairs(tokenizer: Tokenizer, pairs: list[Pair], max_source: int, max_target: int) -> EncodedPairs:
    """max_source / max_target count the pieces without [CLS]/[SEP] (the model adds them)."""
    src = tokenizer.encode_batch([p.source for p in pairs], add_special_tokens=False)
    tgt = tokenizer.encode_batch([p.target for p in pairs], add_special_tokens=False)
    return EncodedPairs([e.ids[:max_source] for e in src], [e.ids[:max_target] for e in tgt])


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    vocab = tokenizer.get_vocab()
    return {name: vocab[token] for name, token in
            zip(("pad", "unk", "bos", "eos", "mask"), SPECIALS)}


def pad(rows: list[list[int]], value: int) -> np.ndarray:
    out = np.full((len(rows), max(map(len, rows))), value, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, :len(row)] = row
    return out
