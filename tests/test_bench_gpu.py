"""bench/gpu.py runs where there is no GPU: its dry run on the CPU, and its refusal.

The dry run takes every path the GPU run takes (fp32 and fp16 graphs, run() and IO
binding, `lantern serve` with LANTERN_PRECISION, explanations through workers/engine.py)
with a ResNet-18 at 32 px on the CPU provider. No speed is asserted, only that each
figure is there, and the answers agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_gpu_bench(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu", *args],
        cwd=ROOT,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true", **(env or {})},
        capture_output=True,
        text=True,
        timeout=280,
    )


def test_without_a_cuda_device_it_refuses_in_one_line_and_exits_non_zero() -> None:
    # An empty CUDA_VISIBLE_DEVICES hides any GPU, so this holds on GPU machines too.
    result = run_gpu_bench(env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("no CUDA device: torch.cuda.is_available() is False")
    assert "--dry-run" in lines[0]
    assert "raw ONNX Runtime" not in result.stdout  # nothing was measured


@pytest.mark.integration
def test_dry_run_measures_every_path_and_writes_the_table_as_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    result = run_gpu_bench("--dry-run", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    table = result.stdout
    for line in (
        "raw ONNX Runtime on cpu, images/s",
        "fp32 run()",
        "fp32 IO binding",
        "fp16 run()",
        "fp16 IO binding",
        "CPU fp32 run()",
        "fp16 / fp32 (IO binding, best search)",
        "IO binding / run() (fp16)",
        "service POST /predict, fp32 on cpu",
        "service POST /predict, fp16 on cpu",
        "fp16 / fp32 service throughput",
        "explanations, images/s",
        "torch on the CPU",
    ):
        assert line in table, f"{line!r} missing from:\n{table}"

    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["dry_run"] is True
    batches = report["sizes"]["batches"]
    raw: dict[str, dict[int, float]] = {}
    for r in report["raw"]:
        raw.setdefault(r["what"], {})[r["batch"]] = r["images_per_s"]
    assert set(raw) == {
        "fp32 run()",
        "fp32 IO binding",
        "fp16 run()",
        "fp16 IO binding",
        "CPU fp32 run()",
    }
    for what, rates in raw.items():
        assert sorted(rates) == batches, what
        assert all(v > 0 for v in rates.values()), what

    # IO binding runs the same graph: the same logits as run(); fp16 is close to fp32.
    checks = report["checks"]
    assert checks["max |logit - fp32 run()|, fp32 IO binding"] < 1e-5
    assert checks["max |logit - fp32 run()|, fp16 IO binding"] < 0.05

    for precision in ("fp32", "fp16"):
        loads = report["service"][precision]
        assert [r["concurrency"] for r in loads] == report["sizes"]["concurrency"]
        for r in loads:
            # every request answered (load() raises on a non-200 or a wrong precision)
            assert (
                len(r["latencies_ms"])
                == r["requests"]
                == report["sizes"]["requests"][str(r["concurrency"])]
            )

    explained = {(r["what"], r["batch"]) for r in report["explain"] if r["images_per_s"] > 0}
    assert explained == {
        (what, b)
        for what in ("explain", "explain on the CPU")
        for b in report["sizes"]["explain_batches"]
    }


@pytest.mark.integration
def test_a_service_that_cannot_start_is_reported_and_the_rest_still_measured(
    tmp_path: Path,
) -> None:
    out = tmp_path / "gpu.json"
    # An invalid setting makes `lantern serve` refuse to start, as a missing CUDA library
    # would on a GPU machine.
    result = run_gpu_bench("--dry-run", "--out", str(out), env={"LANTERN_ORT_THREADS": "abc"})
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["service"] == {}
    for precision in ("fp32", "fp16"):
        why = report["service_failures"][precision]
        assert "lantern serve exited" in why and "LANTERN_ORT_THREADS" in why, why
        assert f"service POST /predict, {precision} on cpu: FAILED" in result.stdout
    assert report["raw"] and report["explain"]
