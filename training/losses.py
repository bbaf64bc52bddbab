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
