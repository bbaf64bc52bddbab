"""Distilling BERT into a BiLSTM (Tang et al. 2019): a one-layer BiLSTM over word embeddings,
max-pooled, with a ReLU MLP classifier (training/bilstm.py), trained on
a * CE(labels) + (1 - a) * ||z_student - z_teacher||^2, the teacher's logits themselves.

Words, not wordpieces: a word-level vocabulary is built from the training text and written as a
`tokenizers` JSON (BERT's normaliser and pre-tokeniser, a WordLevel model), so the bundle is
tokenised by `tokenizers` alone like every other. It replaces the teacher's tokenizer in the
student's checkpoint and bundle. No word2vec is reachable here: word vectors start as the mean of
the teacher's input embeddings of each word's wordpieces, through the teacher embedding table's
top principal directions where the student is narrower (`embedding_init = "random"` to compare).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from app.encoding import TextEncoder
from training import loop, progress
from training.bilstm import BiLstmBackbone, BiLstmConfig
from training.config import DistillConfig
from training.data import Example
from training.dataset import Batch, EncodedDataset, model_input
from training.errors import RecipeError
from training.losses import cross_entropy, logit_mse
from training.methods import Method
from training.model import EarlyExitModel
from training.students import principal_directions
from training.task import Task
from training.word_augment import Rules, augment, load_tagger, split, tag

log = logging.getLogger(__name__)

# [PAD] is id 0; [MASK] is the masking rule's; [SEP] ends the first text of a pair.
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[MASK]", "[SEP]"]


@dataclass
class BiLstmDistillConfig(DistillConfig):
    """Student: embedding_size-wide word vectors, lstm_size units per direction, a head_width
    ReLU layer (300 / 150 / 200 as in the paper for SST-2). alpha weighs the label term: 0 keeps
    the distillation term alone (augmented rows have no labels). AdamW through the shared loop
    (the paper used Adadelta)."""
    embedding_size: int = 300
    lstm_size: int = 150
    head_width: int = 200
    exit_head: str = "maxpool"
    exit_epochs: float = 0.0  # one layer: no exits below it to self-distil
    alpha: float = 0.0
    epochs: float = 10.0
    lr: float = 1e-3
    batch_size: int = 50
    warmup: float = 0.0
    weight_decay: float = 0.0
    dropout: float = 0.1
    min_word_count: int = 1  # words seen fewer times in the training text are [UNK]
    max_vocab: int = 100_000
    embedding_init: str = "teacher"  # "teacher" (mean of wordpiece vectors) or "random"
    # Augmentation (training/word_augment.py): n_iter tries per example; each rule off at 0.
    aug_copies: int = 20
    aug_mask: float = 0.1
    aug_pos: float = 0.1
    aug_ngram: float = 0.25
    cache_dir: str = "runs/cache"  # the augmented, teacher-labelled set, built once per setting


def word_tokenizer(texts: Iterable[str], min_count: int = 1, max_vocab: int = 100_000) -> Tokenizer:
    """A WordLevel tokenizer over the words of `texts`, lower-cased and split like BERT's; a pair
    is written "A [SEP] B", A's tokens (and [SEP]) of type 0 and B's of type 1."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordLevelTrainer(vocab_size=max_vocab, min_frequency=min_count,
                                        special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A", pair="$A [SEP] $B:1", special_tokens=[("[SEP]", tokenizer.token_to_id("[SEP]"))])
    return tokenizer


@torch.no_grad()
def embeddings_from_wordpieces(words: Tokenizer, wordpieces: Tokenizer, table: torch.Tensor,
                               width: int, seed: int) -> torch.Tensor:
    """[vocabulary, width]: each word's vector the mean of its wordpieces' rows of the teacher's
    input embedding `table`, mapped to `width` by the table's top principal directions (or, if
    the student is wider, the mean in the first columns and small random values after)."""
    table = table.detach().float().cpu()
    vocab = words.get_vocab()
    means = torch.zeros(len(vocab), table.size(1))
    for word, index in vocab.items():
        if word == "[PAD]":
            continue
        if word in ("[UNK]", "[MASK]"):
            piece = wordpieces.token_to_id(word)
            means[index] = table[piece] if piece is not None else table.mean(0)
            continue
        ids = wordpieces.encode(word, add_special_tokens=False).ids
        means[index] = table[ids].mean(0) if ids else table.mean(0)
    if width <= table.size(1):
        vectors = means @ principal_directions(table, width)
    else:
        generator = torch.Generator().manual_seed(seed)
        vectors = torch.cat([means, torch.randn(len(vocab), width - table.size(1), generator=generator) * 0.02], 1)
    vectors[vocab["[PAD]"]] = 0  # as nn.Embedding keeps its padding row
    return vectors


def bilstm_student(teacher: EarlyExitModel, vocab_size: int, cfg: BiLstmDistillConfig,
                   siamese: bool = False) -> EarlyExitModel:
    backbone = BiLstmBackbone(BiLstmConfig(vocab_size=vocab_size, embedding_size=cfg.embedding_size,
                                           lstm_size=cfg.lstm_size, siamese=siamese))
    head = "siamese" if siamese else "maxpool"
    return EarlyExitModel(backbone, teacher.num_labels, head, cfg.head_width, cfg.dropout, teacher_head=head)


def to_words(task: Task, tokenizer: Tokenizer, cfg: BiLstmDistillConfig, train_examples: list[Example]) -> None:
    """The task's data re-encoded in words, training on `train_examples` (same rows, same order
    as their teacher logits); the word tokenizer becomes the task's, so the checkpoint and the
    bundle carry it."""
    tokenizer.save(str(task.tokenizer_file))
    encoder = TextEncoder(tokenizer, cfg.max_seq_length)
    labels = task.source_labels
    task.train = EncodedDataset(train_examples, encoder, labels)
    task.dev = EncodedDataset(task.dev.examples, encoder, labels)
    task.distill_data = EncodedDataset(task.distill_data.examples, encoder, labels)
    task.encoder = encoder


def augmented_and_labelled(teacher: EarlyExitModel, task: Task, cfg: BiLstmDistillConfig):
    """(the training examples followed by their augmented copies, the teacher's logits for
    every one of them [rows, classes]) from the cache, or built and cached."""
    rules = Rules(cfg.aug_mask, cfg.aug_pos, cfg.aug_ngram)
    originals = list(task.train.examples)
    copies = cfg.aug_copies if rules.names() else 0
    if task.text_pair and copies:
        log.info("bilstm: no augmentation for sentence pairs (the rules are defined on one sentence)")
        copies = 0
    key = _cache_key(teacher, originals, rules, copies, cfg.seed)
    path = Path(cfg.cache_dir) / f"bilstm-augmented-{key}.npz"
    if path.is_file():
        saved = np.load(path, allow_pickle=False)
        log.info("bilstm: augmented set from the cache %s: %s rows", path, f"{len(saved['logits']):,}")
        extra = [Example(text=str(t)) for t in saved["texts"]]
        return originals + extra, saved["logits"]
    if cfg.alpha == 1 and not copies:  # labels alone: the teacher has nothing to say
        return originals, np.zeros((len(originals), teacher.num_labels), dtype=np.float32)
    texts = [model_input(e) for e in originals]
    extra: list[Example] = []
    if copies:
        with progress.phase("augmentation", f"{len(texts):,} rows x {copies} tries, rules {', '.join(rules.names())}") as p:
            sentences = tag(texts, load_tagger()) if rules.p_pos > 0 else split(texts)
            extra = [Example(text=t) for _, t in augment(sentences, rules, copies, cfg.seed)]
            p.result = f"{len(extra):,} new rows"
    with progress.phase("teacher logits (ONNX)", f"{len(originals) + len(extra):,} rows"):
        logits = onnx_teacher_logits(teacher, task.encoder, texts + [model_input(e) for e in extra])
    if task.runtime is None or task.runtime.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, texts=np.array([e.text for e in extra], dtype=str), logits=logits)
        partial.rename(path)
        log.info("bilstm: augmented set cached in %s", path)
    return originals + extra, logits


def _cache_key(teacher: EarlyExitModel, examples, rules: Rules, copies: int, seed: int) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(f"{e.text}\t{e.text_pair}".encode() + b"\0")
    with torch.no_grad():  # the teacher's weights, cheaply: any change moves these sums
        checksum = [float(p.double().sum()) for p in teacher.parameters()]
    digest.update(json.dumps([dataclasses.asdict(rules), copies, seed, checksum]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def onnx_teacher_logits(teacher: EarlyExitModel, encoder: TextEncoder, texts: list,
                        batch_size: int = 64) -> np.ndarray:
    """The teacher's last-layer logits through its ONNX export and the serving engine: the
    fast path for the many augmented rows."""
    from app.engine import Engine
    from app.manifest import Graphs, Manifest
    from training.export import export_graphs, onnx_layer_logits

    with tempfile.TemporaryDirectory(prefix="offramp-teacher-") as folder:
        teacher_cpu = copy.deepcopy(teacher).cpu().eval()
        graphs = export_graphs(teacher_cpu, Path(folder))
        manifest = Manifest.model_construct(graphs=Graphs(embeddings=graphs.embeddings, layers=graphs.layers),
                                            num_layers=teacher_cpu.num_layers, labels=[])
        engine = Engine(Path(folder), manifest)
        # In order of length, so that a batch's rows pad little (a row's logits do not depend
        # on its batch-mates), and back to the given order after.
        order = np.argsort([len(t) if isinstance(t, str) else sum(map(len, t)) for t in texts], kind="stable")
        out = np.zeros((len(texts), teacher_cpu.num_labels), dtype=np.float32)
        with progress.bar(total=len(texts), desc="teacher logits", unit="row") as bar:
            for start in range(0, len(texts), batch_size):
                rows = order[start:start + batch_size]
                out[rows] = onnx_layer_logits(engine, encoder.encode([texts[i] for i in rows]))[-1]
                bar.update(len(rows))
    return out


def distil_bilstm(teacher: EarlyExitModel, task: Task, cfg: BiLstmDistillConfig) -> EarlyExitModel:
    for name in ("student_layers", "student_hidden", "layer_map"):
        if getattr(cfg, name) is not None:
            raise RecipeError(f"bilstm: --{name.replace('_', '-')} is not an option of this student (its size is "
                             f"--embedding-size and --lstm-size)")
    if cfg.exit_head != "maxpool":
        raise RecipeError(f"bilstm: its classifier is the max-pool head (siamese for pairs), not {cfg.exit_head!r}")
    if cfg.embedding_init not in ("teacher", "random"):
        raise RecipeError(f"embedding_init must be 'teacher' or 'random', not {cfg.embedding_init!r}")
    torch.manual_seed(cfg.seed)
    wordpieces = task.encoder.tokenizer
    texts = [text for e in task.distill_data.examples for text in (e.text, e.text_pair) if text is not None]
    words = word_tokenizer(texts, cfg.min_word_count, cfg.max_vocab)
    # The training rows and their augmented copies, labelled by the teacher (in its wordpieces,
    # before the task switches to words); cached rows line up with the dataset by index.
    examples, teacher_logits = augmented_and_labelled(teacher, task, cfg)
    to_words(task, words, cfg, examples)
    teacher_logits = torch.from_numpy(teacher_logits).to(next(teacher.parameters()).device)
    student = bilstm_student(teacher, words.get_vocab_size(), cfg, siamese=task.text_pair)
    log.info("bilstm: %s words (min count %d), %d-wide vectors, %d x 2 LSTM units, %s parameters",
             f"{words.get_vocab_size():,}", cfg.min_word_count, cfg.embedding_size, cfg.lstm_size,
             f"{sum(p.numel() for p in student.parameters()):,}")
    if cfg.embedding_init == "teacher":
        vectors = embeddings_from_wordpieces(words, wordpieces, teacher.backbone.embeddings.word_embeddings.weight,
                                             cfg.embedding_size, cfg.seed)
        with torch.no_grad():
            student.backbone.embeddings.word_embeddings.weight.copy_(vectors)

    def loss_fn(batch: Batch) -> torch.Tensor:
        states = student.hidden_states(*batch.inputs())
        logits = student.exit_logits(0, states[-1], batch.attention_mask)
        loss = (1 - cfg.alpha) * logit_mse(teacher_logits[batch.index], logits)
        if cfg.alpha:
            loss = loss + cfg.alpha * cross_entropy(logits, batch.labels)
        return loss

    loop.train_phase("bilstm", list(student.parameters()), student, task.train, loss_fn, cfg.epochs, cfg.lr, cfg, task)
    return student


METHOD = Method("bilstm", "distill", BiLstmDistillConfig,
                "BiLSTM (Tang et al.): word-level one-layer BiLSTM on the teacher's logits (MSE)", distil_bilstm)
