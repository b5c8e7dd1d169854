"""The arithmetic behind every ratio ``make bench`` reports (bench/run.py), without running it.

The numbers in the README are only as good as this: each B phase must sit between two A phases
and be compared with exactly those two.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench_run() -> ModuleType:
    spec = importlib.util.spec_from_file_location("keystile_bench_run", RUN_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def phase(name: str, value: float, concurrency: int = 16) -> dict[str, Any]:
    return {"name": name, "concurrency": concurrency, "calls_per_second": value}


def test_alternating_puts_every_b_between_two_a(bench_run: ModuleType) -> None:
    plan = bench_run.alternating(("A", "a-spec"), ("B", "b-spec"), rounds=3)
    assert [name for name, _ in plan] == ["A r1", "B r1", "A r2", "B r2", "A r3", "B r3", "A r4"]
    assert [spec for _, spec in plan] == ["a-spec", "b-spec"] * 3 + ["a-spec"]


def test_per_round_compares_each_b_with_its_own_neighbours(bench_run: ModuleType) -> None:
    # A drifts from 100 to 400; B is always 90 % of the A around it. A ratio against the mean
    # of all A phases would read 0.36 to 1.44; against the neighbours it reads 0.9 every round.
    phases = [
        phase("A r1", 100),
        phase("B r1", 135),
        phase("A r2", 200),
        phase("B r2", 225),
        phase("A r3", 300),
        phase("B r3", 315),
        phase("A r4", 400),
        phase("B r1", 1, concurrency=64),  # another block: never mixed in
    ]
    ratios = bench_run.per_round(phases, "B", "A", 16, lambda p: p["calls_per_second"], rounds=3)
    assert ratios == pytest.approx([0.9, 0.9, 0.9])


def test_per_round_refuses_a_baseline_name_used_by_two_blocks(bench_run: ModuleType) -> None:
    # Two blocks both calling their baseline "A": the second would stand in for the first.
    phases = [phase("A r1", 100), phase("B r1", 90), phase("A r2", 100)] * 2
    with pytest.raises(ValueError, match="used twice"):
        bench_run.per_round(phases, "B", "A", 16, lambda p: p["calls_per_second"], rounds=1)


def test_per_round_fails_loudly_on_a_missing_phase(bench_run: ModuleType) -> None:
    phases = [phase("A r1", 100), phase("B r1", 90)]  # no "A r2" after the B
    with pytest.raises(KeyError):
        bench_run.per_round(phases, "B", "A", 16, lambda p: p["calls_per_second"], rounds=1)
