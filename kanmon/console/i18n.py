"""The console's languages: English (the text in the templates) and Japanese (a gettext
catalogue, locale/ja/LC_MESSAGES/console.po, read with Babel).

Role: pick the language of a request — the admin's own choice (`kanmon admin lang`, or
the console's settings page), else the browser's Accept-Language, else English — and
give the templates gettext/ngettext for it. Trusts: the Accept-Language header only as
a list of tags compared with ours. Never: fail a page for a missing translation (the
English text is shown).
"""

from __future__ import annotations

import functools
from pathlib import Path

LANGUAGES = ("en", "ja")
DOMAIN = "console"
LOCALE_DIR = Path(__file__).parent / "locale"


@functools.cache
def catalogue(lang: str) -> dict[str, str]:
    """msgid -> msgstr of a language (empty for English)."""
    if lang == "en":
        return {}
    from babel.messages.pofile import read_po  # noqa: PLC0415

    with open(LOCALE_DIR / lang / "LC_MESSAGES" / f"{DOMAIN}.po", "rb") as f:
        cat = read_po(f, locale=lang)
    return {m.id: m.string for m in cat if m.id and isinstance(m.id, str) and m.string and not m.fuzzy}


def gettext_for(lang: str):
    table = catalogue(lang)

    def gettext(message: str) -> str:
        return table.get(message) or message

    def ngettext(singular: str, plural: str, n: int) -> str:
        return gettext(singular if n == 1 else plural)

    return gettext, ngettext


def negotiate(accept_language: str | None, chosen: str | None = None) -> str:
    """The admin's choice, else the first of ours the browser prefers, else English."""
    if chosen in LANGUAGES:
        return chosen
    best, best_q = "en", 0.0
    for part in (accept_language or "")[:500].split(","):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                q = float(params[2:])
            except ValueError:
                q = 0.0
        primary = tag.strip().lower().split("-")[0]
        if primary in LANGUAGES and q > best_q:
            best, best_q = primary, q
    return best
