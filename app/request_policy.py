"""A request's task and exit settings, its defaults filled in from the model: the bundle's own
calibration, or for a multi-task bundle the calibration of the task the request names.

Budgets (`max_accuracy_drop`) read each calibration point's `metric` where it has one (a
multi-task bundle's task: its own metric, MRPC's F1, CoLA's Matthews correlation, STS-B's
Pearson, the one its recommended setting was chosen by), else its `accuracy`: points of that
value (x 100) below full depth (threshold 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from app.manifest import CalibrationPoint, PolicyCalibration
from app.policies import REGRESSION, policy_code
from app.registry import LoadedModel


class RequestError(Exception):
    """A request the server will not run: the HTTP layers map it to a 4xx naming the field."""

    def __init__(self, status: int, field: str, message: str, error_type: str = "validation"):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.error_type = status, field, error_type


@dataclass
class Tables:
    """Where a request's defaults and budgets come from."""

    owner: str  # in messages: "model 'm'" or "task 'sim' of model 'm'"
    recommended_threshold: float
    calibration: list[CalibrationPoint]  # entropy's (a regression task: its one rule's)
    policies: dict[str, PolicyCalibration] = field(default_factory=dict)
    regression: bool = False
    recommended_patience: int | None = None  # a regression task's


def task_names(model: LoadedModel) -> list[str]:
    return [t.name for t in model.manifest.tasks or []]


def resolve_task(model: LoadedModel, task: str | None) -> int | None:
    """The position of the request's task in the bundle's tasks; None for a bundle of no tasks.
    A bundle of several tasks needs one named; a bundle of one takes it named or not."""
    tasks = model.manifest.tasks
    if tasks is None:
        if task is not None:
            raise RequestError(422, "task", f"model {model.name!r} takes no task: it is not a multi-task bundle")
        return None
    if task is None:
        if len(tasks) == 1:
            return 0
        raise RequestError(422, "task", f"model {model.name!r} serves several tasks: name one of "
                           f"{task_names(model)}")
    index = model.manifest.task_index(task)
    if index is None:
        # (cut: the name is the client's, and an error need not echo all of it)
        raise RequestError(422, "task", f"model {model.name!r} has no task {task[:100]!r}; its tasks are "
                           f"{task_names(model)}")
    return index


def takes_pairs(model: LoadedModel, task: int | None) -> bool:
    return model.manifest.tasks[task].text_pair if task is not None else model.manifest.text_pair


def tables(model: LoadedModel, task: int | None) -> Tables:
    m = model.manifest
    if task is None:
        # The latency controller, when on, has raised the default threshold of requests that set none.
        threshold = model.controller.threshold if model.controller else m.recommended_threshold
        return Tables(f"model {model.name!r}", threshold, m.calibration, m.policies)
    head = m.tasks[task]
    return Tables(f"task {head.name!r} of model {model.name!r}", head.recommended_threshold, head.calibration,
                  head.policies, head.kind == "regression", head.recommended_patience)


def point_value(point: CalibrationPoint) -> float | None:
    """What a budget counts on a calibration point (the module's docstring)."""
    return point.metric if point.metric is not None else point.accuracy


def _fitting(t: Tables, points: list[CalibrationPoint], budget: float) -> list[CalibrationPoint] | None:
    """The points within `budget` points of full depth; None when there is no table to read."""
    full = next((point_value(p) for p in t.calibration if p.threshold == 0.0 and point_value(p) is not None), None)
    points = [p for p in points if point_value(p) is not None]
    if not points or full is None:
        return None
    return [p for p in points if (full - point_value(p)) * 100 <= budget + 1e-9]


def within_budget(model: LoadedModel, policy: str, max_accuracy_drop: float,
                  task: int | None = None) -> tuple[float | None, int | None]:
    """The fastest setting of the policy whose calibrated accuracy (or metric) is at most
    `max_accuracy_drop` points below full depth: the largest threshold (the smallest patience);
    for a regression task, the setting of its table with the fewest layers on average."""
    t = tables(model, task)
    points = t.calibration if policy == "entropy" or t.regression else \
        (t.policies[policy].points if policy in t.policies else [])
    fitting = _fitting(t, points, max_accuracy_drop)
    if fitting is None:
        raise RequestError(422, "max_accuracy_drop", f"{t.owner} has no calibration table for policy {policy}")
    if not fitting:  # (a table without its full-depth point: nothing may fit)
        what = "patience" if policy == "patience" and not t.regression else "setting"
        raise RequestError(422, "max_accuracy_drop", f"no {what} of {t.owner} is within "
                           f"{max_accuracy_drop:g} points of full depth")
    if t.regression:
        # As the exporter recommends (training/export_multitask.py): ties to the more cautious.
        best = min(fitting, key=lambda p: (round(p.mean_exit_layer, 6), p.threshold or 0.0, -(p.patience or 0)))
        return best.threshold or 0.0, best.patience
    if policy == "patience":
        return None, min(p.patience for p in fitting)
    return max(p.threshold for p in fitting), None


def _regression_policy(model: LoadedModel, task: int, policy: str | None, threshold: float | None,
                       patience: int | None, max_accuracy_drop: float | None) -> tuple[int, float, int, str]:
    t = tables(model, task)
    if policy not in (None, "patience"):
        raise RequestError(422, "policy", f"{policy!r} is not a policy of {t.owner}: a regression task has one "
                           "exit rule, PABEE's for regression (policy patience, with a threshold and a patience)")
    if max_accuracy_drop is not None:
        threshold, patience = within_budget(model, "patience", max_accuracy_drop, task)
    patience = t.recommended_patience if patience is None else patience
    if patience is None:
        raise RequestError(422, "patience", f"{t.owner} needs a patience (consecutive steady exits, >= 1): "
                           "it has no calibrated one")
    if patience > model.manifest.num_layers:
        raise RequestError(422, "patience", f"{patience} is more than the model's {model.manifest.num_layers} exits")
    return REGRESSION, t.recommended_threshold if threshold is None else threshold, patience, "patience"


def exit_policy(model: LoadedModel, policy: str | None, threshold: float | None, patience: int | None,
                max_accuracy_drop: float | None = None,
                task: int | None = None) -> tuple[int, float | None, int, str]:
    """(policy code, threshold, patience, policy name) of a request, its defaults filled in
    from the model (or its task): policy None is the default, entropy (a regression task: its
    one rule, reported as patience)."""
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise RequestError(422, "threshold", f"{threshold} is outside [0, 1]")
    if max_accuracy_drop is not None and (threshold is not None or patience is not None):
        raise RequestError(422, "max_accuracy_drop", "give a budget or a threshold / patience, not both")
    t = tables(model, task)
    if t.regression:
        return _regression_policy(model, task, policy, threshold, patience, max_accuracy_drop)
    policy = policy or "entropy"
    if max_accuracy_drop is not None and policy in model.engine.policies:
        threshold, patience = within_budget(model, policy, max_accuracy_drop, task)
    if policy not in model.engine.policies:
        raise RequestError(422, "policy", f"{policy!r} is not one of model {model.name!r}'s policies "
                           f"{list(model.engine.policies)}")
    calibrated = t.policies.get(policy)
    if policy == "patience":
        if patience is None and threshold is None and calibrated is not None:
            patience = calibrated.recommended_patience
        if patience is None:
            raise RequestError(422, "patience", "policy patience needs a patience (consecutive exits, >= 1): "
                               f"{t.owner} has no calibrated one")
        if patience > model.manifest.num_layers:
            raise RequestError(422, "patience", f"{patience} is more than the model's {model.manifest.num_layers} exits")
    elif patience is not None:
        raise RequestError(422, "patience", "only with policy patience")
    if threshold is None and policy == "entropy":
        threshold = t.recommended_threshold
    if threshold is None and policy == "max_prob" and calibrated is not None:
        threshold = calibrated.recommended_threshold
    if threshold is None and policy == "max_prob":
        raise RequestError(422, "threshold", f"{t.owner} has no calibrated max_prob threshold: give one")
    return policy_code(policy, threshold), threshold, patience or 0, policy
