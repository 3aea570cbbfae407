"""The one exception type for user mistakes: a message naming the problem plus the fix."""

from __future__ import annotations


class InternViTError(ValueError):
    """A bad input from the user (path, file, layout, preset); the CLI prints it as one line plus the fix."""

    def __init__(self, message: str, *, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} (fix: {self.fix})" if self.fix else self.message
