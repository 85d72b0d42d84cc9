"""Field checks shared by the decoders of stored data: envelopes, journal records, backup entries.

Role: the one place that says what a stored value may be (type, range, length). The
envelope decoder (kanmon.spool.store), the journal decoder (kanmon.spool.journal) and the
backup reader (kanmon.admin.backup) build on these, so a queue file, a journal line and an
archive member are refused for the same reasons with the same words.

Trusts: nothing: values come from json.loads of files that may have been edited by hand,
damaged on disk or restored from an archive. Never: return a value of another type than
asked (a bool is not a number here), a number that is not finite, or text longer than its
bound; raise anything but SchemaError.
"""

from __future__ import annotations

from typing import Any

MAX_TIME = 1e11  # seconds since the epoch (year 5138): any later time is damage
MAX_ADDRESS = 2048  # characters: RFC 5321 paths are at most 256 octets; room for UTF-8 and aliases
MAX_TEXT = 65536  # characters of any other text (reply texts, client names, DSN values)
MAX_COUNT = 1_000_000  # attempts and other counts
MAX_SIZE = 1 << 53  # bytes
MAX_ITEMS = 100_000  # recipients and the maps keyed by them


class SchemaError(ValueError):
    """A stored value that does not have the type, range or length it must have."""


def obj(value: Any, what: str) -> dict:
    if type(value) is not dict:
        raise SchemaError(f"{what} must be a JSON object")
    return value


def text(d: dict, key: str, default: str | None = None, limit: int = MAX_TEXT) -> str:
    v = d.get(key, default)
    if type(v) is not str:
        raise SchemaError(f"{key} must be a string" if key in d else f"{key} is missing")
    if len(v) > limit:
        raise SchemaError(f"{key} is longer than {limit} characters")
    return v


def time_value(d: dict, key: str, default: float | None = None) -> float:
    """A time in seconds since the epoch (0 allowed: "now" or "never" where a field says so)."""
    v = d.get(key, default)
    if type(v) is not float and type(v) is not int:
        raise SchemaError(f"{key} must be a number")
    if not (0 <= v <= MAX_TIME):  # also false for NaN; before float(): a huge int would overflow it
        raise SchemaError(f"{key} is out of range")
    return float(v)


def count(d: dict, key: str, default: int | None = None, limit: int = MAX_COUNT) -> int:
    v = d.get(key, default)
    if type(v) is not int:
        raise SchemaError(f"{key} must be a whole number")
    if not 0 <= v <= limit:
        raise SchemaError(f"{key} is out of range 0-{limit}")
    return v


def flag(d: dict, key: str, default: bool | None = None) -> bool:
    v = d.get(key, default)
    if type(v) is not bool:
        raise SchemaError(f"{key} must be true or false")
    return v


def text_list(d: dict, key: str, limit: int = MAX_ADDRESS, items: int = MAX_ITEMS) -> list[str]:
    v = d.get(key)
    if type(v) is not list:
        raise SchemaError(f"{key} must be a list")
    if len(v) > items:
        raise SchemaError(f"{key} has more than {items} items")
    for x in v:
        if type(x) is not str or len(x) > limit:
            raise SchemaError(f"{key} must hold strings of at most {limit} characters")
    return list(v)


def text_map(d: dict, key: str, limit: int = MAX_TEXT, items: int = MAX_ITEMS) -> dict[str, str]:
    v = d.get(key)
    if v is None and key not in d:
        return {}
    if type(v) is not dict:
        raise SchemaError(f"{key} must be a JSON object")
    if len(v) > items:
        raise SchemaError(f"{key} has more than {items} items")
    for k, x in v.items():
        if type(x) is not str or len(k) > MAX_ADDRESS or len(x) > limit:
            raise SchemaError(f"{key} must map addresses to strings")
    return dict(v)
