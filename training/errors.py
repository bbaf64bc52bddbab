"""Errors a user can fix. The `offramp` training commands show them as one line on stderr,
`offramp: error: MESSAGE`, and exit with code 2 (`training.cli.command`); so do
`training.data.DataError` (a data file that cannot be used, with its file and line, including
`training.labelled.LabelError`) and `app.manifest.ManifestError` (a bundle that cannot be read).
Any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class CommandError(Exception):
    """A command refuses its arguments."""


class OutputError(CommandError, ValueError):
    """An output path that must not be replaced (it holds something else)."""


class QuantizationRefused(CommandError, RuntimeError):
    """The int8 bundle fails the accuracy gate: a verdict on the model, not a bug."""


class RecipeError(CommandError, ValueError):
    """A method's settings that cannot be trained (an option it does not have, a shape that
    does not fit): raised by the recipe once the task is known."""
