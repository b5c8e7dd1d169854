"""Cancelling keystile's background loops always stops them, whatever they were waiting on.

On Python 3.11 ``asyncio.wait_for`` swallows a cancellation that arrives in the loop turn in which
the awaited operation finishes: it returns the result instead of raising CancelledError. A loop
around it then runs on, and ``KeystileServer.stop()``, which cancels its loops and waits for them,
never returns (CI saw exactly this: a server whose health probe outlived its shutdown). Each test
here lands the cancellation in that very turn, deterministically.
"""

from __future__ import annotations

import ast
import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from keystile_server.database_health import DatabaseHealth
from keystile_server.watch import KeyEventHub

ROOT = Path(__file__).resolve().parent.parent


async def cancel_as_it_finishes(
    waiter: Coroutine[Any, Any, object], *, parked: Callable[[], bool], finish: Callable[[], None]
) -> None:
    """Run ``waiter`` until ``parked()``, then ``finish()`` what it waits on and cancel it at once.

    The task must end cancelled. After ``finish()`` one loop turn completes the awaited
    operation; its waiter wakes only in a later turn, and the cancellation lands in between.
    """
    task = asyncio.ensure_future(waiter)
    async with asyncio.timeout(5):
        while not parked():  # noqa: ASYNC110 - polls the code under test, which sets no event
            await asyncio.sleep(0.001)
    await asyncio.sleep(0)
    finish()
    await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=2)  # a swallowed cancellation runs on: fail
    assert task in done and task.cancelled(), "the cancellation was swallowed"


def test_a_watch_stream_waiting_for_events_stops_when_cancelled() -> None:
    hub = KeyEventHub()
    hub.open()
    subscription = hub.subscribe()
    waits = 0

    async def forever() -> None:
        nonlocal waits
        while True:  # as the WatchKeyEvents handler does
            waits += 1
            await subscription.next_message(5)

    asyncio.run(
        cancel_as_it_finishes(
            forever(), parked=lambda: waits == 1, finish=lambda: subscription._deliver(b"event", 0.0)
        )
    )


class _Store:
    """Answers the health probe only when the test completes ``pong``."""

    def __init__(self) -> None:
        self.pong: asyncio.Future[None] | None = None

    async def ping(self, timeout: float | None = None) -> None:
        self.pong = asyncio.get_running_loop().create_future()
        await self.pong


def test_the_database_health_loop_stops_when_cancelled() -> None:
    store = _Store()

    async def set_serving(serving: bool) -> None:
        pass

    def answer() -> None:
        assert store.pong is not None
        store.pong.set_result(None)

    async def scenario() -> None:
        health = DatabaseHealth(
            store,  # type: ignore[arg-type]
            interval=0.001,
            db_timeout=5,
            set_serving=set_serving,
        )
        await cancel_as_it_finishes(health.run(), parked=lambda: store.pong is not None, finish=answer)

    asyncio.run(scenario())


def test_no_code_of_ours_uses_asyncio_wait_for() -> None:
    """asyncio.timeout() propagates cancellation; wait_for on 3.11 may swallow it (see above)."""
    offenders = []
    for folder in ("server", "client/keystile"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Attribute) and node.attr == "wait_for":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"use `async with asyncio.timeout(...)` instead of wait_for: {offenders}"
