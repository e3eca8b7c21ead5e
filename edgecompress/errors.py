"""Errors a user can cause: each says what is wrong and how to fix it, in one line."""

from __future__ import annotations


class EdgeCompressError(Exception):
    """Root of every expected failure; the CLI prints its message and exits non-zero."""

    exit_code = 1


class UsageError(EdgeCompressError):
    """A bad argument or option value."""

    exit_code = 2


class InfeasibleBudgetError(UsageError):
    """A budget that even the smallest candidate misses; `reachable` holds what it reaches."""

    def __init__(self, message: str, reachable: dict[str, float | None]) -> None:
        super().__init__(message)
        self.reachable = reachable


class ModelError(EdgeCompressError):
    """An unknown model, a factory that cannot be imported, or a checkpoint that does not fit."""


class DataError(EdgeCompressError):
    """A dataset that is missing, corrupt, or asked for something it does not hold."""


class ProfileError(EdgeCompressError):
    """A device profile that cannot be found or does not validate."""


class MeasureError(EdgeCompressError):
    """A measurement that could not be taken (bad model file, dead worker, unreachable agent)."""


class ExportError(EdgeCompressError):
    """An export that failed or whose file does not pass the checks."""


class PlanError(EdgeCompressError):
    """A compression plan that does not validate against its model."""


class OutputError(EdgeCompressError):
    """An output path that cannot be written, or exists and would be overwritten."""
