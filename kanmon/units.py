"""How kanmon shows sizes and durations to people: one formatter for each.

Role: turn a byte count or a number of seconds into the text the CLI tables, alert
mail, delivery notices and event lines show, so the same quantity reads the same
everywhere. Parsing the other way (`"10MB"`, `"4h"` in the config) is config's.

Trusts: its callers to pass numbers. Never: do I/O or read a clock (callers pass
differences of times they measured).
"""

from __future__ import annotations

_SIZE_UNITS = ("B", "KB", "MB", "GB", "TB")
# (seconds, short name, word) from the largest unit down.
_DURATION_UNITS = ((86400, "d", "day"), (3600, "h", "hour"), (60, "m", "minute"), (1, "s", "second"))


def format_size(n: int | float) -> str:
    """Bytes in decimal units as the config writes them: `512 B`, `1.5 MB`, `2.0 TB`."""
    value = float(n)
    for unit in _SIZE_UNITS:
        if abs(value) < 1000 or unit == _SIZE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_duration(seconds: float, style: str = "short") -> str:
    """Whole seconds (negative counts as 0) in one of three styles:

    - ``short`` (tables, alerts): the two largest units, `2d 3h`, `5m 10s`, `7s`; a
      second unit that is zero is left out (`4d`, not `4d 0h`);
    - ``words`` (delivery notices, as sendmail writes them): the largest whole unit,
      `40 minutes`, `1 day`;
    - ``clock`` (the `delay=` and `xdelay=` fields of event lines, sendmail's format):
      `[d+]hh:mm:ss`.
    """
    seconds = max(0, int(seconds))
    if style == "clock":
        d, rem = divmod(seconds, 86400)
        h, rem = divmod(rem, 3600)
        m, s = divmod(rem, 60)
        return (f"{d}+" if d else "") + f"{h:02d}:{m:02d}:{s:02d}"
    if style == "words":
        for size, _, word in _DURATION_UNITS:
            if seconds >= size or size == 1:
                n = seconds // size
                return f"{n} {word}{'s' if n != 1 else ''}"
    if style == "short":
        for i, (size, name, _) in enumerate(_DURATION_UNITS):
            if seconds >= size or size == 1:
                text = f"{seconds // size}{name}"
                if size > 1:
                    next_size, next_name, _ = _DURATION_UNITS[i + 1]
                    if seconds % size // next_size:
                        text += f" {seconds % size // next_size}{next_name}"
                return text
    raise ValueError(f"unknown duration style {style!r}")
