"""FastBERT's stage 1 with joint exits (`joint_exits`): the exits learn with the backbone."""

from __future__ import annotations

import pytest
import torch

from training.losses import cross_entropy
from training.methods.fastbert import FastBertConfig, fine_tune, joint_exit_loss
from training.model import EarlyExitModel, load_backbone


@pytest.fixture(scope="module")
def tiny_task(tiny_teacher_dir, tiny_data, tmp_path_factory):
    from training.task import load_task

    return load_task(str(tiny_teacher_dir), tiny_data[0], tiny_data[1], limit_train=48,
                     workdir=tmp_path_factory.mktemp("task"))


def fresh_model(task) -> EarlyExitModel:
    torch.manual_seed(0)
    return EarlyExitModel(load_backbone(task.teacher), len(task.labels), "fastbert", 16, 0.0)


def exit_weights(model: EarlyExitModel) -> list[torch.Tensor]:
    return [p.detach().clone() for head in model.heads[:-1] for p in head.parameters()]


@pytest.mark.parametrize("joint, exits_move", [(0.0, False), (1.0, True)])
def test_stage_1_trains_the_exits_only_when_joint(tiny_task, joint, exits_move):
    model = fresh_model(tiny_task)
    before = exit_weights(model)
    cfg = FastBertConfig(epochs=1, batch_size=16, lr=1e-3, head_width=16, joint_exits=joint)
    fine_tune(model, tiny_task, cfg)
    moved = [not torch.equal(a, b) for a, b in zip(before, exit_weights(model))]
    assert all(moved) if exits_move else not any(moved)


def test_joint_exit_loss_is_the_mean_cross_entropy_of_the_early_exits(tiny_task):
    model = fresh_model(tiny_task).eval()
    batch = next(iter(tiny_task.train.batches(8, shuffle=False, seed=0)))
    with torch.no_grad():
        states = model.hidden_states(*batch.inputs())
        expected = sum(cross_entropy(model.exit_logits(i, h, batch.attention_mask), batch.labels)
                       for i, h in enumerate(states[:-1])) / (model.num_layers - 1)
        assert torch.isclose(joint_exit_loss(model, states, batch), expected)


def test_negative_joint_weight_is_refused(tiny_task):
    with pytest.raises(ValueError, match="joint_exits"):
        fine_tune(fresh_model(tiny_task), tiny_task, FastBertConfig(epochs=1, joint_exits=-1.0))
