import math

import pytest
import torch

from training.losses import cross_entropy, kl_to_teacher, self_distillation


def test_kl_to_teacher_against_a_hand_computed_value():
    teacher = torch.log(torch.tensor([[0.8, 0.2]]))
    student = torch.log(torch.tensor([[0.5, 0.5]]))
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    assert kl_to_teacher(teacher, student).item() == pytest.approx(expected, rel=1e-6)
    assert kl_to_teacher(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_self_distillation_sums_over_exits_and_stops_teacher_gradients():
    teacher = torch.log(torch.tensor([[0.8, 0.2]])).requires_grad_()
    exits = [torch.log(torch.tensor([[0.5, 0.5]])).requires_grad_(),
             torch.log(torch.tensor([[0.8, 0.2]])).requires_grad_()]
    loss = self_distillation(teacher, exits)
    assert loss.item() == pytest.approx(0.8 * math.log(1.6) + 0.2 * math.log(0.4), rel=1e-6)
    loss.backward()
    assert teacher.grad is None and exits[0].grad is not None


def test_cross_entropy_ignores_unlabelled_rows():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    value = cross_entropy(logits, torch.tensor([0, -1])).item()
    assert value == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
