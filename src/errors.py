"""Errors a user can cause (bad config, missing data, unreachable server).

Entry points print them as one line and exit non-zero; anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


def require_types_of(values: dict, defaults: dict, prefix: str, where: str) -> None:
    """Each value must keep the type of its default in the YAML file `where`: a number stays a
    number (an integer an integer), a list a list, so `agent.alpha=abc` is refused by name."""
    for key, default in defaults.items():
        value = values.get(key)
        if key.startswith("_") or default is None or (isinstance(default, str) and default.startswith("${")):
            continue  # no type to keep: Hydra's own keys, optional values, interpolations
        name = f"{prefix}.{key}"
        if isinstance(default, dict):
            require(isinstance(value, dict), name, value, "a mapping", where)
            require_types_of(value, default, name, where)
        elif isinstance(default, bool):
            require(isinstance(value, bool), name, value, "true or false", where)
        elif isinstance(default, int):
            require(isinstance(value, int) and not isinstance(value, bool), name, value, "an integer", where)
        elif isinstance(default, float):
            require(isinstance(value, (int, float)) and not isinstance(value, bool), name, value, "a number", where)
        else:
            require(isinstance(value, type(default)), name, value, f"a {type(default).__name__}", where)


def require(condition: bool, key: str, value, rule: str, where: str = "") -> None:
    """Raise a `UserError` naming the config key, its value and the allowed range."""
    if not condition:
        source = f" ({where})" if where else ""
        raise UserError(f"{key} must be {rule}, got {value!r}{source}")
