"""Multi-task distillation (MT-DNN-KD): data, sampling, ensembles, losses, metrics, the bundle."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from app.manifest import read_manifest
from training.data import DataError
from training.glue_metrics import classification_metrics, main_metric, regression_metrics
from training.losses import mtdnn_kd_classification, mtdnn_kd_regression, score_self_distillation
from training.multitask_data import MultiTaskDataset, is_regression, parse_task, read_part
from training.data import read_examples


class _Sized:
    """A stand-in dataset of `rows` rows (what MultiTaskDataset asks of a task's rows)."""

    def __init__(self, rows: int, task: int):
        self.rows, self.task = rows, task

    def __len__(self):
        return self.rows

    def num_batches(self, batch_size):
        return math.ceil(self.rows / batch_size)

    def batches(self, batch_size, shuffle, seed=0):
        from training.dataset import Batch

        for start in range(0, self.rows, batch_size):
            n = min(batch_size, self.rows - start)
            ids = torch.ones(n, 3, dtype=torch.long)
            yield Batch(ids, ids, ids, torch.full((n,), self.task), torch.arange(start, start + n))


def test_tasks_are_drawn_in_proportion_to_their_size():
    data = MultiTaskDataset([_Sized(640, 0), _Sized(160, 1), _Sized(32, 2)])
    batches = list(data.batches(32, shuffle=True, seed=3))
    assert len(batches) == data.num_batches(32) == 20 + 5 + 1
    assert Counter(b.task for b in batches) == {0: 20, 1: 5, 2: 1}
    for b in batches:  # each batch is one task's rows, labelled by the task it says
        assert (b.labels == b.task).all()
    order = [b.task for b in batches]
    assert order != sorted(order), "tasks must be interleaved, not one after the other"
    assert order == [b.task for b in data.batches(32, shuffle=True, seed=3)]  # seeded
    assert order != [b.task for b in data.batches(32, shuffle=True, seed=4)]
    # every row of every task once per epoch
    rows = Counter((b.task, int(i)) for b in batches for i in b.index)
    assert len(rows) == 640 + 160 + 32 and set(rows.values()) == {1}


def test_task_batch_keeps_its_task_when_split_between_processes():
    data = MultiTaskDataset([_Sized(10, 0), _Sized(10, 1)])
    batch = next(b for b in data.batches(4, shuffle=False) if b.task == 1)
    assert batch.select(slice(0, 2)).task == 1 and batch.to("cpu").task == 1


def test_losses_against_hand_computed_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    teacher = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    log_p = torch.log_softmax(logits, -1)
    hard = -(log_p[0, 0] + log_p[1, 0]) / 2
    soft = -((teacher * log_p).sum(-1)).mean()
    assert mtdnn_kd_classification(logits, labels, teacher).item() == pytest.approx(((hard + soft) / 2).item(), abs=1e-6)
    # by hand: log softmax([2, 0]) = [-0.126928, -2.126928]; log softmax([0, 1]) = [-1.313262, -0.313262]
    assert hard.item() == pytest.approx((0.126928 + 1.313262) / 2, abs=1e-5)
    assert soft.item() == pytest.approx((0.9 * 0.126928 + 0.1 * 2.126928 + 0.3 * 1.313262 + 0.7 * 0.313262) / 2, abs=1e-5)
    assert mtdnn_kd_classification(logits, labels, None).item() == pytest.approx(hard.item())

    scores, targets, teacher_scores = torch.tensor([[1.0], [3.0]]), torch.tensor([2.0, 3.0]), torch.tensor([1.5, 2.0])
    # MSE(labels) = (1 + 0) / 2; MSE(teacher) = (0.25 + 1) / 2
    assert mtdnn_kd_regression(scores, targets, teacher_scores).item() == pytest.approx((0.5 + 0.625) / 2)
    assert mtdnn_kd_regression(scores, targets, None).item() == pytest.approx(0.5)
    assert score_self_distillation(torch.tensor([1.0, 2.0]), [torch.tensor([[1.0], [1.0]]),
                                                               torch.tensor([[0.0], [2.0]])]).item() == pytest.approx(1.0)


def test_glue_metrics():
    m = classification_metrics(np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 0, 1]))
    assert m["accuracy"] == pytest.approx(0.8)
    # tp 2, fp 1, tn 2, fn 0: MCC = (2*2 - 1*0) / sqrt(3 * 2 * 2 * 3) = 4 / 6
    assert m["matthews"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))
    r = regression_metrics(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0]))
    assert r["spearman"] == pytest.approx(0.8)
    assert r["pearson"] == pytest.approx(0.8)
    assert main_metric("CoLA", "classification") == "matthews" and main_metric("mrpc", "classification") == "f1"
    assert main_metric("rte", "classification") == "accuracy" and main_metric("x", "regression") == "pearson"


def test_task_option_and_bad_rows_are_one_line_errors(tmp_path):
    assert parse_task("rte=a.tsv,b.tsv").name == "rte"
    for bad in ("rte", "rte=a.tsv", "=a,b", "r te=a,b"):
        with pytest.raises(DataError, match="--task"):
            parse_task(bad)
    train = tmp_path / "train.tsv"
    train.write_text("sentence1\tsentence2\tscore\na\tb\t1.5\nc\td\t2.25\ne\tf\tlots\n")
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence1\tsentence2\tscore\na\tb\t1.5\n")
    assert not is_regression(read_examples(train))  # "lots" is not a number: not detected as regression
    from tests.tiny import wordpiece_tokenizer
    from app.encoding import TextEncoder
    from training.multitask_data import TaskFiles

    encoder = TextEncoder(wordpiece_tokenizer(["a b c d e f"]), 16)
    with pytest.raises(DataError, match=r"train.tsv line 4: label 'lots' is not a number"):
        read_part(TaskFiles("sim", train, dev), encoder, 0.0, regression=True)


def test_tiny_bundle_lists_every_task_with_its_own_calibration(tiny_multitask_bundle, tiny_multitask_data):
    manifest = read_manifest(tiny_multitask_bundle)  # every file's sha256 checked
    assert manifest.task == "multitask" and manifest.labels == []
    tasks = {t.name: t for t in manifest.tasks}
    assert list(tasks) == ["sent", "pair", "sim"]
    assert (tasks["sent"].kind, tasks["sent"].text_pair, tasks["sent"].metric) == ("classification", False, "accuracy")
    assert (tasks["pair"].kind, tasks["pair"].text_pair) == ("classification", True)
    sim = tasks["sim"]
    assert (sim.kind, sim.text_pair, sim.metric, sim.labels) == ("regression", True, "pearson", [])
    assert sim.score_range[0] >= 0 and sim.score_range[1] <= 5 and sim.recommended_patience >= 1
    assert manifest.verification.passed
    for t in manifest.tasks:
        assert len(t.exits) == manifest.num_layers == 3 and len(t.dev_results) == 3
        assert t.calibration_data.held_out_fraction == pytest.approx(0.1)  # never the dev file
        assert t.calibration_data.path == str(tiny_multitask_data[t.name][0])
        full = next(p for p in t.calibration if p.threshold == 0.0 and p.patience in (None, 1))
        assert full.mean_exit_layer == 3.0
        assert {"mean_exit_layer", "measured_speedup"} <= set(t.dev_at_recommended)
    for name in ("sent", "pair"):  # classification tasks: every policy calibrated, as single bundles are
        assert len(tasks[name].exit_temperatures) == 3
        assert tasks[name].policies["max_prob"].recommended_threshold is not None
        assert [p.patience for p in tasks[name].policies["patience"].points] == [1, 2]
    assert sim.policies == {} and {p.patience for p in sim.calibration} == {1, 2, 3}
    assert tasks["sent"].calibration_rule == {"rule": "risk", "tolerance_points": 1.0, "epsilon": 0.1,
                                              "rows": tasks["sent"].calibration_data.rows}
    assert sim.calibration_rule["rule"] == "tolerance"
    # the shared layers once: one graph per layer, whatever the number of tasks
    assert len(manifest.graphs.layers) == 3
    assert len({f.path for f in manifest.files}) == 2 + 3 + 3 * 3


def test_ensemble_soft_targets_are_the_members_average(tiny_multitask_bundle, tiny_multitask_data):
    """The cached soft targets = the average of a fresh pass of each member over the train rows."""
    from app.encoding import TextEncoder
    from training.methods.multitask import MultiTaskConfig, build_ensemble
    from training.model import EarlyExitModel
    from training.multitask_data import TaskFiles

    teachers = tiny_multitask_bundle.parent.parent / "ckpt-teachers"
    encoder = TextEncoder.from_file(tiny_multitask_bundle / "tokenizer.json", 128)
    train, dev = tiny_multitask_data["pair"]
    part = read_part(TaskFiles("pair", train, dev), encoder, 0.1)
    ensemble = build_ensemble(part, "unused: members exist", MultiTaskConfig(ensemble_size=2), teachers)
    assert [m.name for m in ensemble.members] == ["seed42", "seed43"]
    fresh = []
    for member in ensemble.members:
        model, _ = EarlyExitModel.load(member)
        with torch.no_grad():
            rows = [torch.softmax(model(*b.inputs())[-1], -1) for b in part.train.batches(16, shuffle=False)]
        fresh.append(torch.cat(rows).numpy())
    np.testing.assert_allclose(ensemble.soft_targets, np.mean(fresh, axis=0), atol=1e-5)
    assert ensemble.soft_targets.shape == (len(part.train), 2)


def test_tasks_from_a_toml_recipe(tmp_path):
    import argparse

    from training.errors import CommandError
    from training.multitask_cli import task_specs

    recipe = tmp_path / "glue.toml"
    recipe.write_text('epochs = 2\n[tasks.sst2]\ntrain = "a.tsv"\ndev = "b.tsv"\nlabel_names = ["negative", "positive"]\n'
                      '[tasks.stsb]\ntrain = "c.tsv"\ndev = "d.tsv"\nregression = true\n')
    args = argparse.Namespace(task=[], label_names=[], regression=[], config=recipe)
    specs, names, regression = task_specs(args)
    assert [(s.name, s.train.name, s.dev.name) for s in specs] == [("sst2", "a.tsv", "b.tsv"), ("stsb", "c.tsv", "d.tsv")]
    assert names == {"sst2": ["negative", "positive"]} and regression == {"stsb"}
    with pytest.raises(CommandError, match="not among the tasks"):
        task_specs(argparse.Namespace(task=["rte=a,b"], label_names=["sst2=x,y"], regression=[], config=None))
    with pytest.raises(CommandError, match="no task"):
        task_specs(argparse.Namespace(task=[], label_names=[], regression=[], config=None))


def test_student_from_trains_only_the_exits_afresh(tiny_multitask_bundle, tiny_multitask_data, tmp_path, capsys):
    """--student-from keeps a finished student's encoder and classifiers bit for bit, makes new
    exits, and exports a bundle; a checkpoint of other tasks is refused in one line."""
    from app.cli import main
    from training.multitask_model import MultiTaskModel

    root = tiny_multitask_bundle.parent.parent
    source, _ = MultiTaskModel.load(root / "ckpt")
    args = ["train", "multitask", "--teacher", str(root / "bert"), "--student-from", str(root / "ckpt"),
            "--distill-epochs", "1", "--distill-lr", "1e-3", "--batch-size", "16", "--head-width", "16",
            "--threads", "2"]
    for name, (train, dev) in tiny_multitask_data.items():
        args += ["--task", f"{name}={train},{dev}"]
    main(args + ["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "tiny-mt")])
    again, meta = MultiTaskModel.load(tmp_path / "ckpt")
    assert meta["recipe"]["student_from"] == str(root / "ckpt")
    for (name, a), b in zip(source.backbone.state_dict().items(), again.backbone.state_dict().values()):
        assert torch.equal(a, b), name
    for task in source.task_names:
        for a, b in zip(source.last_head(task).parameters(), again.last_head(task).parameters()):
            assert torch.equal(a, b)
        first_old, first_new = (next(m.task_heads[task][0].parameters()) for m in (source, again))
        assert not torch.equal(first_old, first_new)
    manifest = read_manifest(tmp_path / "tiny-mt")
    assert [t.name for t in manifest.tasks] == ["sent", "pair", "sim"] and manifest.verification.passed

    sim = args.index(next(a for a in args if a.startswith("sim=")))
    wrong = args[:sim - 1] + args[sim + 1:]  # the same command without the task "sim"
    with pytest.raises(SystemExit) as refused:
        main(wrong + ["--checkpoint", str(tmp_path / "ckpt2"), "--out", str(tmp_path / "bad")])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--student-from" in line and "not [('sent', 2), ('pair', 2)]" in line


@pytest.fixture(scope="module")
def tiny_parts(tiny_multitask_bundle, tiny_multitask_data):
    from app.encoding import TextEncoder
    from training.multitask_data import TaskFiles

    encoder = TextEncoder.from_file(tiny_multitask_bundle / "tokenizer.json", 128)
    parts = [read_part(TaskFiles(name, train, dev), encoder, 0.1, 32)
             for name, (train, dev) in tiny_multitask_data.items()]
    return parts, str(tiny_multitask_bundle.parent.parent / "bert")


def _exit_weights(model):
    return [p.detach().clone() for name in model.task_names for head in model.task_heads[name][:-1]
            for p in head.parameters()]


def test_joint_exits_train_every_task_s_exits_with_the_student(tiny_parts):
    """--joint-exits: the student's training moves every task's exits; without it they stay as
    made (the exit stage is off here: distill_epochs 0)."""
    from training import loop
    from training.methods.multitask import MultiTaskConfig, train_student
    from training.model import load_backbone
    from training.multitask_model import MultiTaskModel

    parts, encoder = tiny_parts
    exits = {}
    for joint in (0.0, 1.0):
        cfg = MultiTaskConfig(epochs=1, distill_epochs=0, batch_size=16, lr=1e-3, head_width=16, joint_exits=joint)
        exits[joint] = _exit_weights(train_student(parts, encoder, cfg, {}))
    loop.seed_everything(cfg.seed)  # the exits as train_student makes them
    made = _exit_weights(MultiTaskModel(load_backbone(encoder), [(p.name, p.width) for p in parts], cfg.exit_head,
                                        cfg.head_width, cfg.dropout))
    assert all(torch.equal(a, b) for a, b in zip(made, exits[0.0]))
    assert all(not torch.equal(a, b) for a, b in zip(made, exits[1.0]))
    with pytest.raises(ValueError, match="joint_exits"):
        train_student(parts, encoder, MultiTaskConfig(epochs=1, joint_exits=-1.0), {})


def test_joint_student_loss_adds_the_mean_loss_of_the_exits(tiny_parts):
    from training.methods.multitask import student_task_loss
    from training.model import load_backbone
    from training.multitask_model import MultiTaskModel

    parts, encoder = tiny_parts
    torch.manual_seed(0)
    model = MultiTaskModel(load_backbone(encoder), [(p.name, p.width) for p in parts], "fastbert", 16, 0.0).eval()
    for part in parts:  # a classification task with a teacher, and the regression task without one
        batch = next(iter(part.train.batches(8, shuffle=False)))
        teacher = torch.softmax(torch.randn(len(batch.labels), part.width), -1) if part.kind != "regression" else None
        loss = mtdnn_kd_regression if part.kind == "regression" else mtdnn_kd_classification
        with torch.no_grad():
            states = model.hidden_states(*batch.inputs())
            each = [loss(model.task_logits(part.name, i, h, batch.attention_mask), batch.labels, teacher)
                    for i, h in enumerate(states)]
            expected = each[-1] + 0.5 * sum(each[:-1]) / (len(each) - 1)
            assert torch.isclose(student_task_loss(model, part, states, batch, teacher, 0.5), expected)
            assert torch.isclose(student_task_loss(model, part, states, batch, teacher), each[-1])


def test_joint_exits_with_student_from_is_one_line(tmp_path, capsys):
    from app.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["train", "multitask", "--teacher", "x", "--task", "a=a.tsv,b.tsv", "--student-from", str(tmp_path / "s"),
              "--joint-exits", "1", "--out", str(tmp_path / "out"), "--checkpoint", str(tmp_path / "ckpt")])
    assert refused.value.code == 2
    assert "--joint-exits trains the student, which --student-from keeps" in capsys.readouterr().err
