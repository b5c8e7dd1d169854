"""Which presented strings are worth a lookup: keystile's own format, and registered legacy ones.

Keys imported from another system (``ImportKeys``) verify by the secrets their users already
hold, which do not follow keystile's format. An operator registers each legacy format it accepts
as a prefix and a pattern for the rest (``--legacy-key-formats 'wm_=[A-Za-z0-9]{32}'``); a
presented string that is neither a well-formed keystile key nor matches a registered format is
MALFORMED, with no database work, exactly as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from keystile._format import MAX_KEY_LENGTH, parse_key

MAX_LEGACY_KEY_LENGTH: Final = 256
"""The longest legacy secret looked up; anything longer is MALFORMED without hashing."""
_PREFIX: Final = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.:-]{0,31}\Z")
_MAX_PATTERN: Final = 200


@dataclass(frozen=True, slots=True)
class LegacyFormat:
    """A prefix and a regular expression the rest of the secret must match in full."""

    prefix: str
    pattern: re.Pattern[str]

    def __str__(self) -> str:
        return f"{self.prefix}={self.pattern.pattern}"


def parse_legacy_formats(text: str) -> tuple[LegacyFormat, ...]:
    """``PREFIX=REGEX`` items separated by whitespace, e.g. ``wm_=[A-Za-z0-9]{32} rdev_sk_=[0-9a-f]{48}``."""
    formats = []
    for item in text.split():
        prefix, sep, pattern = item.partition("=")
        if not sep or not _PREFIX.match(prefix):
            raise ValueError(f"{item!r} is not PREFIX=REGEX with a prefix of 1-32 of A-Z a-z 0-9 _ . : -")
        if not pattern or len(pattern) > _MAX_PATTERN:
            raise ValueError(f"{item!r}: the pattern must be 1-{_MAX_PATTERN} characters")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{item!r}: invalid regular expression ({exc})") from exc
        formats.append(LegacyFormat(prefix, compiled))
    return tuple(formats)


class KeyFormats:
    """Decides whether a presented string may name a stored key (and so deserves a lookup)."""

    def __init__(self, legacy: tuple[LegacyFormat, ...] = ()) -> None:
        self._legacy = legacy
        self.max_length = MAX_LEGACY_KEY_LENGTH if legacy else MAX_KEY_LENGTH
        """Longer strings are MALFORMED before they are hashed."""

    def accepts(self, secret: str) -> bool:
        """A well-formed keystile key, or a match of a registered legacy format."""
        if parse_key(secret) is not None:
            return True
        if len(secret) > self.max_length:
            return False
        return any(
            secret.startswith(f.prefix) and f.pattern.fullmatch(secret, len(f.prefix)) is not None
            for f in self._legacy
        )
