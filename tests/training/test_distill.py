"""Distillation parts: layer mappings, student initialisation, attention scores, the teacher
cache, augmentation, the MobileBERT backbone and progressive transfer, CLI checks."""

from __future__ import annotations

import pytest
import torch

from training.config import DistilBertConfig, MobileBertConfig, PkdConfig, TinyBertConfig
from training.distill import (
    TeacherCache,
    alternate_layers,
    attention_scores,
    find_tokenizer,
    load_teacher,
    mobilebert_student,
    parse_layer_map,
    pkd_layer_map,
    student_like_teacher,
    tinybert_student,
    transfer_stage,
    uniform_layer_map,
)
from training.model import EarlyExitModel, additive_mask, backbone_from_config


def tiny_teacher_model(layers: int = 4, hidden: int = 16, heads: int = 2, vocab: int = 50) -> EarlyExitModel:
    torch.manual_seed(0)
    backbone = backbone_from_config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=2 * hidden)
    return EarlyExitModel(backbone, num_labels=2, head_width=8).eval()


def batch():
    from training.dataset import Batch

    ids = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    return Batch(ids, mask, torch.zeros_like(ids), torch.tensor([0, 1]), torch.tensor([0, 1]))


# -- layer mappings -----------------------------------------------------------------------------

def test_tinybert_layer_map_is_m_times_l_over_m():
    assert uniform_layer_map(4, 12) == [3, 6, 9, 12]
    assert uniform_layer_map(3, 6) == [2, 4, 6]
    assert uniform_layer_map(6, 6) == [1, 2, 3, 4, 5, 6]
    assert uniform_layer_map(4, 6) == [1, 3, 4, 6]  # m * L / M rounded down


def test_distilbert_takes_alternate_layers_like_the_reference():
    assert [l - 1 for l in alternate_layers(6, 12)] == [0, 2, 4, 7, 9, 11]
    assert alternate_layers(3, 6) == [1, 4, 6]
    assert alternate_layers(1, 6) == [6]


def test_pkd_skip_and_last_layers():
    assert pkd_layer_map(6, 12, "skip") == [2, 4, 6, 8, 10]
    assert pkd_layer_map(6, 12, "last") == [7, 8, 9, 10, 11]
    assert pkd_layer_map(3, 6, "skip") == [2, 4]
    assert pkd_layer_map(3, 6, "last") == [4, 5]


def test_layer_map_option_is_checked():
    assert parse_layer_map(None, 3, 6, "x") is None
    assert parse_layer_map("2, 4,6", 3, 6, "x") == [2, 4, 6]
    for bad in ("2,4", "2,4,7", "0,1,2", "a,b,c"):
        with pytest.raises(ValueError, match="--layer-map"):
            parse_layer_map(bad, 3, 6, "x")


# -- students -----------------------------------------------------------------------------------

def test_distilbert_student_layer_i_equals_the_teacher_layer_it_was_copied_from():
    teacher = tiny_teacher_model(layers=4)
    sources = alternate_layers(2, 4)
    assert sources == [1, 4]
    student = student_like_teacher(teacher, sources, DistilBertConfig(head_width=8))
    assert student.num_layers == 2 and student.config.hidden_size == teacher.config.hidden_size
    for layer, source in zip(student.layers, sources):
        theirs = teacher.layers[source - 1].state_dict()
        for name, value in layer.state_dict().items():
            torch.testing.assert_close(value, theirs[name], rtol=0, atol=0)
    for name, value in student.backbone.embeddings.state_dict().items():
        torch.testing.assert_close(value, teacher.backbone.embeddings.state_dict()[name], rtol=0, atol=0)
    # each head starts as the teacher's head on its source layer; the student is an independent copy
    for head, source in zip(student.heads, sources):
        torch.testing.assert_close(head.out.weight, teacher.heads[source - 1].out.weight)
    with torch.no_grad():
        student.layers[0].output.dense.weight.add_(1.0)
    assert not torch.equal(student.layers[0].output.dense.weight, teacher.layers[0].output.dense.weight)


def test_pkd_student_is_the_first_k_teacher_layers():
    teacher = tiny_teacher_model(layers=4)
    student = student_like_teacher(teacher, range(1, 4), PkdConfig(head_width=8)).eval()
    b = batch()
    with torch.no_grad():
        ours = student.hidden_states(*b.inputs())
        theirs = teacher.hidden_states(*b.inputs())[:3]
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)
    # every head starts as the teacher's head on the same layer: the student answers as the
    # teacher's first three exits do
    with torch.no_grad():
        for ours_logits, theirs_logits in zip(student(*b.inputs()), teacher(*b.inputs())[:3]):
            torch.testing.assert_close(ours_logits, theirs_logits)


def test_tinybert_student_any_width_and_head_check():
    teacher = tiny_teacher_model(layers=4, hidden=16, heads=2)
    student = tinybert_student(teacher, TinyBertConfig(student_layers=2, student_hidden=12, head_width=8))
    assert student.num_layers == 2 and student.config.hidden_size == 12
    assert student.config.num_attention_heads == 2 and student.config.vocab_size == 50
    with pytest.raises(ValueError, match="--student-heads"):
        tinybert_student(teacher, TinyBertConfig(student_layers=2, student_hidden=9))


def test_attention_scores_helper_matches_transformers_attention():
    teacher = tiny_teacher_model()
    b = batch()
    with torch.no_grad():
        theirs = teacher.backbone(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                  token_type_ids=b.token_type_ids, output_attentions=True)
        hidden = teacher.embed(*b.inputs())
        for index, layer in enumerate(teacher.layers):
            scores = attention_scores(layer, hidden)
            probs = (scores + additive_mask(b.attention_mask, scores.dtype)).softmax(-1)
            torch.testing.assert_close(probs, theirs.attentions[index], atol=1e-5, rtol=1e-5)
            hidden = teacher.run_layer(index, hidden, b.attention_mask)


# -- MobileBERT ---------------------------------------------------------------------------------

def tiny_mobilebert(teacher: EarlyExitModel, **kw) -> EarlyExitModel:
    torch.manual_seed(0)
    cfg = MobileBertConfig(**{"student_layers": 3, "student_hidden": 8, "num_ffn": 2, "head_width": 8, **kw})
    return mobilebert_student(teacher, cfg).eval()


def test_mobilebert_shape_and_checkpoint_round_trip(tmp_path):
    teacher = tiny_teacher_model(hidden=16, heads=2)
    for norm, act in (("nonorm", "relu"), ("layernorm", "gelu")):
        student = tiny_mobilebert(teacher, norm=norm, activation=act)
        b = batch()
        with torch.no_grad():
            states = student.hidden_states(*b.inputs())
            logits = student(*b.inputs())
            alone = student(b.input_ids[1:, :3], b.attention_mask[1:, :3], b.token_type_ids[1:, :3])
        assert student.num_layers == 3 and all(s.shape == (2, 5, 16) for s in states)  # inter-block = teacher width
        assert student.layers[0].bottleneck.out_features == 8 and len(student.layers[0].ffns) == 2
        for padded, unpadded in zip(logits, alone):  # padding does not change a row
            torch.testing.assert_close(padded[1:], unpadded, atol=1e-5, rtol=1e-5)
        student.save(tmp_path / norm, {"labels": ["a", "b"]})
        loaded, meta = EarlyExitModel.load(tmp_path / norm)
        assert meta["backbone_kind"] == "mobilebert"
        with torch.no_grad():
            for a, c in zip(logits, loaded(*b.inputs())):
                torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="attention heads"):
        tiny_mobilebert(teacher, student_hidden=7)


def test_mobilebert_block_attention_scores_are_the_ones_it_uses():
    teacher = tiny_teacher_model()
    student = tiny_mobilebert(teacher)
    b = batch()
    block = student.layers[0]
    with torch.no_grad():
        hidden = student.embed(*b.inputs())
        probs = (attention_scores(block, hidden) + additive_mask(b.attention_mask, hidden.dtype)).softmax(-1)
        captured = {}
        block.attention_dropout.register_forward_hook(lambda m, i, o: captured.setdefault("probs", o))
        block(hidden, additive_mask(b.attention_mask, hidden.dtype))
    torch.testing.assert_close(probs, captured["probs"])


# -- with real (tiny) data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_task(tiny_teacher_dir, tiny_data, tmp_path_factory):
    from training.task import load_task

    return load_task(str(tiny_teacher_dir), tiny_data[0], tiny_data[1], limit_train=48,
                     workdir=tmp_path_factory.mktemp("task"))


@pytest.fixture(scope="module")
def teacher(tiny_bundle):
    return load_teacher(tiny_bundle["checkpoint"])[0]


def test_teacher_cache_matches_the_teacher_row_by_row(teacher, tiny_task):
    cache = TeacherCache(teacher, tiny_task.train, cls_layers=[1, 3], token_layer=3, budget_mb=64)
    assert cache.tokens is not None
    for b in tiny_task.train.batches(8, shuffle=True, seed=3):
        with torch.no_grad():
            states = teacher.hidden_states(*b.inputs())
            logits = teacher(*b.inputs())[-1]
        torch.testing.assert_close(cache.logits[b.index], logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.cls[b.index], torch.stack([states[0][:, 0], states[2][:, 0]], 1),
                                   atol=1e-5, rtol=1e-5)
        mask = b.attention_mask[..., None]
        torch.testing.assert_close(cache.token_states(b), states[2] * mask, atol=2e-2, rtol=1e-2)  # fp16
    assert TeacherCache(teacher, tiny_task.train, token_layer=3, budget_mb=0).token_states(b) is None


def test_teacher_must_be_an_early_exit_checkpoint(tiny_bundle, tiny_teacher_dir, tmp_path):
    import shutil

    with pytest.raises(ValueError, match="it is an ONNX bundle.*checkpoint"):
        load_teacher(tiny_bundle["bundle"])
    with pytest.raises(ValueError, match="not an early-exit checkpoint"):
        load_teacher(tiny_teacher_dir)  # a plain transformers folder
    # fastbert checkpoints carry their tokenizer; one without needs --tokenizer
    assert find_tokenizer(tiny_bundle["checkpoint"]) == tiny_bundle["checkpoint"] / "tokenizer.json"
    bare = shutil.copytree(tiny_bundle["checkpoint"], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="--tokenizer"):
        find_tokenizer(bare)
    assert find_tokenizer(bare, tiny_teacher_dir).name == "tokenizer.json"


def test_progressive_transfer_trains_one_block_and_freezes_the_ones_below(teacher, tiny_task):
    torch.manual_seed(0)
    cfg = MobileBertConfig(student_layers=3, student_hidden=8, num_ffn=2, head_width=8,
                           stage_epochs=1.0, stage_lr=1e-2, batch_size=16)
    student = mobilebert_student(teacher, cfg)
    parts = {"embeddings": student.backbone.embeddings, "heads": student.heads,
             **{f"block {i + 1}": block for i, block in enumerate(student.layers)}}
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in parts.items()}
    transfer_stage(student, teacher, tiny_task, cfg, [1, 2, 3], stage=2)
    changed = {name for name, m in parts.items()
               if any(not torch.equal(v, before[name][k]) for k, v in m.state_dict().items())}
    assert changed == {"block 2"}  # embeddings and block 1 frozen, block 3 not reached yet


# -- augmentation -------------------------------------------------------------------------------

def test_neighbours_are_nearest_whole_words(tiny_teacher_dir):
    from tokenizers import Tokenizer

    from training.augment import whole_word_tokens, word_neighbours

    tok = Tokenizer.from_file(str(tiny_teacher_dir / "tokenizer.json"))
    vocab = tok.get_vocab()
    torch.manual_seed(0)
    table = torch.randn(tok.get_vocab_size(), 8)
    table[vocab["film"]] = 3 * table[vocab["movie"]]  # same direction: cosine 1
    neighbours = word_neighbours(tok, table, ["movie", "Movie", "##s", "[CLS]", "notaword"], k=5)
    assert set(neighbours) == {"movie"}  # normalised, whole words only
    assert neighbours["movie"][0] == "film" and len(neighbours["movie"]) == 5
    words = whole_word_tokens(tok)
    assert "movie" not in neighbours["movie"] and all(w in words for w in neighbours["movie"])


def test_augmentation_is_deterministic_labels_only_originals(tiny_teacher_dir, tiny_data):
    from tokenizers import Tokenizer

    from training.augment import augment_examples
    from training.data import read_examples

    tok = Tokenizer.from_file(str(tiny_teacher_dir / "tokenizer.json"))
    examples = read_examples(tiny_data[0]).examples[:20]
    table = torch.randn(tok.get_vocab_size(), 8, generator=torch.Generator().manual_seed(0))
    one = augment_examples(examples, tok, table, copies=3, p=0.4, k=15, seed=7)
    two = augment_examples(examples, tok, table, copies=3, p=0.4, k=15, seed=7)
    assert one == two and one[:20] == examples
    copies = one[20:]
    assert 20 < len(copies) <= 60 and all(e.label is None for e in copies)
    assert augment_examples(examples, tok, table, copies=3, p=0.0, seed=7) == examples  # no change, no copy
    changed = [sum(a != b for a, b in zip(c.text.split(), e.text.split()))
               for c, e in zip(augment_examples(examples[:1], tok, table, copies=50, p=0.4, seed=1)[1:],
                               [examples[0]] * 50)]
    assert 0 < sum(changed) / len(changed) < len(examples[0].text.split())


# -- the command's options ------------------------------------------------------------------------

def test_an_option_of_another_method_is_refused(tmp_path):
    import argparse

    from training.distill_cli import add_distill_arguments, distill_values

    parser = argparse.ArgumentParser()
    add_distill_arguments(parser)
    base = ["--teacher", "t", "--train", "a", "--dev", "b", "--out", "c"]
    args = parser.parse_args(["--method", "pkd-skip", "--beta", "10", "--student-layers", "2", *base])
    assert distill_values(args) == {"beta": 10.0, "student_layers": 2}
    with pytest.raises(SystemExit, match="--aug-copies is not an option of --method distilbert"):
        distill_values(parser.parse_args(["--method", "distilbert", "--aug-copies", "2", *base]))


def test_embeddings_from_teacher_through_principal_directions():
    from training.distill import embeddings_from_teacher, principal_directions

    teacher = tiny_teacher_model(hidden=16)
    P = principal_directions(teacher.backbone.embeddings.word_embeddings.weight, 6)
    torch.testing.assert_close(P.T @ P, torch.eye(6), atol=1e-5, rtol=0)  # orthonormal directions
    # as wide as the teacher, nothing is lost: a MobileBERT student's embeddings start as the
    # teacher's word + position + token-type sum (NoNorm is the identity at initialisation)
    student = tiny_mobilebert(teacher, embedding_size=16, embedding_init="teacher")
    assert embeddings_from_teacher(student, teacher, "teacher") is not None
    b = batch()
    source = teacher.backbone.embeddings
    with torch.no_grad():
        expected = (source.word_embeddings(b.input_ids) + source.position_embeddings.weight[:5]
                    + source.token_type_embeddings(b.token_type_ids))
        torch.testing.assert_close(student.embed(*b.inputs()), expected, atol=1e-5, rtol=1e-4)
    narrow = tinybert_student(teacher, TinyBertConfig(student_layers=1, student_hidden=6, head_width=8))
    P = embeddings_from_teacher(narrow, teacher, "teacher")
    torch.testing.assert_close(narrow.backbone.embeddings.word_embeddings.weight,
                               source.word_embeddings.weight @ P)
    assert embeddings_from_teacher(narrow, teacher, "random") is None
