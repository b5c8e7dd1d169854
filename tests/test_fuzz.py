"""Fuzzing every RPC against a real server: no input ever earns INTERNAL or UNKNOWN, or writes anything.

Two kinds of input: raw bytes that may not parse at all (or nest deeper than the parser allows),
and well-typed requests whose fields hold anything protobuf can carry (NUL characters, huge or
negative durations and timestamps, NaN, deep metadata). Each test is bounded by a number of
examples and a time budget, so it runs in seconds; the server is the session's real one,
called as the static admin so that requests get past authentication to validation.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from fix_db import Db
from fix_server import ADMIN_KEY, RunningServer
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keystile.v1 import keys_pb2

SERVICE = "/keystile.v1.KeyService/"
UNARY = (
    "CreateKey",
    "GetKey",
    "ListKeys",
    "RevokeKey",
    "VerifyKey",
    "SetOwnerPolicy",
    "GetOwnerPolicy",
    "DeleteOwnerPolicy",
    "GetCredits",
    "UpdateCredits",
    "UpdateKey",
    "RollKey",
    "DeleteKey",
    "ListAuditEvents",
    "ImportKeys",
)
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
FUZZ = settings(
    # make chaos raises this to fuzz at scale (22,500 each); the suite runs a few hundred.
    max_examples=int(os.environ.get("KEYSTILE_FUZZ_EXAMPLES", "400")),
    deadline=None,
    database=None,  # nothing written to the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
METADATA = (("authorization", f"Bearer {ADMIN_KEY}"),)

# Text protobuf can carry (valid UTF-8: no lone surrogates), weighted toward what breaks things.
text = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.sampled_from(["", "\x00", "a\x00b", "jobs:read", "ks_", "\u2028", "admin", " ", "x" * 600]),
)
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
json_scalars = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), text)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


durations = st.builds(_duration, int64, int32)
timestamps = st.builds(lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n), int64, int32)


def _struct(fields: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    for key, value in fields.items():
        _set_value(struct.fields[key], value)
    return struct


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    """Like Struct.update, but NaN and infinities go in as they are (update would too)."""
    if value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, float):
        target.number_value = value
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, list):
        target.list_value.SetInParent()
        for item in value:
            _set_value(target.list_value.values.add(), item)
    else:
        target.struct_value.CopyFrom(_struct(value))


uint64 = st.integers(0, 2**64 - 1)
uint32 = st.integers(0, 2**32 - 1)
rate_limits = st.lists(
    st.builds(
        lambda n, lim, w, b: keys_pb2.RateLimit(name=n, limit=lim, window=w, burst=b),
        st.one_of(text, st.sampled_from(["w", "per_minute", "credits"])),
        uint64,
        st.one_of(
            durations,
            st.just(duration_pb2.Duration(seconds=1)),
            st.just(duration_pb2.Duration(seconds=86400)),
        ),
        uint64,
    ),
    max_size=10,
)
credit_messages = st.builds(
    lambda r, a, f: keys_pb2.Credits(remaining=r, refill_amount=a, refill=f),
    uint64,
    uint64,
    st.integers(0, 9),
)


@st.composite
def create_requests(draw: st.DrawFn) -> keys_pb2.CreateKeyRequest:
    request = keys_pb2.CreateKeyRequest(
        owner_id=draw(st.one_of(text, st.just("fuzz-owner"))),
        name=draw(text),
        scopes=draw(st.lists(text, max_size=3)),
        resources=draw(st.lists(text, max_size=3)),
        prefix=draw(text),
        rate_limit_per_minute=draw(st.integers(0, 2**32 - 1)),
        metadata=_struct(draw(st.dictionaries(text, json_values, max_size=4))),
        limits=draw(rate_limits),
        secret_hash=draw(st.one_of(st.just(""), text, st.binary(min_size=32, max_size=32).map(bytes.hex))),
        secret_hint=draw(st.one_of(st.just(""), text)),
    )
    if draw(st.booleans()):
        request.credits.CopyFrom(draw(credit_messages))
    expiry = draw(st.sampled_from(["none", "ttl", "expire_time"]))
    if expiry == "ttl":
        request.ttl.CopyFrom(draw(durations))
    elif expiry == "expire_time":
        request.expire_time.CopyFrom(draw(timestamps))
    return request


mask_paths = st.lists(
    st.one_of(
        st.sampled_from(["name", "scopes", "resources", "metadata", "expire_time", "limits", "disabled"]),
        text,
    ),
    max_size=4,
)


@st.composite
def update_requests(draw: st.DrawFn) -> keys_pb2.UpdateKeyRequest:
    key = keys_pb2.Key(
        id=draw(text),
        name=draw(text),
        scopes=draw(st.lists(text, max_size=3)),
        resources=draw(st.lists(text, max_size=3)),
        metadata=_struct(draw(st.dictionaries(text, json_values, max_size=3))),
        limits=draw(rate_limits),
        disabled=draw(st.booleans()),
        owner_id=draw(text),  # not updatable: ignored unless named in the mask
    )
    if draw(st.booleans()):
        key.expire_time.CopyFrom(draw(timestamps))
    request = keys_pb2.UpdateKeyRequest(key=key)
    request.update_mask.paths.extend(draw(mask_paths))
    return request


@st.composite
def audit_requests(draw: st.DrawFn) -> keys_pb2.ListAuditEventsRequest:
    request = keys_pb2.ListAuditEventsRequest(
        owner_id=draw(text),
        key_id=draw(text),
        actor_key_id=draw(text),
        page_size=draw(int32),
        page_token=draw(text),
    )
    for field in ("start_time", "end_time"):
        if draw(st.booleans()):
            getattr(request, field).CopyFrom(draw(timestamps))
    return request


@st.composite
def imported_keys(draw: st.DrawFn) -> keys_pb2.ImportedKey:
    key = keys_pb2.ImportedKey(
        secret_hash=draw(st.one_of(text, st.binary(min_size=32, max_size=32).map(bytes.hex))),
        owner_id=draw(st.one_of(text, st.just("fuzz-owner"))),
        name=draw(text),
        scopes=draw(st.lists(text, max_size=3)),
        resources=draw(st.lists(text, max_size=2)),
        secret_hint=draw(text),
        prefix=draw(text),
        revoke_reason=draw(text),
        limits=draw(rate_limits),
        metadata=_struct(draw(st.dictionaries(text, json_values, max_size=3))),
        disabled=draw(st.booleans()),
        rate_limit_per_minute=draw(uint32),
    )
    for field in ("create_time", "expire_time", "revoke_time", "last_used_time"):
        if draw(st.booleans()):
            getattr(key, field).CopyFrom(draw(timestamps))
    return key


typed_requests = st.one_of(
    st.tuples(
        st.just("ImportKeys"),
        st.builds(lambda keys: keys_pb2.ImportKeysRequest(keys=keys), st.lists(imported_keys(), max_size=4)),
    ),
    st.tuples(st.just("UpdateKey"), update_requests()),
    st.tuples(
        st.just("RollKey"),
        st.builds(lambda i, g: keys_pb2.RollKeyRequest(id=i, grace_period=g), text, durations),
    ),
    st.tuples(st.just("DeleteKey"), st.builds(lambda i: keys_pb2.DeleteKeyRequest(id=i), text)),
    st.tuples(st.just("ListAuditEvents"), audit_requests()),
    st.tuples(st.just("CreateKey"), create_requests()),
    st.tuples(st.just("GetKey"), st.builds(lambda i: keys_pb2.GetKeyRequest(id=i), text)),
    st.tuples(
        st.just("ListKeys"),
        st.builds(
            lambda o, size, token, inactive, by, hint: keys_pb2.ListKeysRequest(
                owner_id=o,
                page_size=size,
                page_token=token,
                include_inactive=inactive,
                created_by=by,
                secret_hint=hint,
            ),
            text,
            int32,
            text,
            st.booleans(),
            text,
            text,
        ),
    ),
    st.tuples(
        st.just("RevokeKey"),
        st.builds(
            lambda i, r, c: keys_pb2.RevokeKeyRequest(id=i, reason=r, cascade=c), text, text, st.booleans()
        ),
    ),
    st.tuples(
        st.just("VerifyKey"),
        st.builds(
            lambda k, s, r, c, n: keys_pb2.VerifyKeyRequest(
                key=k, required_scopes=s, resource=r, cost=c, lease_units=n
            ),
            text,
            st.lists(text, max_size=3),
            text,
            uint32,
            uint32,
        ),
    ),
    st.tuples(
        st.just("SetOwnerPolicy"),
        st.builds(
            lambda o, m, lt, lim: keys_pb2.SetOwnerPolicyRequest(
                policy=keys_pb2.OwnerPolicy(owner_id=o, max_active_keys=m, max_key_lifetime=lt, limits=lim)
            ),
            st.one_of(text, st.just("fuzz-owner")),
            uint32,
            durations,
            rate_limits,
        ),
    ),
    st.tuples(
        st.just("GetOwnerPolicy"), st.builds(lambda o: keys_pb2.GetOwnerPolicyRequest(owner_id=o), text)
    ),
    st.tuples(
        st.just("DeleteOwnerPolicy"), st.builds(lambda o: keys_pb2.DeleteOwnerPolicyRequest(owner_id=o), text)
    ),
    st.tuples(st.just("GetCredits"), st.builds(lambda i: keys_pb2.GetCreditsRequest(id=i), text)),
    st.tuples(
        st.just("UpdateCredits"),
        st.builds(
            lambda i, v, add: (
                keys_pb2.UpdateCreditsRequest(id=i, add=v)
                if add
                else keys_pb2.UpdateCreditsRequest(id=i, set=v)
            ),
            text,
            uint64,
            st.booleans(),
        ),
    ),
    st.tuples(
        st.just("WatchKeyEvents"),
        st.builds(lambda d: keys_pb2.WatchKeyEventsRequest(heartbeat_interval=d), durations),
    ),
)


def _deep(depth: int) -> bytes:
    """A CreateKeyRequest whose metadata nests ``depth`` lists deep (past the parser's limit)."""
    value = struct_pb2.Value()
    inner = value
    for _ in range(depth):
        inner = inner.list_value.values.add()
    request = keys_pb2.CreateKeyRequest(owner_id="o", name="n")
    request.metadata.fields["x"].CopyFrom(value)
    return request.SerializeToString()


raw_bytes = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\xff", b"\x0a\x80", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x12\x01\x00", _deep(150)]),
)


class Caller:
    """Sends serialized requests to any method of the real server and reports the status code."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)

    def call(self, method: str, request: bytes) -> tuple[grpc.StatusCode, Any]:
        try:
            if method == "WatchKeyEvents":
                stream = self.channel.unary_stream(SERVICE + method)(request, metadata=METADATA, timeout=10)
                next(stream)
                stream.cancel()
                return grpc.StatusCode.OK, None
            self.channel.unary_unary(SERVICE + method)(request, metadata=METADATA, timeout=10)
            return grpc.StatusCode.OK, None
        except grpc.RpcError as exc:
            return exc.code(), exc  # type: ignore[attr-defined]


def _check(code: grpc.StatusCode, error: Any, what: str) -> None:
    assert code not in FORBIDDEN, f"{what}: {code} {error.details() if error else ''}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        status = rpc_status.from_call(error)
        assert status is not None, f"{what}: INVALID_ARGUMENT without details"
        kinds = {detail.type_url.rsplit("/", 1)[-1] for detail in status.details}
        assert "google.rpc.ErrorInfo" in kinds and "google.rpc.BadRequest" in kinds, kinds
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                assert bad.field_violations and all(v.field for v in bad.field_violations)


@pytest.fixture
def caller(server: RunningServer) -> Caller:
    return Caller(server.address)


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture) -> Callable[[], None]:
    caplog.set_level(logging.INFO)

    def check() -> None:
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        assert not errors, errors

    return check


@FUZZ
@given(method=st.sampled_from((*UNARY, "WatchKeyEvents")), request=raw_bytes)
def test_raw_bytes_are_invalid_argument_never_internal(
    caller: Caller, method: str, request: bytes, no_tracebacks: Callable[[], None]
) -> None:
    code, error = caller.call(method, request)
    _check(code, error, f"{method}({request[:40]!r})")
    no_tracebacks()


def test_unparsable_requests_name_the_request(caller: Caller, db: Db) -> None:
    before = db.scalar("SELECT count(*) FROM keystile.keys")
    cases = [(method, b"\xff") for method in (*UNARY, "WatchKeyEvents")] + [("CreateKey", _deep(150))]
    for method, request in cases:
        code, error = caller.call(method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code)
        status = rpc_status.from_call(error)
        bad = error_details_pb2.BadRequest()
        assert status is not None and status.details[1].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["request"]
    assert db.scalar("SELECT count(*) FROM keystile.keys") == before


@FUZZ
@given(case=typed_requests)
def test_typed_requests_never_internal_and_failures_write_nothing(
    caller: Caller, db: Db, case: tuple[str, Any], no_tracebacks: Callable[[], None]
) -> None:
    method, request = case
    before = db.scalar("SELECT count(*) FROM keystile.keys")
    code, error = caller.call(method, request.SerializeToString())
    _check(code, error, f"{method}({request!r:.200})")
    if method in ("CreateKey", "ImportKeys") and code != grpc.StatusCode.OK:
        assert db.scalar("SELECT count(*) FROM keystile.keys") == before, "a refused create wrote a key"
    no_tracebacks()


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda r: r.ttl.CopyFrom(duration_pb2.Duration(seconds=2**62)), "ttl"),
        (lambda r: r.ttl.CopyFrom(duration_pb2.Duration(seconds=-(2**62))), "ttl"),
        (lambda r: r.metadata.update({"note": "a\x00b"}), "metadata"),
        (lambda r: r.metadata.update({"k\x00": 1}), "metadata"),
        (lambda r: setattr(r, "name", "nul\x00name"), "name"),
        (lambda r: r.metadata.update({"x": math.nan}), "metadata"),
    ],
)
def test_fuzzer_findings_are_invalid_argument_naming_the_field(
    caller: Caller, db: Db, build: Callable[[keys_pb2.CreateKeyRequest], None], field: str
) -> None:
    request = keys_pb2.CreateKeyRequest(owner_id="fuzz-owner", name="found by fuzzing")
    build(request)
    before = db.scalar("SELECT count(*) FROM keystile.keys")
    code, error = caller.call("CreateKey", request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    bad = error_details_pb2.BadRequest()
    assert status is not None and status.details[1].Unpack(bad)
    assert field in [v.field for v in bad.field_violations]
    assert db.scalar("SELECT count(*) FROM keystile.keys") == before


@pytest.mark.parametrize("seconds", [2**62, -(2**62)])
def test_extreme_heartbeat_intervals_are_invalid_argument(caller: Caller, seconds: int) -> None:
    request = keys_pb2.WatchKeyEventsRequest(heartbeat_interval=duration_pb2.Duration(seconds=seconds))
    code, error = caller.call("WatchKeyEvents", request.SerializeToString())
    assert code == grpc.StatusCode.INVALID_ARGUMENT, code
    assert "heartbeat_interval" in error.details()


def test_a_flood_of_bad_requests_logs_one_line_not_one_per_request(
    caller: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for _ in range(200):
        caller.call("ListKeys", b"\xff")
    lines = [r for r in caplog.records if "ListKeys" in r.getMessage()]
    assert len(lines) <= 1, [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records)
