"""The offline demo model (models/demo.py) and its flag on the way to users.

- the demo itself, at tiny sizes, through `make_first_model`'s offline path: pretrain on
  shapes, fine-tune on a few glyphs, the same few glyphs from scratch; a bundle marked
  `demo`, and a report with both accuracies (measured, not compared: a tiny run proves
  nothing about which wins);
- GET /model carries `demo`, and the web page shows it in a banner (a real Chromium);
- `lantern up`'s ready banner repeats it.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import TINY_ARCH, TINY_CLASSES, TINY_SIZE

DEMO_LINE = "DEMO: knows only star, ring, diamond and arrow (a test bundle)"


def test_offline_first_model_is_the_demo_with_transfer_and_scratch_in_its_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lantern.core.bundle import load_bundle
    from lantern.core.errors import DataError
    from models import first_model
    from models.demo import DemoConfig, describe
    from models.export import export_checkpoint

    def offline(_cfg: Any) -> dict[str, Any]:
        raise DataError("no network in this test")

    monkeypatch.setattr(first_model, "main", offline)  # the CIFAR-10 path fails like offline
    # a model name of its own, so the session's other tests keep their `latest`
    monkeypatch.setattr(
        first_model, "export_checkpoint", partial(export_checkpoint, name="lantern-demo-test")
    )
    tiny = DemoConfig(
        image_size=32,
        pretrain_images=16,
        pretrain_epochs=1,
        few_shot_per_class=2,
        finetune_epochs=2,
        batch_size=8,
        finetune_batch_size=4,
        val_images=8,
        progress=False,
    )
    bundle = first_model.make_first_model(out_dir=tmp_path / "runs", demo=tiny)

    # the bundle says it is a demo, to torch-free readers too
    assert bundle.demo == describe(tiny)
    assert bundle.demo.startswith("DEMO: knows only star, ring, diamond and arrow")
    assert load_bundle(bundle.tag).demo == bundle.demo
    assert json.loads((bundle.path / "meta.json").read_text())["demo"] == bundle.demo
    assert bundle.class_names == ["star", "ring", "diamond", "arrow"]
    assert bundle.meta["training"]["dataset"] == "glyphs"

    # the transfer run's metrics and report hold the comparison, both numbers measured
    runs = {p.name.split("-")[1]: p for p in (tmp_path / "runs").glob("demo-*-*-*")}
    assert set(runs) == {"pretrain", "transfer", "scratch"}
    metrics = json.loads((runs["transfer"] / "metrics.json").read_text())
    demo = metrics["demo"]
    for key in ("transfer_val_accuracy", "scratch_val_accuracy", "pretrain_val_accuracy"):
        assert 0.0 <= demo[key] <= 1.0
    assert demo["transfer_minus_scratch"] == pytest.approx(
        demo["transfer_val_accuracy"] - demo["scratch_val_accuracy"]
    )
    assert demo["few_shot_images"] == 8 and demo["val_images"] == 8
    assert demo["wall_seconds"] > 0 and set(demo["seconds"]) == set(runs)
    report = (runs["transfer"] / "report.md").read_text()
    assert "## Transfer vs scratch" in report
    assert f"{100 * demo['transfer_val_accuracy']:.1f} %" in report
    assert f"{100 * demo['scratch_val_accuracy']:.1f} %" in report

    # a fair comparison: the transfer run loaded the pretrained backbone with a new head, the
    # scratch run nothing; same images, budget and seed
    scratch = json.loads((runs["scratch"] / "metrics.json").read_text())
    assert metrics["transfer"]["kind"] == "checkpoint"
    assert metrics["transfer"]["head"] == "re-initialised"
    assert "layer4" in metrics["transfer"]["layers_loaded"]
    assert scratch["transfer"]["kind"] == "none"
    same = ("dataset", "train_images", "val_images", "epochs", "batch_size", "lr", "seed")
    assert {k: metrics["training"][k] for k in same} == {k: scratch["training"][k] for k in same}
    pretrain = json.loads((runs["pretrain"] / "metrics.json").read_text())
    assert pretrain["training"]["dataset"] == "shapes"


def test_glyphs_are_a_task_of_their_own() -> None:
    from models.data import GLYPHS, draw_shape

    a, b = draw_shape(0, 64, task="shapes"), draw_shape(0, 64, task="glyphs")
    assert (a.label, b.label) == (0, 0)
    assert a.image.tobytes() != b.image.tobytes()
    assert draw_shape(5, 64, task="glyphs").image.tobytes() == (
        draw_shape(5, 64, task="glyphs").image.tobytes()
    )
    assert len(GLYPHS) == 4


# --- GET /model and the page --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """`lantern serve` with a demo-marked bundle (random weights: only the flag matters)."""
    import torch

    from lantern.core.preprocess import PreprocessSpec
    from models.checkpoint import save_checkpoint
    from models.demo import mark_demo
    from models.export import export_checkpoint
    from models.network import build_model
    from tests.service_fixtures import start_server, stop_server

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("demo-bundle")
    ckpt = save_checkpoint(
        tmp / "best.pt",
        build_model(TINY_ARCH, len(TINY_CLASSES), weights="none"),
        architecture=TINY_ARCH,
        class_names=TINY_CLASSES,
        spec=PreprocessSpec(crop_size=TINY_SIZE, resize_size=TINY_SIZE),
        training={"mode": "all", "dataset": "shapes", "epochs": 0},
        metrics={"accuracy": 0.25},
    )
    mark_demo(ckpt, DEMO_LINE)
    bundle = export_checkpoint(ckpt, name="lantern-demo-page")
    server = start_server(bundle.tag, tmp / "serve.log")
    yield server
    stop_server(server)


@pytest.mark.integration
def test_get_model_says_the_served_model_is_a_demo(demo_server: Any) -> None:
    info = httpx.get(demo_server.url + "/model", timeout=10).json()
    assert info["demo"] == DEMO_LINE
    schema = httpx.get(demo_server.url + "/docs.json", timeout=10).json()
    assert "demo" in schema["components"]["schemas"]["ModelInfo"]["properties"]


@pytest.mark.integration
def test_predict_answers_say_the_model_is_a_demo(demo_server: Any) -> None:
    from tests.worker_fixtures import shape_png

    files = {"image": ("glyph.png", shape_png(0), "image/png")}
    answer = httpx.post(demo_server.url + "/predict", files=files, timeout=30).json()
    assert answer["demo"] == DEMO_LINE and answer["label"] in TINY_CLASSES
    batch = [("images", (f"{i}.png", shape_png(i), "image/png")) for i in range(2)]
    answers = httpx.post(demo_server.url + "/predict_batch", files=batch, timeout=30).json()
    assert [p["demo"] for p in answers["predictions"]] == [DEMO_LINE, DEMO_LINE]


@pytest.mark.integration
@pytest.mark.browser
def test_the_page_shows_a_banner_naming_what_the_demo_knows(demo_server: Any) -> None:
    from playwright.sync_api import sync_playwright

    from tests.test_page import CHROMIUM, CHROMIUM_ARGS, TIMEOUT_MS

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package or set LANTERN_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(demo_server.url + "/")
            banner = page.locator("#demo-banner")
            banner.wait_for(state="visible")
            assert DEMO_LINE in banner.inner_text()
            assert "Demo model" in banner.inner_text()
            assert errors == []
        finally:
            browser.close()


# --- `lantern up`'s ready banner ----------------------------------------------------------


class _ModelHandler(http.server.BaseHTTPRequestHandler):
    body: bytes = b"{}"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def _serve_model(demo: str | None) -> tuple[http.server.HTTPServer, str]:
    handler = type("H", (_ModelHandler,), {"body": json.dumps({"demo": demo}).encode()})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def test_lantern_up_banner_repeats_the_demo_line(capsys: pytest.CaptureFixture[str]) -> None:
    from lantern.stack import Stack, served_demo

    server, base = _serve_model(DEMO_LINE)
    try:
        assert served_demo(base, {}) == DEMO_LINE
    finally:
        server.shutdown()
    server, base = _serve_model(None)
    try:
        assert served_demo(base, {}) is None
    finally:
        server.shutdown()
    assert served_demo(base, {}) is None  # nothing listening: no line, no error

    env = {"LANTERN_ARTIFACT_DIR": "/tmp/artifacts", "REDIS_URL": "redis://127.0.0.1:1/0"}
    Stack()._announce(env, DEMO_LINE)
    assert DEMO_LINE in capsys.readouterr().out
    Stack()._announce(env, None)
    out = capsys.readouterr().out
    assert "Lantern is up." in out and "DEMO" not in out
