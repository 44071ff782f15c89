"""The OpenVINO runtime (LANTERN_RUNTIME=openvino): a real `lantern serve` answers what ONNX
Runtime answers on the same fp32 graph, concurrent requests (several model streams) each get
their own image's answer, the startup log and /metrics name the runtime; fp32 is computed in
f32; what it cannot do (fp16, CUDA, no `openvino` package) is refused in one line; and the
service still never loads torch. (INT8 through OpenVINO: tests/test_int8.py.)

Nothing here times anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from lantern.core.bundle import Bundle
from lantern.core.errors import UsageError
from lantern.core.images import decode_image
from lantern.core.openvino_runtime import PROVIDER, OpenVINOModel
from service import classifier
from tests.service_fixtures import Server, png, start_server, stop_server

STREAMS = 2  # OpenVINO compiles no more streams than there are cores
IMAGES = [png((96, 72), seed=i) for i in range(8)]


def onnx_runtime_probabilities(bundle: Bundle, images: list[bytes]) -> np.ndarray:
    """What the default runtime answers: ONNX Runtime on the bundle's fp32 graph."""
    x = bundle.preprocess.apply_batch([decode_image(d, max_pixels=10**8) for d in images])
    session = classifier.create_session(bundle.onnx_path, provider="cpu", threads=1)
    return classifier.softmax(classifier.run(session, x))


@pytest.fixture(scope="module")
def openvino_server(
    tiny_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    server = start_server(
        tiny_bundle.tag,
        tmp_path_factory.mktemp("serve-openvino") / "serve.log",
        {"LANTERN_RUNTIME": "openvino", "LANTERN_MODEL_STREAMS": str(STREAMS)},
    )
    yield server
    stop_server(server)


def predict(client: httpx.Client, data: bytes, name: str) -> dict[str, object]:
    r = client.post("/predict?top_k=4", files={"image": (name, data, "image/png")})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def assert_answers(body: dict[str, object], expected: np.ndarray, name: str) -> None:
    """Same top-1 class, and every class's probability within 1e-4 of ONNX Runtime's (f32
    kernels differ in rounding only; bf16 would be off by far more)."""
    ranked = body["top_k"]
    assert isinstance(ranked, list) and len(ranked) == len(expected), name
    for entry in ranked:
        index = entry["class_index"]
        assert entry["probability"] == pytest.approx(float(expected[index]), abs=1e-4), name
    assert body["class_index"] == int(np.argmax(expected)), name


@pytest.mark.integration
def test_serve_with_openvino_answers_as_onnx_runtime_does_and_says_so(
    openvino_server: Server, tiny_bundle: Bundle
) -> None:
    expected = onnx_runtime_probabilities(tiny_bundle, IMAGES)
    with httpx.Client(base_url=openvino_server.url, timeout=60) as client:
        for i, (data, probs) in enumerate(zip(IMAGES, expected, strict=True)):
            body = predict(client, data, f"{i}.png")
            assert_answers(body, probs, f"image {i}")
            assert body["precision"] == "fp32" and body["model_version"] == tiny_bundle.version
        metrics = client.get("/metrics").text
    log = openvino_server.log_text()
    assert f"loaded on {PROVIDER} (runtime openvino), precision fp32" in log
    # the model streams run on one OpenVINO model compiled with that many one-thread streams
    assert f"{STREAMS} model stream(s)" in log
    assert f"compiled for the CPU: {STREAMS} stream(s), {STREAMS} thread(s)" in log
    info = [line for line in metrics.splitlines() if line.startswith("lantern_model_info{")]
    assert len(info) == 1 and 'runtime="openvino"' in info[0] and 'precision="fp32"' in info[0]


@pytest.mark.integration
def test_concurrent_requests_each_get_their_own_images_answer(
    openvino_server: Server, tiny_bundle: Bundle
) -> None:
    expected = onnx_runtime_probabilities(tiny_bundle, IMAGES)
    threads, per_thread = 16, 4
    answers: dict[tuple[int, int], dict[str, object]] = {}
    failures: list[BaseException] = []
    start = threading.Barrier(threads)

    def client_thread(t: int) -> None:
        try:
            with httpx.Client(base_url=openvino_server.url, timeout=120) as client:
                start.wait()  # all at once, so that batches and streams overlap
                for j in range(per_thread):
                    image = (t + j) % len(IMAGES)
                    answers[(t, j)] = predict(client, IMAGES[image], f"{image}.png")
        except BaseException as e:  # reported below, with the thread's answers
            failures.append(e)

    workers = [threading.Thread(target=client_thread, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
    assert not failures, failures
    assert len(answers) == threads * per_thread
    for (t, j), body in answers.items():
        image = (t + j) % len(IMAGES)
        assert_answers(body, expected[image], f"thread {t} request {j} (image {image})")


def test_fp32_is_computed_in_f32_and_streams_are_one_thread_each(tiny_bundle: Bundle) -> None:
    # OpenVINO's default on CPUs with AMX or AVX512-BF16 would be bf16.
    single = OpenVINOModel(tiny_bundle.onnx_path, threads=1)
    assert (single.inference_precision, single.streams, single.threads) == ("f32", 1, 1)
    streams = OpenVINOModel(tiny_bundle.onnx_path, threads=1, streams=STREAMS)
    assert (streams.inference_precision, streams.streams, streams.threads) == (
        "f32",
        STREAMS,
        STREAMS,
    )
    assert streams.get_providers() == [PROVIDER]
    assert [i.name for i in streams.get_inputs()] == ["input"]


def test_concurrent_runs_on_one_model_each_get_their_own_batch_answer(
    tiny_bundle: Bundle,
) -> None:
    model = OpenVINOModel(tiny_bundle.onnx_path, threads=1, streams=STREAMS)
    rng = np.random.default_rng(0)
    size = tiny_bundle.preprocess.crop_size
    batches = [rng.standard_normal((1 + i % 3, 3, size, size), np.float32) for i in range(12)]
    alone = [classifier.run(model, b) for b in batches]  # one at a time
    together: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(batches))

    def call(i: int) -> None:
        start.wait()
        together[i] = classifier.run(model, batches[i])

    workers = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert sorted(together) == list(range(len(batches)))
    for i, logits in together.items():
        assert logits.shape == (batches[i].shape[0], len(tiny_bundle.class_names))
        np.testing.assert_allclose(logits, alone[i], rtol=1e-5, atol=1e-5)


def test_what_openvino_cannot_do_is_refused_in_one_line(tiny_bundle: Bundle) -> None:
    with pytest.raises(UsageError) as fp16:
        classifier.open_model(tiny_bundle, precision="fp16", runtime="openvino")
    assert str(fp16.value).startswith("LANTERN_PRECISION=fp16 selects the CUDA graph but ")
    with pytest.raises(UsageError) as cuda:
        classifier.open_model(tiny_bundle, provider="cuda", runtime="openvino")
    assert str(cuda.value).startswith("LANTERN_ORT_PROVIDER=cuda but LANTERN_RUNTIME=openvino ")
    for refusal in (fp16.value, cuda.value):
        assert "\n" not in str(refusal) and "LANTERN_RUNTIME=onnxruntime" in str(refusal)


def test_without_the_openvino_package_serve_refuses_in_one_line(
    tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service itself (e.g. started by `bentoml serve` directly) refuses too.
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` -> ImportError
    with pytest.raises(UsageError, match=r"pip install 'lantern\[openvino\]'"):
        classifier.open_model(tiny_bundle, runtime="openvino")
    monkeypatch.undo()
    # `lantern serve`, in an interpreter where openvino cannot be imported.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.modules['openvino'] = None; from lantern.cli import main; "
            "sys.exit(main(['serve', '--port', '1']))",
        ],
        env={**os.environ, "LANTERN_MODEL": tiny_bundle.tag, "LANTERN_RUNTIME": "openvino"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "lantern serve: error: LANTERN_RUNTIME=openvino but the openvino package is not "
        "installed: pip install 'lantern[openvino]' (or set LANTERN_RUNTIME=onnxruntime)"
    ]


def test_the_openvino_runtime_never_loads_torch(tiny_bundle: Bundle) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "from service import classifier\n"
        "from lantern.core.openvino_runtime import OpenVINOModel\n"
        f"model = OpenVINOModel(Path({str(tiny_bundle.onnx_path)!r}), threads=1)\n"
        f"size = {tiny_bundle.preprocess.crop_size}\n"
        "classifier.run(model, np.zeros((1, 3, size, size), np.float32))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
