"""bench/openvino.py on a tiny model: every variant measured, the table and its JSON, and
OpenVINO's f32 answers equal to ONNX Runtime's.

OpenVINO is the service's optional runtime (`lantern[openvino]`, part of the `dev` extra
that `make test` installs). No speed is asserted, only that each figure is there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_on_a_tiny_model_measures_every_variant_and_agrees(
    tiny_bundle: object, tmp_path: Path
) -> None:
    from models import quantize

    fp32 = tiny_bundle.onnx_path  # type: ignore[attr-defined]
    calibration = np.random.default_rng(0).standard_normal((8, 3, 64, 64), np.float32)
    int8 = quantize.quantize(fp32, calibration, tmp_path / "model.int8.onnx")
    out = tmp_path / "openvino.json"
    args = ["--quick", "--fp32", str(fp32), "--int8", str(int8), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "bench.openvino", *args],
        cwd=ROOT,
        env={**os.environ, "BENTOML_DO_NOT_TRACK": "true"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "raw images/s" in result.stdout and "agreement on 8" in result.stdout

    data = json.loads(out.read_text())
    labels = [row["label"] for row in data["rows"]]
    for start in ("ORT fp32 (", "ORT fp32 streams", "ORT INT8 (", "ORT INT8 streams"):
        assert any(label.startswith(start) for label in labels), labels
    for name in ("fp32", "INT8"):
        for hint in ("LATENCY", "THROUGHPUT"):
            assert any(label.startswith(f"OV {name} {hint}") for label in labels), (
                labels,
                data["notes"],
            )
    for row in data["rows"]:
        for b in ("1", "8", "32"):
            assert row["images_per_s"][b] > 0
            assert row["vs_ort"][b] > 0
    # OpenVINO in f32 computes what ONNX Runtime computes; bf16 and INT8 only roughly.
    f32 = data["agreement"]["OV fp32 vs ORT fp32"]
    assert f32["top1_agreement"] == 1.0
    assert f32["max_rel_error"] < 1e-3, f32
    assert "OV INT8 vs ORT INT8" in data["agreement"]
    assert set(data["cpu"]["flags"]) >= {"avx512_vnni", "amx_int8", "amx_bf16"}
