"""Loss functions, each small and named after what its paper defines (see ../shared/METHODS.md)."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(labels) = -mean_i log softmax(z_i)[y_i]; rows labelled -1 are ignored."""
    return F.cross_entropy(logits, labels, ignore_index=-1)


def kl_to_teacher(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """KL(p_t || p_s) with p = softmax(z / T), averaged over rows (reduction batchmean)."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


def self_distillation(teacher_logits: torch.Tensor,
                      exit_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """FastBERT stage 3: sum_i KL(p_teacher || p_exit_i) over the exits below the teacher."""
    teacher = teacher_logits.detach()
    return torch.stack([kl_to_teacher(teacher, z) for z in exit_logits]).sum()


def joint_exits_cross_entropy(exit_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Joint exit training (PABEE, ElasticBERT): mean_i CE(labels) of the exits below the last."""
    return torch.stack([cross_entropy(z, labels) for z in exit_logits]).mean()


# -- knowledge distillation (docs/distillation.md) --------------------------------------------
# Shapes: logits [rows, classes]; hidden [rows, tokens, width]; attention [rows, heads, t, t];
# attention_mask [rows, tokens] with 1 for real tokens.

def distillation_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                    temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss T^2 * KL(softmax(t/T) || softmax(s/T)), batchmean.
    The T^2 keeps its gradients the same size whatever T (DistilBERT a_ce term, PKD a term)."""
    return temperature ** 2 * kl_to_teacher(teacher_logits.detach(), student_logits, temperature)


def logit_mse(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Tang et al.: ||z_s - z_t||^2 on the logits themselves (not softened probabilities),
    averaged over rows."""
    return (student_logits - teacher_logits).pow(2).sum(-1).mean()


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """TinyBERT prediction loss -sum_c softmax(t/T)_c * log_softmax(s/T)_c, mean over rows."""
    target = F.softmax(teacher_logits.detach() / temperature, dim=-1)
    return -(target * F.log_softmax(student_logits / temperature, dim=-1)).sum(-1).mean()


def _token_weights(attention_mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(like.shape[:2], dtype=like.dtype, device=like.device)
    return attention_mask.to(like.dtype)


def cosine_embedding(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """DistilBERT L_cos = mean over real tokens of 1 - cos(h_s, h_t) (torch's
    CosineEmbeddingLoss with target 1 on the non-padding positions)."""
    weights = _token_weights(attention_mask, student_hidden)
    cos = F.cosine_similarity(student_hidden, teacher_hidden.detach(), dim=-1)
    return ((1.0 - cos) * weights).sum() / weights.sum().clamp(min=1.0)


def hidden_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """TinyBERT L_hidn = MSE(H_s W_h, H_t) (pass the projected student states), also L_embd with
    the embeddings: mean of (h_s - h_t)^2 over the real tokens' elements (padding left out)."""
    weights = _token_weights(attention_mask, student_hidden)
    squared = (student_hidden - teacher_hidden.detach()).pow(2).sum(-1)
    return (squared * weights).sum() / (weights.sum().clamp(min=1.0) * student_hidden.size(-1))


def feature_map_mse(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """MobileBERT feature-map transfer: MSE(LN(h_s), LN(h_t)) over the real tokens, LN a layer
    normalisation without parameters (zero mean, unit variance over the width)."""
    width = (student_hidden.size(-1),)
    return hidden_mse(F.layer_norm(student_hidden, width), F.layer_norm(teacher_hidden, width),
                      attention_mask)


def _pair_mask(attention_mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[rows, tokens] -> [rows, 1, t, t]: 1 where both the query and the key are real tokens."""
    m = attention_mask.to(like.dtype)
    return (m[:, :, None] * m[:, None, :])[:, None]


def attention_score_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                        attention_mask: torch.Tensor) -> torch.Tensor:
    """TinyBERT L_attn = 1/h sum_i MSE(A_s_i, A_t_i) on the pre-softmax scores q k^T / sqrt(d),
    masked positions (padding query or key) zeroed on both sides, as the reference does; the
    mean runs over every [rows, heads, t, t] entry."""
    keep = _pair_mask(attention_mask, student_scores)
    return F.mse_loss(student_scores * keep, teacher_scores.detach() * keep)


def attention_kl(teacher_scores: torch.Tensor, student_scores: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
    """MobileBERT attention transfer: KL(A_t || A_s) with A = softmax(scores + mask) over the
    keys, averaged over heads and real query positions."""
    bias = (1.0 - attention_mask[:, None, None, :].to(student_scores.dtype)) * -1e9
    log_a_s = F.log_softmax(student_scores + bias, dim=-1)
    log_a_t = F.log_softmax(teacher_scores.detach() + bias, dim=-1)
    kl = (log_a_t.exp() * (log_a_t - log_a_s)).sum(-1)  # [rows, heads, queries]
    weights = attention_mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * weights).sum() / weights.sum().clamp(min=1.0)


def normalized_cls_mse(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """PKD L_PT = sum_j || h_s_j / |h_s_j| - h_t_j / |h_t_j| ||^2 over the supervised layers'
    [CLS] vectors ([rows, layers, width]), averaged, as the reference's MSELoss does, over rows,
    layers and width (this average is what its b = 500 is tuned for)."""
    return F.mse_loss(F.normalize(student_cls, dim=-1), F.normalize(teacher_cls.detach(), dim=-1))


# -- multi-task distillation (MT-DNN-KD, Liu et al. 2019) -------------------------------------

def ensemble_cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """CE(soft targets) = -sum_c q_c log softmax(z)_c, mean over rows: q the ensemble's averaged
    class probabilities (already probabilities: there is no one teacher logit to soften)."""
    return -(teacher_probs.detach() * F.log_softmax(student_logits, dim=-1)).sum(-1).mean()


def mtdnn_kd_classification(student_logits: torch.Tensor, labels: torch.Tensor,
                            teacher_probs: torch.Tensor | None) -> torch.Tensor:
    """MT-DNN-KD on a classification task: the average of CE(hard labels) and CE(soft targets);
    a task without a teacher (None) has its plain CE."""
    hard = cross_entropy(student_logits, labels)
    return hard if teacher_probs is None else 0.5 * (hard + ensemble_cross_entropy(teacher_probs, student_logits))


def mtdnn_kd_regression(student_scores: torch.Tensor, targets: torch.Tensor,
                        teacher_scores: torch.Tensor | None) -> torch.Tensor:
    """The same for regression with MSE: the average of MSE(labels) and MSE(the ensemble's mean
    score); without a teacher, MSE(labels)."""
    scores = student_scores.reshape(-1)
    hard = F.mse_loss(scores, targets.to(scores.dtype))
    return hard if teacher_scores is None else 0.5 * (hard + F.mse_loss(scores, teacher_scores.detach().to(scores.dtype)))


def score_self_distillation(teacher_scores: torch.Tensor, exit_scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """FastBERT's self-distillation for a regression head: sum_i MSE(y_exit_i, y_last)."""
    teacher = teacher_scores.detach().reshape(-1)
    return torch.stack([F.mse_loss(y.reshape(-1), teacher) for y in exit_scores]).sum()


# -- C-MLM distillation for generation (Chen et al. 2020) and per-token exits (CALM) ----------

def label_smoothed_nll(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.1,
                       ignore_index: int = -100) -> torch.Tensor:
    """NLL with label smoothing: (1 - e) * -log p(y) + e * mean_v -log p(v), mean over the
    positions whose label is not ignore_index. logits [..., vocab], labels [...]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=ignore_index, label_smoothing=smoothing)


def topk_soft_cross_entropy(student_logits: torch.Tensor, teacher_ids: torch.Tensor,
                            teacher_logits: torch.Tensor, temperature: float = 10.0) -> torch.Tensor:
    """-sum_k p_k log q(id_k), mean over positions: p = softmax(teacher top-K logits / T) over the
    K ids the teacher ranked first (renormalised over those the student's vocabulary has: id -1
    is one it lacks). student_logits [n, vocab]; teacher_ids, teacher_logits [n, K]."""
    present = teacher_ids >= 0
    scaled = (teacher_logits.float() / temperature).masked_fill(~present, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    has_any = present.any(-1)
    log_q = F.log_softmax(student_logits.float(), dim=-1).gather(-1, teacher_ids.clamp(min=0))
    per_position = -(probs * log_q).masked_fill(~present, 0.0).sum(-1)
    return per_position[has_any].mean() if has_any.any() else student_logits.sum() * 0.0


def cmlm_loss(student_logits: torch.Tensor, labels: torch.Tensor, teacher_ids: torch.Tensor | None,
              teacher_logits: torch.Tensor | None, alpha: float = 0.5, temperature: float = 10.0,
              smoothing: float = 0.1) -> torch.Tensor:
    """(1 - a) * NLL(label smoothing) + a * soft CE(teacher top-K) over the target positions
    (labels != -100, in row-major order, which is the order of the teacher rows given);
    without a teacher, the NLL alone (the baseline)."""
    nll = label_smoothed_nll(student_logits, labels, smoothing)
    if teacher_ids is None:
        return nll
    at = labels != -100
    return (1 - alpha) * nll + alpha * topk_soft_cross_entropy(student_logits[at], teacher_ids, teacher_logits,
                                                               temperature)


def exit_matching(last_logits: torch.Tensor, exit_logits: torch.Tensor) -> torch.Tensor:
    """KL(last layer || exit) per position, mean: an exit is trained to say what the last layer says."""
    target = F.softmax(last_logits.detach().float(), dim=-1)
    return F.kl_div(F.log_softmax(exit_logits.float(), dim=-1), target, reduction="batchmean")


def exit_confidence_loss(confidence_logit: torch.Tensor, exit_logits: torch.Tensor,
                         last_logits: torch.Tensor) -> torch.Tensor:
    """BCE of CALM's early-exit classifier: the label is whether this exit's top token is the last
    layer's (1) or not (0)."""
    agrees = (exit_logits.argmax(-1) == last_logits.argmax(-1)).float()
    return F.binary_cross_entropy_with_logits(confidence_logit.float(), agrees.detach())
