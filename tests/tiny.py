"""Tiny models and data built in code, for fast tests (no hub, no pretrained weights)."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from training.data import read_examples

SHARED_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"
SST2 = SHARED_GLUE / "SST-2"
# Int8 graphs requantise activations: a row padded to another length runs kernels blocked for
# another shape, and a float rounding apart before a requantisation moves an activation one int8
# step, ~1e-5 to 1e-4 in a probability of a random tiny model (seen: 1.35e-5 and 1.6e-5 on ONNX
# Runtime, 7.5e-5 on OpenVINO). The shipped int8 bundle holds 1e-5 (tests/test_shipped_model.py).
TINY_INT8_ROW_TOLERANCE = 5e-4


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


# ---- a tiny random generation bundle (C-MLM student shape, training/seq2seq_model.py) ------------
GENERATION_TEXTS = [
    "the council approved the new budget on tuesday", "rain is expected across the north tonight",
    "a local team won the cup after extra time", "prices rose again in march", "council approves budget",
    "heavy rain expected in north", "local team wins cup", "prices rise in march", "fine",
    "the minister resigned after the vote", "shares fell sharply in early trading", "minister resigns",
    "police arrested two men on friday", "the president will visit china next week", "shares fall",
]


def tiny_generation_tokenizer(vocab_size: int = 160) -> Tokenizer:
    """[PAD] 0, [UNK] 1, [CLS] 2 (bos), [SEP] 3 (eos), [MASK] 4, every character alone and as
    "##c", then the words seen more than once, most frequent first (ties by spelling), up to
    `vocab_size`; other words split into characters. Built, not trained: the WordPiece trainer breaks frequency ties differently
    from one process to the next, and the random models built on these ids with them."""
    from collections import Counter

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = Counter(w for text in GENERATION_TEXTS
                    for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for w in words for c in w})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    ranked = sorted((w for w in words if len(w) > 1 and words[w] > 1), key=lambda w: (-words[w], w))
    vocab += ranked[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({piece: i for i, piece in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return tok


def tiny_generation_model(tokenizer: Tokenizer, seed: int = 0, eos_gain: float = 4.0, layer_gain: float = 5.0,
                          **config):
    """A random Seq2SeqStudent over `tokenizer`'s vocabulary, in eval mode, made to behave enough
    like a trained one for decoding tests: its decoder layers' outputs are scaled up (a random
    pre-LN decoder otherwise passes the token's embedding on and says one token whatever the
    source), eos is made likely enough that some generations end before their limit, and every
    exit classifier is standardised on sample states so that uncertainties spread over 0..1
    around 0.4 (thresholds of 0.2-0.6 then really send tokens out at every layer)."""
    import math

    import torch

    from training.seq2seq_model import Seq2SeqConfig, Seq2SeqStudent

    vocab = tokenizer.get_vocab()
    options = dict(vocab_size=tokenizer.get_vocab_size(), d_model=32, num_heads=4, ffn_size=64, encoder_layers=2,
                   decoder_layers=3, max_source_length=24, max_target_length=24, dropout=0.0,
                   pad_id=vocab["[PAD]"], unk_id=vocab["[UNK]"], bos_id=vocab["[CLS]"], eos_id=vocab["[SEP]"])
    options.update(config)
    torch.manual_seed(seed)
    model = Seq2SeqStudent(Seq2SeqConfig(**options)).eval()
    with torch.no_grad():
        for layer in model.decoder_layers:
            for linear in (layer.self_attention.out, layer.cross_attention.v, layer.cross_attention.out,
                           layer.ffn[0], layer.ffn[3]):
                linear.weight.mul_(layer_gain)
        model.embedding.weight[options["eos_id"]].mul_(eos_gain)
        generator = torch.Generator().manual_seed(seed)
        rows, vocab_size = 16, options["vocab_size"]
        source = torch.randint(5, vocab_size, (rows, 12), generator=generator)
        target = torch.randint(5, vocab_size, (rows, 10), generator=generator)
        target[:, 0] = options["bos_id"]
        mask = torch.ones_like(source)
        states = model.decoder_states(model.encode(source, mask), mask, target)
        for i, (head, state) in enumerate(zip(model.exit_confidence, states)):
            z = head(model.exit_norms[i](state)).flatten()
            gain = 2.5 / z.std()
            head.weight.mul_(gain)
            # confidence = sigmoid(gain (z - mean) + logit(0.6)): median uncertainty 0.4
            head.bias.copy_(head.bias * gain - z.mean() * gain + math.log(0.6 / 0.4))
    return model


def tiny_generation_bundle_dir(directory: Path, seed: int = 0, model=None, tokenizer: Tokenizer | None = None,
                               recommended_threshold: float = 0.3, weights: str = "fp32") -> Path:
    """A generation bundle of a tiny random student (or of `model` over `tokenizer`): its graphs,
    tokenizer.json and a minimal manifest (task "generation", no calibration)."""
    from app.manifest import GenerationSpec, Manifest, Provenance, describe_file, write_manifest
    from training.export_generation import export_generation, round_weights_to_fp16

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or tiny_generation_tokenizer()
    model = model if model is not None else tiny_generation_model(tokenizer, seed)
    if weights == "fp16":
        round_weights_to_fp16(model)
    graphs = export_generation(model, directory, weights=weights)
    tokenizer.save(str(directory / "tokenizer.json"))
    c = model.config
    spec = GenerationSpec(**graphs, num_encoder_layers=c.encoder_layers, num_heads=c.num_heads, head_dim=c.head_dim,
                          vocab_size=c.vocab_size, max_target_length=c.max_target_length, bos_id=c.bos_id,
                          eos_id=c.eos_id, pad_id=c.pad_id, unk_id=c.unk_id, max_new_tokens=8)
    files = [describe_file(directory, f) for f in sorted(spec.files() | {"tokenizer.json"})]
    manifest = Manifest(name=directory.name, task="generation", max_seq_length=c.max_source_length,
                        num_layers=c.decoder_layers, hidden_size=c.d_model, exit_head="calm-classifier",
                        recommended_threshold=recommended_threshold, generation=spec, files=files,
                        provenance=Provenance(teacher="none (tiny random model)", seed=seed))
    write_manifest(directory, manifest)
    return directory
