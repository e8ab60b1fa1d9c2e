"""Errors raised before anything reaches the engine."""

from __future__ import annotations


class ConversionError(ValueError):
    """Base class: the source cannot be converted to the engine's leaves."""


class UnknownFormatError(ConversionError):
    """The source tree matches no registered format of the architecture, or several equally."""


class ParamsMismatchError(ConversionError):
    """The source does not fit the engine; ``problems`` lists each offending path."""

    def __init__(self, problems: list[str], *, header: str = "the parameters do not fit the engine"):
        self.problems = list(problems)
        shown = self.problems[:40]
        more = len(self.problems) - len(shown)
        text = f"{header} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):\n  " + "\n  ".join(
            shown
        )
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


class DeletedArrayError(ConversionError):
    """A source or engine array was deleted (typically donated by a train step)."""
