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


# -- distillation losses: each against a value worked out by hand -----------------------------

from training.losses import (  # noqa: E402
    attention_kl,
    attention_score_mse,
    cosine_embedding,
    distillation_kl,
    feature_map_mse,
    hidden_mse,
    normalized_cls_mse,
    soft_cross_entropy,
)

KL_08_05 = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)  # KL([.8, .2] || [.5, .5])


def test_distillation_kl_is_t_squared_times_kl_of_softened_distributions():
    teacher = torch.tensor([[2 * math.log(4.0), 0.0]])  # / T=2 -> softmax [0.8, 0.2]
    student = torch.tensor([[0.0, 0.0]], requires_grad=True)  # [0.5, 0.5] at any T
    loss = distillation_kl(teacher, student, temperature=2.0)
    assert loss.item() == pytest.approx(4 * KL_08_05, rel=1e-6)
    loss.backward()
    assert student.grad is not None


def test_soft_cross_entropy_averages_rows():
    teacher = torch.log(torch.tensor([[0.8, 0.2], [0.5, 0.5]]))
    student = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    row1 = math.log(2.0)  # -(0.8 + 0.2) log 0.5
    row2 = -(0.5 * math.log(0.9) + 0.5 * math.log(0.1))
    assert soft_cross_entropy(teacher, student).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)


def test_cosine_embedding_skips_padding():
    student = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 2.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # cos = 0 and 1 on the real tokens: mean(1 - 0, 1 - 1) = 0.5; the padded token is ignored
    assert cosine_embedding(student, teacher, mask).item() == pytest.approx(0.5, rel=1e-6)


def test_hidden_mse_over_real_tokens_and_width():
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 4.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # (0 + 4) + (9 + 0) over 2 tokens x 2 dims
    assert hidden_mse(student, teacher, mask).item() == pytest.approx(13 / 4, rel=1e-6)
    assert hidden_mse(student[:, :2], teacher[:, :2]).item() == pytest.approx(13 / 4, rel=1e-6)


def test_feature_map_mse_compares_layer_normalised_states():
    student = torch.tensor([[[1.0, 3.0]]])  # LN -> [-1, 1]
    teacher = torch.tensor([[[40.0, 0.0]]])  # LN -> [1, -1]: scale does not matter
    assert feature_map_mse(student, teacher).item() == pytest.approx((4 + 4) / 2, rel=1e-4)
    assert feature_map_mse(student, 10 * student + 3).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_score_mse_zeroes_masked_positions():
    student = torch.tensor([[[[1.0, 7.0], [7.0, 7.0]]]])  # [rows 1, heads 1, t 2, t 2]
    teacher = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]]]])
    mask = torch.tensor([[1, 0]])  # only (query 0, key 0) is real: (1 - 3)^2 / 4 entries
    assert attention_score_mse(student, teacher, mask).item() == pytest.approx(1.0, rel=1e-6)


def test_attention_kl_per_real_query_ignoring_padded_keys():
    teacher = torch.tensor([[[[math.log(0.8), math.log(0.2), 5.0],
                              [0.3, 0.1, 2.0],
                              [9.0, 1.0, 1.0]]]])
    student = torch.tensor([[[[0.0, 0.0, -3.0],
                              [0.3, 0.1, -7.0],
                              [0.0, 4.0, 1.0]]]])
    mask = torch.tensor([[1, 1, 0]])
    # query 0: KL([.8, .2] || [.5, .5]); query 1: equal rows, 0; query 2 is padding
    assert attention_kl(teacher, student, mask).item() == pytest.approx(KL_08_05 / 2, rel=1e-5)


def test_normalized_cls_mse_on_unit_vectors():
    student = torch.tensor([[[3.0, 4.0]]])  # -> [0.6, 0.8]
    teacher = torch.tensor([[[0.0, 2.0]]])  # -> [0, 1]
    # (0.6^2 + 0.2^2) averaged over the 2 dims
    assert normalized_cls_mse(student, teacher).item() == pytest.approx(0.2, rel=1e-6)
