"""One exception family for user mistakes.

Every error a user can cause (a bad argument, bad data, a bad file) raises a subclass of
:class:`AutoLoRAError`, which is itself a :class:`ValueError`. Messages say what was wrong and
how to fix it. ``assert`` is kept for internal invariants only.
"""

from __future__ import annotations


class AutoLoRAError(ValueError):
    """Base class of every error autolora raises for a user's mistake."""


class ConfigError(AutoLoRAError):
    """An argument or config value is invalid."""


class TargetError(AutoLoRAError):
    """``target_modules`` or ``modules_to_save`` do not fit the model."""


class DataError(AutoLoRAError):
    """Training or validation data cannot be used as given."""


class NonFiniteError(AutoLoRAError):
    """A loss or gradient was NaN or infinite; no parameter was changed.

    Attributes:
        step: The step that failed (``None`` if unknown).
    """

    def __init__(self, message: str, step: int | None = None) -> None:
        super().__init__(message)
        self.step = step


class StateError(AutoLoRAError):
    """A call does not fit the trainer's state (e.g. ``fit`` after ``prune``)."""


class ExportError(AutoLoRAError):
    """An export or load path cannot be used."""


class WriteError(AutoLoRAError):
    """A file or folder cannot be written: a read-only or full disk, or a file in the way."""


class RunWarning(UserWarning):
    """A run finished but its result should not be trusted as it stands (e.g. the classifier head
    is not trained, or the dev score does not beat predicting the majority class)."""


class RankWarning(UserWarning):
    """The search did not separate components: the plan is no better supported than any other
    allocation of its size (``ranks.json`` and the report say how sure each rank is)."""
