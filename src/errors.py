"""Errors a user can cause (bad config, missing data, unreachable server).

Entry points print them as one line and exit non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


def require(condition: bool, key: str, value, rule: str, where: str = "") -> None:
    """Raise a `UserError` naming the config key, its value and the allowed range."""
    if not condition:
        source = f" ({where})" if where else ""
        raise UserError(f"{key} must be {rule}, got {value!r}{source}")
