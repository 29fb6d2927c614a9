"""Strict readers of environment variables for sd_multi/settings.py: the only code that reads os.environ.

Each reader records what it read in READ_VARIABLES (secrets masked) so `./setup.sh env` can print it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})

# SI units are powers of 1000 and IEC units powers of 1024, as their names promise.
BYTE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
BYTES_PATTERN = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[a-zA-Z]*)\s*$")


@dataclass(frozen=True, kw_only=True)
class EnvRead:
    """One variable as the settings read it: its effective value for display, never a secret's value."""

    name: str
    is_set: bool
    shown: str
    secret: bool = False


READ_VARIABLES: dict[str, EnvRead] = {}


def _raw(name: str) -> str | None:
    """The variable's value, or None when unset or blank (a blank `NAME=` in an env file means "use the default")."""
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _record(name: str, raw: str | None, value: object, *, secret: bool = False) -> None:
    if secret:
        shown = "(set)" if raw is not None else "(not set)"
    else:
        shown = ",".join(str(item) for item in value) if isinstance(value, list | tuple) else str(value)
    READ_VARIABLES[name] = EnvRead(name=name, is_set=raw is not None, shown=shown, secret=secret)


def _invalid(name: str, raw: str, expected: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"Environment variable {name}={raw!r} is invalid: expected {expected}.")


def env_str(name: str, default: str = "") -> str:
    raw = _raw(name)
    value = default if raw is None else raw
    _record(name, raw, value)
    return value


def env_choice(name: str, choices: Sequence[str], default: str) -> str:
    raw = _raw(name)
    value = default if raw is None else raw.lower()
    if value not in choices:
        raise _invalid(name, raw or "", "one of " + ", ".join(choices))
    _record(name, raw, value)
    return value


def env_bool(name: str, default: bool = False) -> bool:
    raw = _raw(name)
    if raw is None:
        value = default
    elif raw.lower() in TRUE_WORDS:
        value = True
    elif raw.lower() in FALSE_WORDS:
        value = False
    else:
        raise _invalid(name, raw, "a boolean: 1/0, true/false, yes/no or on/off")
    _record(name, raw, int(value))
    return value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = _raw(name)
    if raw is None:
        value = default
    else:
        try:
            value = int(raw)
        except ValueError:
            raise _invalid(name, raw, f"a whole number (default {default})") from None
    if minimum is not None and value < minimum:
        raise _invalid(name, str(value), f"a whole number >= {minimum}")
    _record(name, raw, value)
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = _raw(name)
    if raw is None:
        value = default
    else:
        try:
            value = float(raw)
        except ValueError:
            raise _invalid(name, raw, f"a number (default {default})") from None
    if minimum is not None and not value >= minimum:
        raise _invalid(name, str(value), f"a number >= {minimum}")
    _record(name, raw, value)
    return value


def env_list(name: str, default: Sequence[str] = ()) -> list[str]:
    """Comma-separated values; blanks between commas are dropped."""
    raw = _raw(name)
    value = list(default) if raw is None else [item.strip() for item in raw.split(",") if item.strip()]
    _record(name, raw, value)
    return value


def parse_bytes(text: str) -> int:
    """'8GiB' -> 8589934592, '8GB' -> 8000000000, '512MiB', '1.5GiB', '4096' (plain bytes). ValueError otherwise."""
    match = BYTES_PATTERN.match(text)
    if match is None or match["unit"].lower() not in BYTE_UNITS:
        raise ValueError(text)
    return int(float(match["number"]) * BYTE_UNITS[match["unit"].lower()])


def env_bytes(name: str, default: int) -> int:
    raw = _raw(name)
    if raw is None:
        value = default
    else:
        try:
            value = parse_bytes(raw)
        except ValueError:
            raise _invalid(name, raw, "a size in bytes like 4096, 512MiB, 8GiB or 8GB") from None
    _record(name, raw, value)
    return value


def env_path(name: str, default: Path) -> Path:
    """An absolute path; a relative one is taken from the current directory."""
    raw = _raw(name)
    value = default if raw is None else Path(raw).expanduser().absolute()
    _record(name, raw, value)
    return value


def env_secret(name: str, default: str = "") -> str:
    """The secret from NAME, or read from the file named by NAME_FILE (Docker/systemd credentials style)."""
    raw = _raw(name)
    file_name = _raw(f"{name}_FILE")
    if raw is not None and file_name is not None:
        raise ImproperlyConfigured(f"Set either {name} or {name}_FILE, not both.")
    if file_name is not None:
        try:
            raw = Path(file_name).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} cannot be read: {exc.strerror}.") from None
        if not raw:
            raise ImproperlyConfigured(f"{name}_FILE={file_name!r} is empty.")
    value = default if raw is None else raw
    _record(name, raw, value, secret=True)
    return value
