"""Errors users see. Each names what is wrong and where; the CLI prints the message, not a traceback."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class: a failure with a message meant for the person running the pipeline."""

    exit_code = 2


class ConfigError(PipelineError):
    """A setting is unknown or has a bad value."""


class InputError(PipelineError):
    """An input cannot be read or does not have the expected shape (names the file and the problem)."""


class ValidationFailed(PipelineError):
    """A batch failed a table-level rule (names the file, the column and the rule)."""

    exit_code = 1


class TrainingError(PipelineError):
    """Training cannot go on (e.g. a NaN or infinite loss)."""


class PromotionError(PipelineError):
    """The registry is not in a state where a promotion decision can be made."""
