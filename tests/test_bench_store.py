"""The benchmarks' throw-away model store (bench/store.py) and `make soak`'s own start path.

A benchmark registers random-weight models, so it must do that in a store of its own and
never in the user's, and the `lantern serve` it starts must look in that same store. Until
bench/store.py, importing bench.predict repointed BENTOML_HOME as a side effect, which sent
`make soak`'s server to the wrong store: it exited at start, and no test saw it, because
tests/test_soak.py starts its server through the test fixtures.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH_MODULES = (
    "bench.predict",
    "bench.predict_ab",
    "bench.predict_ratio",
    "bench.server_cpu",
    "bench.soak",
    "bench.gpu",
    "bench.openvino",
    "bench.torchserve",
    "bench.explain_batching",
)


def python(code: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_importing_a_benchmark_leaves_the_model_store_alone(tmp_path: Path) -> None:
    home = tmp_path / "user-home"
    imports = "; ".join(f"import {m}" for m in BENCH_MODULES)
    result = python(f"import os; {imports}; print(os.environ['BENTOML_HOME'])", home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(home)


def test_the_temporary_store_is_the_one_bentoml_then_uses(tmp_path: Path) -> None:
    code = (
        "from bench.store import use_temporary_store\n"
        "root = use_temporary_store('lantern-test-store-')\n"
        "from bentoml._internal.configuration.containers import BentoMLContainer\n"
        "print(root)\n"
        "print(BentoMLContainer.bentoml_home.get())\n"
    )
    result = python(code, tmp_path / "user-home")
    assert result.returncode == 0, result.stderr
    root, bentoml_home = result.stdout.split()
    try:
        assert Path(root).name.startswith("lantern-test-store-")
        assert Path(bentoml_home) == Path(root) / "bentoml"
    finally:
        shutil.rmtree(root)


def test_a_temporary_store_is_refused_once_bentoml_is_imported(tmp_path: Path) -> None:
    home = tmp_path / "user-home"
    code = (
        "import os, bentoml\n"
        "from bench.store import use_temporary_store\n"
        "try:\n"
        "    use_temporary_store()\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
        "print(os.environ['BENTOML_HOME'])\n"
    )
    result = python(code, home)
    assert result.returncode == 0, result.stderr
    refusal, store = result.stdout.strip().splitlines()
    assert refusal.startswith("refused: bentoml is already imported"), refusal
    assert store == str(home)


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_make_soak_registers_serves_and_soaks_its_own_model(tmp_path: Path) -> None:
    # `make soak` is `python -m bench.soak`; a small model and few requests take the same
    # path: register in a temporary store, start `lantern serve` on it, soak, report.
    home = tmp_path / "user-home"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.soak",
            "--arch",
            "resnet18",
            "--image-size",
            "64",
            "--requests",
            "100",
            "--concurrency",
            "4",
        ],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"},
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = result.stdout + result.stderr
    # Exit status 1 only says the RSS grew by 5 % or more, which 100 requests do not decide.
    assert result.returncode in (0, 1), out
    assert "100 requests at concurrency 4 in" in result.stdout, out
    assert ", 0 errors" in result.stdout, out
    assert "target: model worker RSS growth from request 20 to 100" in result.stdout, out
    assert not home.exists(), "the soak wrote into the user's model store"
