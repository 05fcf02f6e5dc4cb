"""Errors a user can cause (bad config, missing data, unreachable server).

Entry points print them as one line and exit non-zero; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it.

    `key` is the config key at fault, if any, and `source` the YAML file it is set in, which
    `src.config` fills in so that builders need not know where they are configured.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.message = message
        self.key = key
        self.source: str | None = None

    def __str__(self) -> str:
        return f"{self.message} ({self.source})" if self.source else self.message


def require(condition: bool, key: str, value, rule: str) -> None:
    """Raise a `UserError` naming the config key, its value and the allowed range."""
    if not condition:
        raise UserError(f"{key} must be {rule}, got {value!r}", key=key)


def one_line(error: BaseException) -> str:
    """The first line of an error's message (a library's may run to pages), or its type."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
