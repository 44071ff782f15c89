"""The benchmarks name the machine they ran on closely enough to tell two hosts apart.

Two sessions' "AMD EPYC" (the same /proc/cpuinfo model name) ran ResNet-50 INT8 about 5x
apart (BENCHMARKS.md, "A slower AMD EPYC"); the family, model and instruction sets in
bench.predict.machine() are what tells such figures apart afterwards.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.predict import ISA_FLAGS, machine

CPUINFO = Path("/proc/cpuinfo")


def first(field: str) -> str:
    for line in CPUINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    raise LookupError(field)


@pytest.mark.skipif(
    not CPUINFO.exists() or "cpu family" not in CPUINFO.read_text(),
    reason="needs an x86 /proc/cpuinfo (the machines this project runs on)",
)
def test_machine_names_the_cpu_family_model_and_instruction_sets() -> None:
    described = machine()
    assert first("model name") in described
    assert f"family {first('cpu family')} model {first('model')}" in described
    flags = set(first("flags").split())
    present = [flag.upper() for flag in ISA_FLAGS if flag in flags]
    isa = described.split("; ")[-1].split(")")[0]
    assert isa.split() == (present or ["no", "AVX2"]), described
