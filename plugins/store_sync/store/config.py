"""Reading settings people type: booleans and numbers that may arrive as strings.

Connection extras come from JSON (``true``, ``5``), from URIs and environment variables (always
strings: ``"false"``, ``"5"``) and from the UI. ``bool("false")`` is True in Python, so every boolean
setting of the package goes through :func:`as_bool`, every number through :func:`as_number`.
"""

from __future__ import annotations

from typing import Any

TRUE = frozenset({"true", "t", "yes", "y", "on", "1"})
FALSE = frozenset({"false", "f", "no", "n", "off", "0", ""})


class ConfigError(ValueError):
    """A setting a person wrote cannot be understood; the message says which and how to fix it."""


def as_bool(value: Any, name: str, where: str = "") -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case, as bool, number or string)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE | FALSE:
        return value.strip().lower() in TRUE
    raise ConfigError(f"{where + ': ' if where else ''}{name} must be true or false (or yes/no, 1/0), got {value!r}")


def as_number(value: Any, name: str, where: str = "", *, kind: type = float, minimum: float | None = None) -> Any:
    """A number given as a number or a string; ``kind=int`` wants a whole number."""
    prefix = f"{where + ': ' if where else ''}{name}"
    if isinstance(value, bool):  # True is an int in Python, never a count
        raise ConfigError(f"{prefix} must be a number, got {value!r}")
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{prefix} must be a number, got {value!r}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{prefix} must be a finite number, got {value!r}")
    if kind is int:
        if not number.is_integer():
            raise ConfigError(f"{prefix} must be a whole number, got {value!r}")
        number = int(number)
    if minimum is not None and number < minimum:
        raise ConfigError(f"{prefix} must be at least {minimum:g}, got {value!r}")
    return number
