"""gRPC translation for limits: RateLimit, Credits and OwnerPolicy messages, and their RPCs.

``LimitHandlers`` is the part of the KeyService servicer behind SetOwnerPolicy,
GetOwnerPolicy, DeleteOwnerPolicy, GetCredits and UpdateCredits; the functions translate the
limit messages that CreateKey, Key and VerifyKeyResponse carry. As in ``handlers``, no rule lives
here: ``limits.policies`` and ``limits.credits`` decide.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

import grpc

from keystile.v1 import keys_pb2

from .limits.rules import LimitSpec
from .model import CreditRefill, CreditTerms, Lease, LimitStatus, OwnerPolicy, RateLimit
from .rpc_errors import translate_errors
from .wire import ServiceAccess, authorization, duration, set_timestamp

_REFILLS = {
    CreditRefill.NEVER: keys_pb2.CREDIT_REFILL_UNSPECIFIED,
    CreditRefill.DAILY: keys_pb2.CREDIT_REFILL_DAILY,
    CreditRefill.MONTHLY: keys_pb2.CREDIT_REFILL_MONTHLY,
}
_REFILLS_BACK = {value: refill for refill, value in _REFILLS.items()}


def limit_specs(messages: Iterable[keys_pb2.RateLimit], field: str = "limits") -> list[LimitSpec]:
    """RateLimit messages as the domain's LimitSpec (durations read, nothing judged)."""
    return [
        LimitSpec(m.name, m.limit, duration(f"{field}[{i}].window", m.window), m.burst)
        for i, m in enumerate(messages)
    ]


def limits_to_proto(limits: Iterable[RateLimit]) -> list[keys_pb2.RateLimit]:
    """Stored limits as RateLimit messages."""
    messages = []
    for limit in limits:
        message = keys_pb2.RateLimit(name=limit.name, limit=limit.limit, burst=limit.burst)
        message.window.FromMilliseconds(limit.window_ms)
        messages.append(message)
    return messages


def credits_from_proto(message: keys_pb2.Credits) -> CreditTerms:
    """A Credits message as the domain's terms (an unknown refill value reads as none)."""
    return CreditTerms(
        message.remaining, message.refill_amount, _REFILLS_BACK.get(message.refill, CreditRefill.NEVER)
    )


def credits_to_proto(terms: CreditTerms) -> keys_pb2.Credits:
    """Credit terms (and balance, where known) as a Credits message."""
    return keys_pb2.Credits(
        remaining=terms.remaining, refill_amount=terms.refill_amount, refill=_REFILLS[terms.refill]
    )


def policy_to_proto(policy: OwnerPolicy) -> keys_pb2.OwnerPolicy:
    """A stored policy as an OwnerPolicy message."""
    message = keys_pb2.OwnerPolicy(
        owner_id=policy.owner_id,
        max_active_keys=policy.max_active_keys,
        limits=limits_to_proto(policy.limits),
    )
    if policy.max_key_lifetime is not None:
        message.max_key_lifetime.FromTimedelta(policy.max_key_lifetime)
    if policy.update_time is not None:
        set_timestamp(message.update_time, policy.update_time)
    return message


def usage_bytes(limit: LimitStatus | None, lease: Lease | None) -> bytes:
    """VerifyKeyResponse's ``limit`` and ``lease`` fields, serialized (appended to the rest).

    Protobuf messages concatenate: a response memoized without these fields plus these bytes
    parses as the whole response, so a rate-limited key's response is built from its memoized
    head and this small tail, not from scratch.
    """
    response = keys_pb2.VerifyKeyResponse()
    if limit is not None:
        status = response.limit
        status.name = limit.name
        status.limit = limit.limit
        status.remaining = limit.remaining
        status.owner = limit.owner
        status.reset.FromNanoseconds(int(limit.reset * 1e9))
        if limit.window_ms:
            status.window.FromMilliseconds(limit.window_ms)
    if lease is not None:
        response.lease.units = lease.units
        response.lease.valid_for.FromNanoseconds(int(lease.valid_for * 1e9))
    return response.SerializeToString()


class LimitHandlers(ServiceAccess):
    """The servicer's limit RPCs; mixed into ``KeyServiceHandlers``."""

    @translate_errors
    async def SetOwnerPolicy(
        self, request: keys_pb2.SetOwnerPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.SetOwnerPolicyResponse:
        """Replace an owner's policy."""
        policy = request.policy
        lifetime: timedelta | None = (
            duration("policy.max_key_lifetime", policy.max_key_lifetime)
            if policy.HasField("max_key_lifetime")
            else None
        )
        stored = await self._service().policies.set(
            policy.owner_id,
            max_active_keys=policy.max_active_keys,
            max_key_lifetime=lifetime,
            limits=limit_specs(policy.limits, "policy.limits"),
            authorization=authorization(context),
        )
        return keys_pb2.SetOwnerPolicyResponse(policy=policy_to_proto(stored))

    @translate_errors
    async def GetOwnerPolicy(
        self, request: keys_pb2.GetOwnerPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.GetOwnerPolicyResponse:
        """Return an owner's policy."""
        policy = await self._service().policies.get(request.owner_id, authorization=authorization(context))
        return keys_pb2.GetOwnerPolicyResponse(policy=policy_to_proto(policy))

    @translate_errors
    async def DeleteOwnerPolicy(
        self, request: keys_pb2.DeleteOwnerPolicyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.DeleteOwnerPolicyResponse:
        """Remove an owner's policy."""
        await self._service().policies.delete(request.owner_id, authorization=authorization(context))
        return keys_pb2.DeleteOwnerPolicyResponse()

    @translate_errors
    async def GetCredits(
        self, request: keys_pb2.GetCreditsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.GetCreditsResponse:
        """Return a key's credits."""
        credits = await self._service().credits.get(request.id, authorization=authorization(context))
        return keys_pb2.GetCreditsResponse(credits=credits_to_proto(credits))

    @translate_errors
    async def UpdateCredits(
        self, request: keys_pb2.UpdateCreditsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> keys_pb2.UpdateCreditsResponse:
        """Set or add to a key's credits."""
        change = request.WhichOneof("change")
        credits = await self._service().credits.update(
            request.id,
            set_to=request.set if change == "set" else None,
            add=request.add if change == "add" else None,
            authorization=authorization(context),
        )
        return keys_pb2.UpdateCreditsResponse(credits=credits_to_proto(credits))
