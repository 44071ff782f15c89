"""compare_top=k, "why this class and not that one?": the maps of each image's k most
probable classes from one forward pass and k gradients over its retained graph.

Checked by hand on a three-class version of the tiny CNN of tests/test_methods.py; on a
ResNet with random weights, in float64, element-wise against one target at a time; at the
door (422s); in the job id; in one job run in this process by the job function; and end
to end through the real worker and API.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lantern.core.errors import JobError, UnprocessableInput
from lantern.core.jobs import make_job_id, parse_request
from tests.stack_fixtures import Stack, stack  # noqa: F401  (fixture)
from tests.test_explain_api import _wait_finished
from tests.test_methods import TinyCNN, X
from tests.worker_fixtures import shape_png
from workers.engine import explain, explain_top_classes
from workers.methods import GradCAM, GradCAMPlusPlus, LayerCAM, Saliency


class ThreeClassCNN(TinyCNN):
    """TinyCNN with a third class whose weights are W[2] = [0, 1]: logits (2.0, 0.5, 1.0)
    for X (S2 = mean(A1) = 1), so its classes by probability are 0, 2, 1."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0], [0.0, 1.0]]))


def test_the_ranks_are_the_top_classes_with_hand_computed_maps() -> None:
    model = ThreeClassCNN().eval()
    ranked = explain_top_classes(model, X[None], [GradCAM("features")], 3)
    assert [int(ex.targets[0]) for ex in ranked] == [0, 2, 1]  # by probability, highest first
    torch.testing.assert_close(ranked[0].logits, torch.tensor([[2.0, 0.5, 1.0]]))
    a0 = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    a1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    # gradient of class c at every position of channel k: W[c, k] / 4
    expected = [
        torch.relu(0.25 * a0 + 0.125 * a1),  # class 0
        torch.relu(0.0 * a0 + 0.25 * a1),  # class 2
        torch.relu(-0.25 * a0 + 0.5 * a1),  # class 1
    ]
    for ex, want in zip(ranked, expected, strict=True):
        torch.testing.assert_close(ex.results["gradcam"].maps[0], want)


def test_rank_one_is_what_a_plain_request_explains() -> None:
    model = ThreeClassCNN().eval()
    methods = [GradCAM("features"), Saliency()]
    first = explain_top_classes(model, torch.stack([X, -X]), methods, 2)[0]
    plain = explain(model, torch.stack([X, -X]), methods)
    assert torch.equal(first.targets, plain.targets)
    for name in ("gradcam", "saliency"):
        assert torch.equal(first.results[name].maps, plain.results[name].maps)


@pytest.fixture(scope="module")
def resnet64() -> nn.Module:
    from bench.localisation import NarrowResNet

    torch.manual_seed(5)
    model = NarrowResNet(width=8).eval().double()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_the_k_gradients_of_one_pass_equal_one_target_at_a_time_in_float64(
    resnet64: nn.Module,
) -> None:
    torch.manual_seed(6)
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    methods = [GradCAM("layer3"), GradCAMPlusPlus("layer4"), LayerCAM("layer2"), Saliency()]
    ranked = explain_top_classes(resnet64, x, methods, 3)
    with torch.no_grad():
        order = resnet64(x).softmax(dim=1).argsort(dim=1, descending=True)[:, :3]
    for rank, ex in enumerate(ranked):
        assert ex.targets.tolist() == order[:, rank].tolist()
        alone = explain(resnet64, x, methods, order[:, rank].tolist())
        for m in methods:
            ours, ref = ex.results[m.name].maps, alone.results[m.name].maps
            assert ours.dtype == torch.float64 and float(ref.abs().max()) > 0
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)


def test_more_classes_than_the_model_has_is_a_readable_job_error() -> None:
    with pytest.raises(JobError, match="the model has 3 classes"):
        explain_top_classes(ThreeClassCNN().eval(), X[None], [Saliency()], 4)


# --- the contract and the door ------------------------------------------------------------

IMAGES = [("a", b"\x89PNG one")]
MODEL = "lantern-classifier:abc"


def test_compare_top_is_part_of_the_job_id_and_absent_keeps_the_old_one() -> None:
    base: dict[str, Any] = {"images": IMAGES, "model": MODEL, "methods": ["gradcam"]}
    plain = make_job_id(**base, targets=None)
    assert make_job_id(**base, targets=None, compare_top=None) == plain
    ids = {make_job_id(**base, targets=None, compare_top=k) for k in (2, 3, 5)}
    assert plain not in ids and len(ids) == 3


def _payload(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "methods": ["gradcam"],
        "targets": [None],
        "images": [{"name": "a", "data_b64": "aGk="}],
        **extra,
    }


def test_the_payload_checks_compare_top() -> None:
    assert parse_request(_payload(compare_top=3)).compare_top == 3
    assert parse_request(_payload()).compare_top is None
    with pytest.raises(JobError, match="from 2 to 5, not 6"):
        parse_request(_payload(compare_top=6))
    with pytest.raises(JobError, match="cannot be combined with targets"):
        parse_request(_payload(compare_top=2, targets=[1]))
    with pytest.raises(JobError, match="add at least one of gradcam"):
        parse_request(_payload(compare_top=2, methods=["activations"]))


def test_the_door_answers_422_with_a_readable_message(tiny_bundle: Any) -> None:
    from service.explanations import parse_options

    classes = list(tiny_bundle.class_names)  # four classes

    def options(**params: str) -> Any:
        return parse_options(params, 1, classes, tiny_bundle)

    assert options(compare_top="3").compare_top == 3
    assert options(compare_top="").compare_top is None and options().compare_top is None
    cases = {
        "1": "from 2 to 5, not 1",
        "6": "from 2 to 5, not 6",
        "three": "from 2 to 5, not 'three'",
        "-2": "from 2 to 5",
        "5": r"more classes than this model has \(4\)",
    }
    for value, message in cases.items():
        with pytest.raises(UnprocessableInput, match=message):
            options(compare_top=value)
    with pytest.raises(UnprocessableInput, match="cannot be combined with targets"):
        options(compare_top="2", targets="1")
    with pytest.raises(UnprocessableInput, match="depend on the class"):
        options(compare_top="2", methods="activations")


# --- the worker ----------------------------------------------------------------------------


def test_the_worker_writes_each_class_maps_and_the_manifest_lists_them(
    tiny_bundle: Any, tmp_path: Path
) -> None:
    """One job run in this process by the job function itself (workers.tasks.explain)."""
    from lantern.core.store import DirectoryStore, read_manifest
    from tests.worker_fixtures import settings_for
    from workers import tasks
    from workers.context import WorkerContext, set_context
    from workers.model_cache import ModelCache

    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    cache = ModelCache(torch.device("cpu"))
    set_context(WorkerContext(settings, store, cache))
    images = [shape_png(1), shape_png(2)]
    payload = parse_request(
        {
            "model": tiny_bundle.tag,
            "methods": ["gradcam", "activations", "saliency"],
            "targets": [None, None],
            "layer": "layer3",
            "compare_top": 3,
            "images": [
                {"name": f"shape{i}", "data_b64": base64.b64encode(data).decode()}
                for i, data in enumerate(images)
            ],
        }
    ).model_dump(mode="json")
    job_id = "ex-" + "d" * 32
    tasks.explain(payload, job_id=job_id)
    manifest = read_manifest(store, job_id)
    assert manifest is not None and manifest["compare_top"] == 3
    assert "rank" in manifest["compare"]
    listed = set(store.list_files(job_id))

    loaded = cache.get(tiny_bundle.tag)
    from lantern.core.images import decode_image

    batch = torch.from_numpy(
        loaded.spec.apply_batch([decode_image(d, max_pixels=settings.max_pixels) for d in images])
    )
    with torch.no_grad():
        probs = loaded.model(batch).softmax(dim=1)
    for i, image in enumerate(manifest["images"]):
        compared = image["compare"]
        order = probs[i].argsort(descending=True)[:3].tolist()
        assert [c["rank"] for c in compared] == [1, 2, 3]
        assert [c["index"] for c in compared] == order
        assert [c["label"] for c in compared] == [tiny_bundle.class_names[j] for j in order]
        for c in compared:
            assert c["probability"] == pytest.approx(float(probs[i, c["index"]]), abs=1e-6)
        assert compared[0]["index"] == image["prediction"]["index"] == image["target"]["index"]
        # class-dependent methods only: activations do not change with the class
        assert all(set(c["files"]) == {"gradcam", "saliency"} for c in compared)
        assert compared[0]["files"]["gradcam"] == image["files"]["gradcam"]
        name = image["name"]
        assert compared[2]["files"]["gradcam"]["heatmap"] == f"{name}.gradcam.rank3.heatmap.png"
        for c in compared:
            for entry in c["files"].values():
                assert {entry[k] for k in ("heatmap", "overlay", "raw", "upsampled")} <= listed
            # each rank's raw map is the map of its own class, as explained alone
            alone = explain(loaded.model, batch[i : i + 1], [GradCAM("layer3")], [c["index"]])
            raw = np.load(io.BytesIO(store.read(job_id, c["files"]["gradcam"]["raw"])))
            want = alone.results["gradcam"].maps[0].numpy()
            assert raw.dtype == np.float32 and raw.shape == want.shape == (4, 4)
            np.testing.assert_allclose(raw, want, rtol=1e-4, atol=1e-6 * float(want.max()))
        maps = [
            np.load(io.BytesIO(store.read(job_id, c["files"]["gradcam"]["raw"]))) for c in compared
        ]
        assert not np.array_equal(maps[0], maps[1])  # different classes, different maps


def test_a_job_without_compare_top_has_no_compare_fields(tiny_bundle: Any, tmp_path: Path) -> None:
    from lantern.core.store import DirectoryStore, read_manifest
    from tests.worker_fixtures import settings_for
    from workers import tasks
    from workers.context import WorkerContext, set_context
    from workers.model_cache import ModelCache

    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    set_context(WorkerContext(settings, store, ModelCache(torch.device("cpu"))))
    payload = _payload(model=tiny_bundle.tag)
    payload["images"] = [{"name": "s", "data_b64": base64.b64encode(shape_png(0)).decode()}]
    job_id = "ex-" + "e" * 32
    tasks.explain(parse_request(payload).model_dump(mode="json"), job_id=job_id)
    manifest = read_manifest(store, job_id)
    assert manifest is not None
    assert "compare_top" not in manifest and "compare" not in manifest
    assert "compare" not in manifest["images"][0]
    assert not any(".rank" in f for f in store.list_files(job_id))


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.integration
def test_compare_top_through_the_api_and_the_real_worker(stack: Stack) -> None:  # noqa: F811
    url, image = stack.url, shape_png(3)
    files = [("images", ("cat.png", image, "image/png"))]
    plain = httpx.post(f"{url}/explain", data={"methods": "gradcam"}, files=files, timeout=30)
    assert plain.status_code == 202, plain.text
    response = httpx.post(
        f"{url}/explain", data={"methods": "gradcam", "compare_top": "3"}, files=files, timeout=30
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["job_id"]
    assert job_id != plain.json()["job_id"]  # not confused with the plain request
    status = _wait_finished(url, job_id)
    assert status["status"] == "finished", status
    image_entry = status["manifest"]["images"][0]
    assert image_entry["name"] == "cat"
    compared = image_entry["compare"]
    assert [c["rank"] for c in compared] == [1, 2, 3]
    probabilities = [c["probability"] for c in compared]
    assert probabilities == sorted(probabilities, reverse=True)
    for c in compared:
        heatmap = httpx.get(url + c["urls"]["gradcam.heatmap"], timeout=10)
        assert heatmap.status_code == 200 and heatmap.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(heatmap.content)).size == (64, 64)
    # bad values are refused on both doors before anything is queued
    for path in ("/explain", "/v1/explain"):
        bad = httpx.post(
            url + path, data={"methods": "gradcam", "compare_top": "9"}, files=files, timeout=30
        )
        assert bad.status_code == 422, (path, bad.text)
        assert "compare_top must be a number of classes from 2 to 5" in bad.json()["error"]
        mixed = httpx.post(
            url + path,
            data={"methods": "gradcam", "compare_top": "2", "targets": "1"},
            files=files,
            timeout=30,
        )
        assert mixed.status_code == 422 and "targets" in mixed.json()["error"], mixed.text


@pytest.mark.integration
def test_lantern_explain_saves_every_compared_class_and_resumes(
    stack: Stack,  # noqa: F811
    tmp_path: Path,
) -> None:
    from tests.test_client import lantern

    (tmp_path / "a.png").write_bytes(shape_png(2))
    args = ("explain", "a.png", "--url", stack.url, "--methods", "gradcam,depth", "--out", "maps")
    result = lantern(*args, "--compare-top", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "maps" / "a"
    saved = json.loads((folder / "result.json").read_text())
    assert saved["request"]["compare_top"] == 2
    compared = saved["compare"]
    assert [c["rank"] for c in compared] == [1, 2]
    assert compared[0]["index"] == saved["prediction"]["index"]
    assert compared[0]["files"]["gradcam.heatmap"] == saved["files"]["gradcam.heatmap"]
    assert compared[1]["files"]["gradcam.heatmap"] == "a.gradcam.rank2.heatmap.png"
    for item in compared:
        for name in item["files"].values():
            assert (folder / name).is_file(), name
    assert [s["label"] for s in saved["depth"]] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert (folder / saved["files"]["depth.grid"]).is_file()
    again = lantern(*args, "--compare-top", "2", cwd=tmp_path)
    assert again.returncode == 0 and "(1 from an earlier run)" in again.stdout, again.stdout
    plain = lantern(*args, cwd=tmp_path)  # another request: not taken as done
    assert plain.returncode == 0 and "(0 from an earlier run)" in plain.stdout, plain.stdout
    assert "compare" not in json.loads((folder / "result.json").read_text())
    bad = lantern(*args, "--compare-top", "7", cwd=tmp_path)
    assert bad.returncode == 2
    assert "--compare-top must be a number of classes from 2 to 5, not 7" in bad.stderr


def test_each_compared_class_gets_its_own_trust_score(tiny_bundle: Any, tmp_path: Path) -> None:
    """compare_top with faithfulness: rank r's maps are scored against rank r's class."""
    from lantern.core.images import decode_image
    from lantern.core.store import DirectoryStore, read_manifest
    from tests.worker_fixtures import settings_for
    from workers import faithfulness, tasks
    from workers.context import WorkerContext, set_context
    from workers.model_cache import ModelCache

    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    cache = ModelCache(torch.device("cpu"))
    set_context(WorkerContext(settings, store, cache))
    data = shape_png(0)
    payload = _payload(model=tiny_bundle.tag, compare_top=2, faithfulness=True)
    payload["images"] = [{"name": "s", "data_b64": base64.b64encode(data).decode()}]
    job_id = "ex-" + "a" * 32
    tasks.explain(parse_request(payload).model_dump(mode="json"), job_id=job_id)
    manifest = read_manifest(store, job_id)
    assert manifest is not None
    image = manifest["images"][0]
    first, second = image["compare"]
    assert first["faithfulness"] == image["faithfulness"]  # the same maps and class
    loaded = cache.get(tiny_bundle.tag)
    x = torch.from_numpy(loaded.spec.apply_batch([decode_image(data, max_pixels=10**8)]))[0]
    up = np.load(io.BytesIO(store.read(job_id, second["files"]["gradcam"]["upsampled"])))
    want = faithfulness.score_maps(
        loaded.model,
        x,
        {"gradcam": torch.from_numpy(up)},
        second["index"],
        chunk_size=settings.explain_chunk_size,
    )["gradcam"]
    got = second["faithfulness"]["gradcam"]
    for key in ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"):
        assert got[key] == pytest.approx(want[key], abs=1e-5), key
    assert got != first["faithfulness"]["gradcam"]


def test_compare_jobs_are_not_grouped_with_plain_ones(tiny_bundle: Any, tmp_path: Path) -> None:
    """The worker explains queued jobs with the same group key in one pass; a compare_top
    job has k maps per image and method, so it never shares a plain job's pass."""
    from lantern.core.store import DirectoryStore
    from tests.worker_fixtures import settings_for
    from workers import tasks
    from workers.context import WorkerContext
    from workers.model_cache import ModelCache

    plain = _payload(model=tiny_bundle.tag)
    plain["images"] = [{"name": "s", "data_b64": base64.b64encode(shape_png(0)).decode()}]
    compare = {**plain, "compare_top": 2}
    assert tasks.group_key(plain) != tasks.group_key(compare)
    assert tasks.group_key(compare) != tasks.group_key({**compare, "compare_top": 3})
    store = DirectoryStore(tmp_path / "artifacts")
    settings = settings_for("redis://127.0.0.1:1/0", tmp_path / "artifacts")
    context = WorkerContext(settings, store, ModelCache(torch.device("cpu")))
    jobs = [("ex-" + "1" * 32, compare), ("ex-" + "2" * 32, compare)]
    assert tasks.prepare_group(jobs, context) == {}  # each runs its own pass
