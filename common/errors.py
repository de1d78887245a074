"""Errors the user can fix: UserError (printed as a one-paragraph message, exit 2, never a traceback) and `check`.
"""
from __future__ import annotations


# ----------------------------------------------------------------------------------------------------------------
# Errors the user can fix: a one-paragraph message and exit code 2, never a traceback.
# ----------------------------------------------------------------------------------------------------------------
class UserError(Exception):
    """An error caused by the user's input (config, data, checkpoint). Printed as `error: <message>`, exit 2."""


def user_error_message(exc: BaseException) -> str:
    """The user-facing text of a UserError, also when a DataLoader worker re-raised it with its traceback glued on."""
    text = str(exc)
    marker = "UserError: "
    if "Traceback" in text and marker in text:  # re-raised from a worker: keep only the original message
        text = text[text.rindex(marker) + len(marker):]
    return text.strip()


def check(condition: bool, message: str) -> None:
    """Validate a config value: raise UserError(message) when the condition does not hold."""
    if not condition:
        raise UserError(message)

