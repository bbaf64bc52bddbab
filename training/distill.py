"""Task-specific knowledge distillation of an early-exit teacher into a smaller student.

A method (training/methods/, one file per paper) is its config + the one training loop
(training.loop.train) + the shared losses (training/losses.py) + the parts that differ: how the
student is built and initialised, which teacher layer each student layer learns from, and the
loss of one batch. Each returns the student with its last classifier trained; `distil` then
self-distils FastBERT exits into it (training/methods/fastbert.py, stage 2, the student as its
own teacher), so every student exports to the same ONNX bundle and serves like any other.

Methods, formulas and what differs from the papers: docs/distillation.md.
"""

from __future__ import annotations

from training import loop
from training.config import DistillConfig
from training.methods import distill_methods
from training.methods.fastbert import FastBertConfig, self_distil_exits
from training.model import EarlyExitModel
from training.task import Task

# Names this module exported before the methods got their own files (old import paths).
from training.methods.mobilebert import distil_mobilebert, mobilebert_student, transfer_stage  # noqa: F401
from training.methods.pkd import distil_pkd, pkd_layer_map  # noqa: F401
from training.methods.tinybert import augmented_dataset, distil_tinybert, tinybert_student  # noqa: F401
from training.methods.distilbert import distil_distilbert  # noqa: F401
from training.students import (  # noqa: F401
    alternate_layers, attention_scores, classifier_params, embeddings_from_teacher, last_logits, layer_states,
    parse_layer_map, principal_directions, student_like_teacher, uniform_layer_map, with_heads)
from training.teacher import TeacherCache, find_tokenizer, load_teacher  # noqa: F401

__all__ = [
    "distil", "add_exits",
    "distil_distilbert", "distil_pkd", "pkd_layer_map", "distil_tinybert", "tinybert_student", "augmented_dataset",
    "distil_mobilebert", "mobilebert_student", "transfer_stage",
    "alternate_layers", "attention_scores", "classifier_params", "embeddings_from_teacher", "last_logits",
    "layer_states", "parse_layer_map", "principal_directions", "student_like_teacher", "uniform_layer_map",
    "with_heads", "TeacherCache", "find_tokenizer", "load_teacher",
]


def add_exits(student: EarlyExitModel, task: Task, cfg: DistillConfig) -> None:
    """FastBERT stage 2 on the student: its exits learn from its own (frozen) last classifier."""
    if cfg.exit_epochs > 0:
        self_distil_exits(student, task, FastBertConfig(
            exit_head=cfg.exit_head, head_width=cfg.head_width, batch_size=cfg.batch_size, warmup=cfg.warmup,
            distill_epochs=cfg.exit_epochs, distill_lr=cfg.exit_lr, seed=cfg.seed))


def distil(method: str, teacher: EarlyExitModel, task: Task, cfg: DistillConfig) -> EarlyExitModel:
    """Distil `teacher` into a new student by `method`, then give it FastBERT exits."""
    methods = distill_methods()
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, not {method!r}")
    loop.seed_everything(cfg.seed)
    teacher.eval()
    student = methods[method].run(teacher, task, cfg)
    add_exits(student, task, cfg)
    return student.eval()
