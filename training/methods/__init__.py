"""Every training method, one file per paper: its recipe options (a dataclass) and the parts
that differ from the others. The one loop (training/loop.py), the losses (training/losses.py)
and what distillation methods share (training/teacher.py, training/students.py) are imported
from one place. `offramp train` builds its commands and options from METHODS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Method:
    name: str  # `offramp train distill --method NAME`, or `offramp train NAME` for its own command
    command: str  # "distill", or the name of its own `offramp train` command
    config: type  # the recipe options: a dataclass, set from a TOML recipe and the command line
    summary: str  # one line of --help
    run: Callable  # distill: (teacher, task, cfg) -> student whose last classifier is trained


from training.methods import bilstm, distilbert, fastbert, mobilebert, pkd, tinybert  # noqa: E402

METHODS: dict[str, Method] = {m.name: m for m in (
    fastbert.METHOD, distilbert.METHOD, *pkd.METHODS, tinybert.METHOD, mobilebert.METHOD, bilstm.METHOD)}


def distill_methods() -> dict[str, Method]:
    """The methods of `offramp train distill --method`, in registry order."""
    return {name: m for name, m in METHODS.items() if m.command == "distill"}
