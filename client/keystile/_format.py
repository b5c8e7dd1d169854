"""The key format: how secrets are minted, checked and shown, without any database.

A secret is ``<prefix>_<43 base62 chars><6 base62 chars>``: the 43 characters encode 256 bits from
the operating system's CSPRNG, and the last 6 encode a CRC32 over everything before them. The
checksum is not security (anyone can compute it); it lets VerifyKey, clients and secret scanners
reject typos and garbage without a lookup, so that a flood of junk never reaches the database.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import zlib
from dataclasses import dataclass
from typing import Final

BASE62_ALPHABET: Final = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_BITS: Final = 256
RANDOM_LENGTH: Final = 43  # 62**43 > 2**256, so every 256-bit value fits
CHECKSUM_LENGTH: Final = 6  # 62**6 > 2**32
HINT_LENGTH: Final = 8
MAX_PREFIX_LENGTH: Final = 16

PREFIX_PATTERN: Final = r"[a-z][a-z0-9_]{0,15}"
KEY_PATTERN: Final = rf"{PREFIX_PATTERN}_[0-9A-Za-z]{{{RANDOM_LENGTH + CHECKSUM_LENGTH}}}"
"""The regular expression a well-formed key matches in full (published in the README)."""

_PREFIX_RE: Final = re.compile(rf"\A{PREFIX_PATTERN}\Z")
_KEY_RE: Final = re.compile(
    rf"\A(?P<prefix>{PREFIX_PATTERN})_(?P<random>[0-9A-Za-z]{{{RANDOM_LENGTH}}})"
    rf"(?P<checksum>[0-9A-Za-z]{{{CHECKSUM_LENGTH}}})\Z"
)
MAX_KEY_LENGTH: Final = MAX_PREFIX_LENGTH + 1 + RANDOM_LENGTH + CHECKSUM_LENGTH


def _base62(value: int, width: int) -> str:
    """Encode a non-negative integer as exactly ``width`` base62 digits, most significant first."""
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        digits.append(BASE62_ALPHABET[rem])
    if value:
        raise ValueError("value does not fit")
    return "".join(reversed(digits))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode("ascii")), CHECKSUM_LENGTH)


def is_valid_prefix(prefix: str) -> bool:
    """Whether ``prefix`` may start a secret: 1-16 of ``a-z0-9_``, starting with a letter."""
    return _PREFIX_RE.match(prefix) is not None


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """A well-formed secret split into its parts; never logged or printed whole."""

    prefix: str
    random: str

    @property
    def hint(self) -> str:
        """The type prefix and the first 8 random characters: safe to store and show."""
        return f"{self.prefix}_{self.random[:HINT_LENGTH]}"


def parse_key(secret: str) -> ParsedKey | None:
    """Return the parts of a well-formed secret with a correct checksum, or None.

    Cheap and allocation-light on purpose: it runs before any lookup, on untrusted input.
    """
    if len(secret) > MAX_KEY_LENGTH:
        return None
    match = _KEY_RE.match(secret)
    if match is None:
        return None
    body_end = match.start("checksum")
    if _checksum(secret[:body_end]) != match["checksum"]:
        return None
    return ParsedKey(prefix=match["prefix"], random=match["random"])


def is_well_formed(secret: str) -> bool:
    """Whether ``secret`` has the key format and a correct checksum (it may still not exist)."""
    return parse_key(secret) is not None


def generate_key(prefix: str) -> str:
    """Mint a new secret with 256 bits from the CSPRNG under ``prefix``."""
    if not is_valid_prefix(prefix):
        raise ValueError("invalid key prefix")
    body = f"{prefix}_{_base62(secrets.randbits(RANDOM_BITS), RANDOM_LENGTH)}"
    return body + _checksum(body)


def hash_key(secret: str | bytes) -> bytes:
    """The SHA-256 digest under which a secret is stored and looked up (of its UTF-8 encoding)."""
    return hashlib.sha256(secret.encode("utf-8") if isinstance(secret, str) else secret).digest()
