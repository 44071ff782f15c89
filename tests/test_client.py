"""The batch client end to end: `lantern explain` and `lantern predict` as real processes
against real redis-server, `lantern worker` and `lantern serve` processes.

A folder of generated images in nested sub-folders, plus one file that is not an image:
artifacts are mirrored into --out, the CSV lists every image, the bad file is reported
with the server's reason and makes the exit status non-zero, and a re-run resumes without
sending a finished image again (counted by the server's request metrics).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lantern.client import LanternClient
from tests.conftest import TINY_CLASSES, free_port
from tests.stack_fixtures import Stack, stack, start_stack, stop_stack  # noqa: F401  (fixture)
from tests.worker_fixtures import REPO, shape_png

pytestmark = pytest.mark.integration

# input file -> where its results go, relative to --out
GOOD = {
    "a.png": "a",
    "cats/b.png": "cats/b",
    "cats/c.jpg": "cats/c",
    "cats/deep/d.png": "cats/deep/d",
    "dogs/e.png": "dogs/e",
}
BAD = "dogs/broken.png"
METHODS = "gradcam,activations"
# Saved under the API's own names: <name>.<method>.<kind>, <name> the file's stem.
ARTIFACTS = (
    "{}.gradcam.heatmap.png",
    "{}.gradcam.overlay.png",
    "{}.gradcam.npy",
    "{}.gradcam.upsampled.npy",
    "{}.activations.heatmap.png",
    "{}.activations.overlay.png",
    "{}.activations.grid.png",
    "{}.activations.npy",
    "{}.activations.upsampled.npy",
    "{}.activations.channels.npy",
)


def lantern(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lantern.cli", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def posts(stack: Stack, path: str) -> int:  # noqa: F811
    """Requests to `path` the server has answered so far, from its Prometheus request
    counter (labelled by route: service.gateway), summed over status codes.

    The counter is updated as the response completes, so a count taken right after a
    request can miss it: read until two reads 0.25 s apart agree.
    """
    series = re.compile(
        rf'^bentoml_service_request_total\{{[^}}]*endpoint="{re.escape(path)}"[^}}]*\}} (\S+)$',
        re.M,
    )
    count = -1.0
    while True:
        time.sleep(0.25)
        text = httpx.get(stack.url + "/metrics", timeout=10).text
        now = sum(float(v) for v in series.findall(text))
        if now == count:
            return int(now)
        count = now


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/ with five generated images in nested folders, a broken one and a text file."""
    root = tmp_path_factory.mktemp("photos")
    for i, rel in enumerate(GOOD):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = shape_png(i, size=64, width=64 + 8 * i)
        if path.suffix == ".jpg":
            data = _as_jpeg(data)
        path.write_bytes(data)
    (root / BAD).write_bytes(b"this is not an image, whatever its name says")
    (root / "cats/notes.txt").write_text("not an image either, and not collected")
    return root


@pytest.fixture(scope="module")
def explained(stack: Stack, photos: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]  # noqa: F811
    """One `lantern explain` run over photos/, in jobs of two images."""
    cwd = tmp_path_factory.mktemp("explain-run")
    before = posts(stack, "/explain")
    result = lantern(
        "explain", str(photos), "--url", stack.url, "--methods", METHODS,
        "--out", "maps", "--batch-size", "2", cwd=cwd,
    )  # fmt: skip
    return result, cwd / "maps", posts(stack, "/explain") - before


def test_explain_mirrors_the_input_tree_with_every_artifact(explained, photos: Path) -> None:  # type: ignore[no-untyped-def]
    result, out, _ = explained
    for rel, key in GOOD.items():
        folder = out / key
        stem = key.rsplit("/", 1)[-1]
        names = [template.format(stem) for template in ARTIFACTS]
        for name in names:
            assert (folder / name).is_file(), (folder / name, result.stderr)
        for name in names:
            if name.endswith(".png"):
                with Image.open(folder / name) as im:
                    assert im.format == "PNG" and im.width > 0
            else:
                assert np.load(folder / name).size > 0
        done = json.loads((folder / "result.json").read_text())
        assert done["source"] == str(photos / rel)
        assert done["request"]["methods"] == ["activations", "gradcam"]
        assert done["prediction"]["label"] in TINY_CLASSES
        assert done["files"]["gradcam.heatmap"] == f"{stem}.gradcam.heatmap.png"
        assert done["files"]["gradcam.raw"] == f"{stem}.gradcam.npy"  # as the API names it
    assert not (out / "dogs/broken").exists()
    assert not (out / "cats/notes").exists()


def test_explain_writes_a_csv_of_predictions_that_match_the_api(  # type: ignore[no-untyped-def]
    explained,
    photos: Path,
    stack: Stack,  # noqa: F811
) -> None:
    _, out, _ = explained
    rows = {
        Path(r["path"]).relative_to(photos).as_posix(): r for r in read_csv(out / "predictions.csv")
    }
    assert set(rows) == {*GOOD, BAD}
    with LanternClient(stack.url) as client:
        for rel, key in GOOD.items():
            row = rows[rel]
            answer = client.predict((rel, (photos / rel).read_bytes()))
            assert row["status"] == "ok" and row["error"] == ""
            assert row["output"] == key
            assert row["label"] == answer["label"]
            assert int(row["class_index"]) == answer["class_index"]
            assert float(row["probability"]) == pytest.approx(answer["probability"], abs=1e-3)
            assert row["model_version"] == answer["model_version"]
            assert row["job_id"].startswith("ex-")


def test_explain_reports_the_bad_file_and_fails_the_run(explained, photos: Path) -> None:  # type: ignore[no-untyped-def]
    result, out, _ = explained
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    row = next(r for r in read_csv(out / "predictions.csv") if r["path"].endswith("broken.png"))
    assert row["status"] == "rejected"
    assert "broken.png" in row["error"]  # the server's own message names the file
    reported = [line for line in result.stderr.splitlines() if line.startswith("rejected:")]
    assert reported == [f"rejected: {photos / BAD}: {row['error']}"]
    assert "explained 5 of 6 image(s)" in result.stdout


def test_explain_isolates_the_bad_file_by_retrying_its_job_image_by_image(explained) -> None:  # type: ignore[no-untyped-def]
    # 6 images in jobs of 2: three requests, and the one holding the broken file is sent
    # again as two single images.
    _, _, requests = explained
    assert requests == 3 + 2


def test_explain_rerun_resumes_without_resubmitting_finished_images(  # type: ignore[no-untyped-def]
    explained,
    photos: Path,
    stack: Stack,  # noqa: F811
) -> None:
    _, out, _ = explained
    cwd = out.parent
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".csv"}
    # An interrupted run: this image's results were never completed.
    (out / "cats/deep/d/result.json").unlink()

    before = posts(stack, "/explain")
    result = lantern(
        "explain", str(photos), "--url", stack.url, "--methods", METHODS, "--out", "maps",
        "--batch-size", "2", cwd=cwd,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    # Only the unfinished image and the broken file are sent again: together, then (refused
    # for the broken file) one by one.
    assert posts(stack, "/explain") - before == 1 + 2
    assert "explained 5 of 6 image(s) (4 from an earlier run)" in result.stdout
    for path, stamp in stamps.items():
        if "cats/deep/d" not in path.as_posix():
            assert path.stat().st_mtime_ns == stamp, f"{path} was written again"
    assert (out / "cats/deep/d/result.json").is_file()
    rows = read_csv(out / "predictions.csv")
    assert [r["status"] for r in rows].count("ok") == 5


def test_explain_reports_a_layer_the_service_refuses(
    stack: Stack,  # noqa: F811
    photos: Path,
    tmp_path: Path,
) -> None:
    """A layer the model does not have used to be accepted and fail as a job; the service
    now refuses it at the door (422), and the client reports that, image by image."""
    result = lantern(
        "explain", str(photos / "a.png"), "--url", stack.url, "--layer", "layer9",
        "--out", "maps", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    rejected = [line for line in result.stderr.splitlines() if line.startswith("rejected:")]
    assert len(rejected) == 1, result.stderr
    assert "a.png" in rejected[0] and "no layer 'layer9'" in rejected[0], rejected[0]
    row = read_csv(tmp_path / "maps/predictions.csv")[0]
    assert row["status"] == "rejected" and "layer9" in row["error"]
    assert not (tmp_path / "maps/a/result.json").exists()


def test_explain_reports_a_job_the_worker_fails_and_wait_raises_it(  # type: ignore[no-untyped-def]
    tiny_bundle, photos: Path, tmp_path: Path
) -> None:
    """A job that fails on the worker, for a reason the API cannot check first: here the
    worker was given a model store without the served model (a deployment that forgot the
    workers' model volume). The batch command lists the job's error and saves nothing;
    LanternClient.wait raises JobFailed with it."""
    from lantern.batch import BatchOptions, explain_images
    from lantern.client import InputImage, JobFailed

    running = start_stack(
        tiny_bundle.tag,
        tmp_path / "stack",
        worker_only_env={"BENTOML_HOME": str(tmp_path / "a-store-without-the-model")},
    )
    try:
        out = tmp_path / "maps"
        image = InputImage(photos / "a.png", "a")
        options = BatchOptions(out=out, methods=["gradcam"], layer="layer4", progress=False)
        with LanternClient(running.url) as client:
            assert explain_images(client, [image], options) == 1
            row = read_csv(out / "predictions.csv")[0]
            assert row["status"] == "failed", row
            assert tiny_bundle.tag in row["error"] and "ex-" in row["error"], row
            assert not (out / "a/result.json").exists()

            submitted = client.explain([("b.png", shape_png(3))], methods=["saliency"])
            with pytest.raises(JobFailed) as failed:
                client.wait(submitted["job_id"], timeout=180)
        assert failed.value.job_id == submitted["job_id"]
        assert tiny_bundle.tag in str(failed.value), str(failed.value)
    finally:
        stop_stack(running)


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """More images than the test server takes in one /predict_batch (8), plus a bad one."""
    root = tmp_path_factory.mktemp("many")
    for i in range(12):
        sub = root / ("left" if i % 2 else "right") / f"{i:02d}.png"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_bytes(shape_png(i))
    (root / "left/zz-truncated.png").write_bytes(shape_png(99)[:60])
    return root


def test_predict_writes_a_csv_isolates_the_bad_file_and_resumes(  # type: ignore[no-untyped-def]
    stack: Stack,  # noqa: F811
    many: Path,
    tmp_path: Path,
) -> None:
    before = posts(stack, "/predict_batch")
    result = lantern("predict", str(many), "--url", stack.url, "--out", "preds", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    rows = read_csv(tmp_path / "preds/predictions.csv")
    images = sorted(p for p in many.rglob("*.png"))
    assert [r["path"] for r in rows] == [str(p) for p in images]  # input order
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) == 1 and bad[0]["path"].endswith("zz-truncated.png")
    assert bad[0]["status"] == "rejected" and "zz-truncated.png" in bad[0]["error"]
    assert f"rejected: {many / 'left/zz-truncated.png'}" in result.stderr
    # 13 images in requests of 16: refused (the server takes 8), re-split into 8 + 5; the
    # 8 holding the truncated file are refused and sent again one by one.
    assert posts(stack, "/predict_batch") - before == 1 + 1 + 8 + 1
    good = [r for r in rows if r["status"] == "ok"]
    with LanternClient(stack.url) as client:
        for i in range(0, len(good), 8):
            chunk = good[i : i + 8]
            answers = client.predict_batch([("x.png", Path(r["path"]).read_bytes()) for r in chunk])
            for row, answer in zip(chunk, answers, strict=True):
                assert row["label"] == answer["label"]
                assert float(row["probability"]) == pytest.approx(answer["probability"], abs=1e-6)
                assert row["model_version"] == answer["model_version"]

    before = posts(stack, "/predict_batch")
    again = lantern("predict", str(many), "--url", stack.url, "--out", "preds", cwd=tmp_path)
    assert again.returncode == 1
    assert posts(stack, "/predict_batch") - before == 1  # only the bad file, again
    assert "(12 from an earlier run)" in again.stdout
    assert read_csv(tmp_path / "preds/predictions.csv") == rows

    # An image whose bytes changed since its row was written is sent again, and its row
    # replaced: the README's "images whose CSV row matches their bytes are not sent again".
    changed = Path(good[0]["path"])
    original = changed.read_bytes()
    try:
        changed.write_bytes(shape_png(7, size=96))
        before = posts(stack, "/predict_batch")
        third = lantern("predict", str(many), "--url", stack.url, "--out", "preds", cwd=tmp_path)
        assert third.returncode == 1, third.stderr
        # The changed image and the bad file together (refused), then one by one.
        assert posts(stack, "/predict_batch") - before == 1 + 2
        assert "(11 from an earlier run)" in third.stdout
        updated = {r["path"]: r for r in read_csv(tmp_path / "preds/predictions.csv")}
        with LanternClient(stack.url) as client:
            (answer,) = client.predict_batch([("x.png", changed.read_bytes())])
        row = updated[str(changed)]
        assert row["status"] == "ok" and row["label"] == answer["label"]
        assert float(row["probability"]) == pytest.approx(answer["probability"], abs=1e-6)
        assert {p: r for p, r in updated.items() if p != str(changed)} == {
            r["path"]: r for r in rows if r["path"] != str(changed)
        }
    finally:
        changed.write_bytes(original)


def test_predict_without_out_prints_a_table_of_the_answers_and_writes_nothing(  # type: ignore[no-untyped-def]
    stack: Stack,  # noqa: F811
    tmp_path: Path,
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes(shape_png(i))
    result = lantern("predict", str(folder), "--url", stack.url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no CSV, no folder
    with LanternClient(stack.url) as client:
        for i in range(3):
            answer = client.predict(("x.png", (folder / f"{i}.png").read_bytes()))
            (line,) = [ln for ln in result.stdout.splitlines() if f"{i}.png" in ln]
            path, label, probability = line.split()  # path, label, probability to 3 places
            assert path == str(folder / f"{i}.png") and label == answer["label"], line
            assert float(probability) == pytest.approx(answer["probability"], abs=6e-4), line


@pytest.mark.parametrize("command", ["explain", "predict"])
def test_an_unreachable_service_is_a_one_line_error(command: str, tmp_path: Path) -> None:
    image = tmp_path / "x.png"
    image.write_bytes(shape_png(0))
    url = f"http://127.0.0.1:{free_port()}"
    result = lantern(command, str(image), "--url", url, "--out", "out", cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == [
        f"lantern {command}: error: cannot reach the Lantern service at {url} "
        "(connection refused); start it with `lantern up` (or `lantern serve`), or pass --url"
    ], result.stderr


def _as_jpeg(png_bytes: bytes) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(png_bytes)).convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_explain_with_faithfulness_scores_every_map_in_result_json(  # type: ignore[no-untyped-def]
    stack: Stack,  # noqa: F811
    photos: Path,
    tmp_path: Path,
) -> None:
    result = lantern(
        "explain", str(photos / "a.png"), "--url", stack.url, "--methods", "gradcam,saliency",
        "--faithfulness", "--out", "maps", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "maps" / "a" / "result.json").read_text())
    assert saved["request"]["faithfulness"] is True
    scores = saved["faithfulness"]
    assert set(scores) >= {"gradcam", "saliency"}
    for name in ("gradcam", "saliency"):
        for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
            assert 0.0 <= scores[name][key] <= 1.0, (name, key, scores[name])
    # a run without the flag is another request: it does not take these results as its own
    plain = lantern(
        "explain", str(photos / "a.png"), "--url", stack.url, "--methods", "gradcam,saliency",
        "--out", "maps", cwd=tmp_path,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    assert "(0 from an earlier run)" in plain.stdout
    assert "faithfulness" not in json.loads((tmp_path / "maps/a/result.json").read_text())
