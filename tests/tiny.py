"""Tiny models and data built in code, for fast tests (no hub, no pretrained weights)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from training.data import read_examples

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
SST2 = SHARED_GLUE / "SST-2"


def write_rows(path: Path, rows: list[tuple[str, str]], header=("sentence", "label")) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return path


def sst2_subset(directory: Path, train_rows: int = 400, dev_rows: int = 100) -> tuple[Path, Path]:
    """The first rows of the real SST-2 train and dev files, written as small TSVs."""
    train = read_examples(SST2 / "train.tsv").examples[:train_rows]
    dev = read_examples(SST2 / "dev.tsv").examples[:dev_rows]
    return (write_rows(directory / "train.tsv", [(e.text, e.label) for e in train]),
            write_rows(directory / "dev.tsv", [(e.text, e.label) for e in dev]))


def wordpiece_tokenizer(texts: list[str], vocab_size: int = 1000) -> Tokenizer:
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def tiny_teacher(directory: Path, texts: list[str], layers: int = 3, hidden: int = 32, seed: int = 0,
                 dropout: float = 0.1) -> Path:
    """A random tiny BERT saved as a transformers folder with its tokenizer.json."""
    import torch

    from training.model import backbone_from_config

    directory.mkdir(parents=True, exist_ok=True)
    tok = wordpiece_tokenizer(texts)
    tok.save(str(directory / "tokenizer.json"))
    torch.manual_seed(seed)
    model = backbone_from_config(vocab_size=tok.get_vocab_size(), hidden_size=hidden,
                                 num_hidden_layers=layers, num_attention_heads=2,
                                 intermediate_size=hidden * 2, max_position_embeddings=128,
                                 hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model.save_pretrained(directory)
    return directory


def glue_subset(directory: Path, task: str, train_rows: int, dev_rows: int) -> tuple[Path, Path]:
    """The first rows of a shared GLUE task's train and dev files, header (if any) kept as is."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for split, rows in (("train", train_rows), ("dev", dev_rows)):
        lines = (SHARED_GLUE / task / f"{split}.tsv").read_text(encoding="utf-8-sig").splitlines(keepends=True)
        headerless = task == "CoLA"
        path = directory / f"{task}-{split}.tsv"
        path.write_text("".join(lines[: rows + (0 if headerless else 1)]))
        out.append(path)
    return out[0], out[1]
