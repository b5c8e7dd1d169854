"""The key format: minting, checksum, hint, and the published regular expression."""

from __future__ import annotations

import re

import pytest

import keystile
from keystile._format import (
    BASE62_ALPHABET,
    RANDOM_LENGTH,
    generate_key,
    hash_key,
    is_valid_prefix,
    parse_key,
)


def test_generated_key_matches_published_pattern_and_parses() -> None:
    secret = generate_key("sk_live")
    assert re.fullmatch(keystile.KEY_PATTERN, secret)
    assert secret.startswith("sk_live_")
    assert len(secret) == len("sk_live_") + 43 + 6
    parsed = parse_key(secret)
    assert parsed is not None
    assert parsed.prefix == "sk_live"
    assert parsed.hint == secret[: len("sk_live_") + 8]


def test_keys_are_distinct_and_use_the_whole_alphabet() -> None:
    secrets = {generate_key("ks") for _ in range(2000)}
    assert len(secrets) == 2000
    used = set("".join(s[3 : 3 + RANDOM_LENGTH] for s in secrets))
    assert used == set(BASE62_ALPHABET)


def test_checksum_rejects_every_single_character_typo() -> None:
    secret = generate_key("ks")
    start = len("ks_")
    for position in range(start, len(secret)):
        for replacement in "0aZ":
            if secret[position] == replacement:
                continue
            typo = secret[:position] + replacement + secret[position + 1 :]
            assert parse_key(typo) is None, f"typo at {position} accepted"


def test_checksum_rejects_swapped_neighbours() -> None:
    secret = generate_key("ks")
    for i in range(3, len(secret) - 1):
        if secret[i] != secret[i + 1]:
            swapped = secret[:i] + secret[i + 1] + secret[i] + secret[i + 2 :]
            assert parse_key(swapped) is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "ks",
        "ks_",
        "ks_short",
        "KS_" + "a" * 49,
        "1ks_" + "a" * 49,
        "ks-" + "a" * 49,
        "ks_" + "a" * 48,
        "ks_" + "a" * 50,
        "ks_" + "a" * 48 + "!",
        "a" * 10_000,
        "abcdefghijklmnopq_" + "a" * 49,
    ],
)
def test_malformed_strings_do_not_parse(text: str) -> None:
    assert parse_key(text) is None
    assert not keystile.is_well_formed(text)


def test_prefix_rules() -> None:
    assert is_valid_prefix("a") and is_valid_prefix("sk_live") and is_valid_prefix("a" * 16)
    for bad in ("", "A", "1a", "_a", "a-b", "a" * 17, "ké"):
        assert not is_valid_prefix(bad)
    with pytest.raises(ValueError, match="prefix"):
        generate_key("Bad")


def test_hash_is_sha256_of_whole_secret() -> None:
    import hashlib

    secret = generate_key("ks")
    assert hash_key(secret) == hashlib.sha256(secret.encode()).digest()
