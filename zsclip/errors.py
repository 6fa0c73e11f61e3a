"""The one exception type for mistakes a user can fix.

The CLI prints its message as a single line and exits with `exit_code`; the message should name the
fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input or set-up, not a bug. The message says how to fix it."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class InputError(Exception):
    """One input (an image, a row) could not be used. The message is a one-line reason; the run goes
    on."""
