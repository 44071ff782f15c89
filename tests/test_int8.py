"""The INT8 graph: built at export from the model's own training data, checked against fp32
on held-out images and refused below the gate; the service picks it on a CPU (auto),
refuses an explicit precision the bundle lacks, and says which precision answered.

A briefly trained ResNet-18 on the generated shapes (40 px) stands in for a real model:
random weights would make the agreement figures meaningless. Nothing here times anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import pytest

from lantern.core.bundle import Bundle, list_bundles
from lantern.core.errors import ModelError
from models import quantize
from models.export import export_checkpoint
from service import classifier
from tests.service_fixtures import Server, encode, start_server, stop_server

SIZE = 40


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ResNet-18 trained for a few epochs on generated shapes (about a minute on 2 cores)."""
    from models.train import TrainConfig, main

    cfg = TrainConfig(
        dataset="shapes",
        arch="resnet18",
        weights="none",
        mode="all",
        epochs=3,
        batch_size=32,
        lr=0.003,
        optimizer="adamw",
        image_size=SIZE,
        train_size=640,
        val_size=300,
        workers=0,
        out_dir=tmp_path_factory.mktemp("int8-runs"),
        progress=False,
    )
    return Path(main(cfg)["best_checkpoint"])


# The product's gate is 99 % agreement and at most 1 point lost (asserted below). This
# three-epoch model passes it here by a hair (99.3 % on an Intel Xeon with VNNI/AMX), and
# its training and its INT8 kernels round differently on other CPUs, so the tests that
# need an INT8 graph export it with a wider gate; the refusal test uses an impossible one.
TEST_MIN_AGREEMENT = 95.0
TEST_MAX_ACCURACY_DROP = 3.0


@pytest.fixture(scope="module")
def int8_bundle(trained_checkpoint: Path) -> Bundle:
    return export_checkpoint(
        trained_checkpoint,
        int8=True,
        int8_min_agreement=TEST_MIN_AGREEMENT,
        int8_max_accuracy_drop=TEST_MAX_ACCURACY_DROP,
    )


def test_the_default_gate_is_99_percent_agreement_and_1_point() -> None:
    import inspect

    assert (quantize.MIN_AGREEMENT, quantize.MAX_ACCURACY_DROP) == (99.0, 1.0)
    defaults = inspect.signature(export_checkpoint).parameters
    assert defaults["int8_min_agreement"].default == quantize.MIN_AGREEMENT
    assert defaults["int8_max_accuracy_drop"].default == quantize.MAX_ACCURACY_DROP


def test_export_builds_a_calibrated_int8_graph_and_records_its_check(int8_bundle: Bundle) -> None:
    record = int8_bundle.int8
    assert record is not None and record["status"] == "passed", record
    path = int8_bundle.onnx_int8_path
    assert path is not None and path.is_file()
    # Statically quantised, QDQ: QuantizeLinear/DequantizeLinear pairs around the convs,
    # per-channel weight scales (one per output channel: a 1-D scale of length > 1).
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    scales = {t.name: t for t in graph.initializer if t.name.endswith("_scale")}
    assert any(len(t.dims) == 1 and t.dims[0] > 1 for t in scales.values())
    # Calibrated on the training split, checked on the held-out split, both stratified.
    assert record["calibration"]["images"] == quantize.CALIBRATION_IMAGES
    assert "train" in record["calibration"]["source"]
    assert record["holdout"]["images"] == 300 and "held out" in record["holdout"]["source"]
    assert record["min_agreement"] == TEST_MIN_AGREEMENT
    assert record["agreement"] >= TEST_MIN_AGREEMENT
    assert record["accuracy_drop"] <= TEST_MAX_ACCURACY_DROP
    assert record["fp32_accuracy"] > 60.0  # a trained model, so agreement means something
    assert int8_bundle.meta["export"]["int8"] == "passed"


def test_export_checks_the_int8_graph_again_as_openvino_runs_it(
    int8_bundle: Bundle, held_out_images: HeldOut
) -> None:
    """OpenVINO's int8 kernels are not ONNX Runtime's: the same gate, measured with OpenVINO
    compiled as the service compiles it, on the same held-out images."""
    import openvino

    record = int8_bundle.int8
    assert record is not None
    check = record["openvino"]
    assert check["status"] == "passed", check
    assert check["version"] == openvino.__version__
    assert check["agreement"] >= TEST_MIN_AGREEMENT
    assert check["accuracy_drop"] <= TEST_MAX_ACCURACY_DROP
    assert int8_bundle.openvino_int8_path == int8_bundle.onnx_int8_path
    # The recorded figure is OpenVINO's own answer on the held-out images, recomputed here.
    _, x, fp32_top1 = held_out_images
    assert int8_bundle.onnx_int8_path is not None
    got = quantize.openvino_top1(int8_bundle.onnx_int8_path, x)
    assert round(100.0 * float(np.mean(got == fp32_top1)), 3) == check["agreement"]


def test_the_openvino_gate_refuses_on_its_own_and_skips_without_openvino(
    int8_bundle: Bundle, held_out_images: HeldOut, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert int8_bundle.onnx_int8_path is not None
    _, x, fp32_top1 = held_out_images
    labels = fp32_top1  # any labels: the gate compares the two graphs' answers
    holdout = quantize.Images(x, labels, "held out")
    refused = quantize.openvino_gate(
        int8_bundle.onnx_int8_path, holdout, fp32_top1, min_agreement=100.1, max_accuracy_drop=1
    )
    assert refused["status"] == "refused" and "needs >= 100.1%" in refused["reason"]
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if it were not installed
    skipped = quantize.openvino_gate(
        int8_bundle.onnx_int8_path, holdout, fp32_top1, min_agreement=99, max_accuracy_drop=1
    )
    assert skipped == {"status": "skipped", "reason": "openvino was not installed at export"}


def with_openvino_check(bundle: Bundle, check: dict[str, Any] | None) -> Bundle:
    """The same bundle (files untouched), its INT8 record's OpenVINO check replaced."""
    meta = json.loads(json.dumps(bundle.meta))
    if check is None:
        meta["int8"].pop("openvino", None)
    else:
        meta["int8"]["openvino"] = check
    return Bundle(bundle.tag, bundle.path, meta)


@pytest.mark.parametrize(
    ("check", "why"),
    [
        (None, "not checked with OpenVINO at export"),
        ({"status": "refused", "reason": "OpenVINO 2026.4.1 INT8: 97.0% agree"}, "refused: "),
        ({"status": "skipped", "reason": "openvino was not installed at export"}, "skipped: "),
    ],
)
def test_openvino_serves_int8_only_when_it_passed_the_openvino_check(
    int8_bundle: Bundle,
    check: dict[str, Any] | None,
    why: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = with_openvino_check(int8_bundle, check)
    assert bundle.onnx_int8_path is not None and bundle.openvino_int8_path is None
    with caplog.at_level("WARNING", logger="lantern.service.classifier"):
        _, precision = classifier.open_model(bundle, runtime="openvino", threads=1)
    assert precision == "fp32"
    assert "OpenVINO serves fp32, not the INT8 graph" in caplog.text and why in caplog.text
    with pytest.raises(ModelError, match="did not pass its gate under OpenVINO") as refused:
        classifier.open_model(bundle, precision="int8", runtime="openvino", threads=1)
    assert why in str(refused.value) and "lantern[openvino]" in str(refused.value)
    # ONNX Runtime still serves the INT8 graph its own gate passed.
    _, precision = classifier.open_model(bundle, provider="cpu", threads=1)
    assert precision == "int8"


def test_the_gate_refuses_the_int8_graph_and_the_fp32_model_is_still_registered(
    trained_checkpoint: Path, caplog: pytest.LogCaptureFixture
) -> None:
    before = len(list_bundles())
    with caplog.at_level("WARNING", logger="models.quantize"):
        bundle = export_checkpoint(trained_checkpoint, int8=True, int8_min_agreement=100.1)
    assert len(list_bundles()) == before + 1
    assert bundle.onnx_path.is_file() and bundle.onnx_int8_path is None
    assert not (bundle.path / "model.int8.onnx").exists()
    record = bundle.int8
    assert record is not None and record["status"] == "refused"
    assert "needs >= 100.1%" in record["reason"]
    assert "REFUSED" in caplog.text and f"{record['agreement']:.1f}%" in caplog.text
    # ... and the service serves it in fp32, not with the refused graph.
    _, precision = classifier.open_model(bundle, provider="cpu", threads=1)
    assert precision == "fp32"
    with pytest.raises(ModelError, match=r"no INT8 graph \(refused: \d+\.\d% agree\)"):
        classifier.graph_path(bundle, "int8")


def test_no_calibration_data_skips_int8_with_a_reason(tiny_bundle: Bundle, tmp_path: Path) -> None:
    import torch

    from models.checkpoint import save_checkpoint
    from models.network import build_model

    ckpt = save_checkpoint(
        tmp_path / "odd.pt",
        build_model("resnet18", 4, weights="none"),
        architecture="resnet18",
        class_names=tiny_bundle.class_names,
        spec=tiny_bundle.preprocess,
        training={"dataset": "somewhere else"},
        metrics={"accuracy": 0.25},
    )
    del torch
    bundle = export_checkpoint(ckpt, int8=True)
    record = bundle.int8
    assert record is not None and record["status"] == "skipped"
    assert "--calibration-data" in record["reason"] and bundle.onnx_int8_path is None


def test_auto_runs_int8_on_the_cpu_when_the_bundle_has_it_and_fp32_when_not(
    int8_bundle: Bundle, tiny_bundle: Bundle
) -> None:
    session, precision = classifier.open_model(int8_bundle, provider="cpu", threads=1)
    assert precision == "int8" and session.get_providers()[0] == classifier.CPU
    assert tiny_bundle.onnx_int8_path is None
    _, precision = classifier.open_model(tiny_bundle, provider="cpu", threads=1)
    assert precision == "fp32"
    _, precision = classifier.open_model(int8_bundle, precision="fp32", provider="cpu", threads=1)
    assert precision == "fp32"


def test_an_explicit_precision_the_bundle_lacks_fails_readably(tiny_bundle: Bundle) -> None:
    with pytest.raises(ModelError, match=r"LANTERN_PRECISION=int8 but model .* has no INT8 graph"):
        classifier.open_model(tiny_bundle, precision="int8", provider="cpu")
    with pytest.raises(ModelError, match=r"LANTERN_PRECISION=fp16 but model .* has no fp16 graph"):
        classifier.open_model(tiny_bundle, precision="fp16", provider="cpu")
    # `lantern serve` says so before it starts the server.
    done = subprocess.run(
        [sys.executable, "-m", "lantern.cli", "serve", "--port", "1"],
        env={**os.environ, "LANTERN_MODEL": tiny_bundle.tag, "LANTERN_PRECISION": "int8"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert "has no INT8 graph (not built at export)" in done.stderr
    assert "Traceback" not in done.stderr


def test_models_list_shows_the_int8_column(int8_bundle: Bundle, tiny_bundle: Bundle) -> None:
    run = [sys.executable, "-m", "lantern.cli", "models", "list"]
    table = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    start, end = header.index("INT8"), header.index("ALIASES")  # the INT8 column

    def int8_cell(row: str) -> str:
        return row[start:end].strip()

    mine = next(r for r in rows if r.startswith(int8_bundle.tag))
    assert int8_cell(mine) == f"{int8_bundle.meta['int8']['agreement']:.1f}% agree"
    tiny = next(r for r in rows if r.startswith(tiny_bundle.tag))
    assert int8_cell(tiny) == "-"  # exported without an INT8 graph
    listed = subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=120)
    rows_json = {r["tag"]: r for r in json.loads(listed.stdout)}
    assert rows_json[int8_bundle.tag]["int8"]["status"] == "passed"


# --- through a real `lantern serve` -------------------------------------------------------


@pytest.fixture(scope="module")
def int8_server(int8_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        int8_bundle.tag,
        tmp_path_factory.mktemp("serve-int8") / "serve.log",
        {"LANTERN_PRECISION": "auto", "LANTERN_ORT_PROVIDER": "cpu"},
    )
    yield server
    stop_server(server)


HeldOut = tuple[list[bytes], np.ndarray, np.ndarray]
"""The held-out images as PNG uploads, preprocessed as the service does, their fp32 top-1."""


@pytest.fixture(scope="module")
def held_out_images(int8_bundle: Bundle) -> HeldOut:
    """The held-out images the gate was checked on (made, decoded and classified once)."""
    from lantern.core.images import decode_image
    from models.data import ShapesDataset

    training: dict[str, Any] = int8_bundle.meta["training"]
    val = ShapesDataset(int(training["val_images"]), size=SIZE, seed=int(training["seed"]) + 10_000)
    uploads = [encode(val[i][0], "PNG") for i in range(len(val))]
    x = int8_bundle.preprocess.apply_batch([decode_image(d, max_pixels=10**8) for d in uploads])
    return uploads, x, quantize.top1(int8_bundle.onnx_path, x)


def predicted_classes(client: httpx.Client, uploads: list[bytes], precision: str) -> np.ndarray:
    """The service's top-1 class for every upload (POST /predict_batch, 8 at a time), each
    answer checked to come from `precision`."""
    got: list[int] = []
    for start in range(0, len(uploads), 8):
        chunk = range(start, min(start + 8, len(uploads)))
        files = [("images", (f"{i}.png", uploads[i], "image/png")) for i in chunk]
        r = client.post("/predict_batch", files=files)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert {p["precision"] for p in predictions} == {precision}
        got += [p["class_index"] for p in predictions]
    return np.asarray(got)


@pytest.mark.integration
def test_predict_reports_int8_and_agrees_with_fp32_as_the_gate_promises(
    int8_server: Server, int8_bundle: Bundle, held_out_images: HeldOut
) -> None:
    uploads, _, fp32_top1 = held_out_images
    with httpx.Client(base_url=int8_server.url, timeout=60) as client:
        r = client.post("/predict", files={"image": ("0.png", uploads[0], "image/png")})
        assert r.status_code == 200, r.text
        assert r.json()["precision"] == "int8"
        assert r.json()["model_version"] == int8_bundle.version
        got = predicted_classes(client, uploads, "int8")
        metrics = client.get("/metrics").text
    agreement = 100.0 * float(np.mean(got == fp32_top1))
    assert agreement >= int8_bundle.meta["int8"]["min_agreement"], agreement
    assert 'precision="int8"' in metrics and "lantern_model_info" in metrics
    assert "precision int8" in int8_server.log_text()  # the startup log says so


@pytest.fixture(scope="module")
def int8_openvino_server(
    int8_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        int8_bundle.tag,
        tmp_path_factory.mktemp("serve-int8-openvino") / "serve.log",
        {"LANTERN_PRECISION": "auto", "LANTERN_RUNTIME": "openvino"},
    )
    yield server
    stop_server(server)


@pytest.mark.integration
def test_openvino_serves_the_same_int8_graph_and_agrees_as_the_gate_promises(
    int8_openvino_server: Server, int8_bundle: Bundle, held_out_images: HeldOut
) -> None:
    """The gate was checked with ONNX Runtime; OpenVINO's INT8 kernels round differently,
    so its answers are held to the same promise against fp32, and to ONNX Runtime's INT8."""
    uploads, x, fp32_top1 = held_out_images
    assert int8_bundle.onnx_int8_path is not None
    ort_int8_top1 = quantize.top1(int8_bundle.onnx_int8_path, x)
    with httpx.Client(base_url=int8_openvino_server.url, timeout=60) as client:
        got = predicted_classes(client, uploads, "int8")
        metrics = client.get("/metrics").text
    minimum = int8_bundle.meta["int8"]["min_agreement"]
    vs_fp32 = 100.0 * float(np.mean(got == fp32_top1))
    vs_ort_int8 = 100.0 * float(np.mean(got == ort_int8_top1))
    assert vs_fp32 >= minimum and vs_ort_int8 >= minimum, (vs_fp32, vs_ort_int8)
    assert 'precision="int8"' in metrics and 'runtime="openvino"' in metrics
    assert "(runtime openvino), precision int8" in int8_openvino_server.log_text()


def test_the_openapi_document_describes_the_precision_field() -> None:
    from service.api import app
    from service.openapi import build_document

    schemas = build_document(app)["components"]["schemas"]
    precision = schemas["Prediction"]["properties"]["precision"]
    assert precision["enum"] == ["fp32", "int8", "fp16"] and precision["description"]
    assert "precision" in schemas["Prediction"]["required"]
