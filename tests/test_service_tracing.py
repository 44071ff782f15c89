"""BentoML's OpenTelemetry middleware traces requests only when a trace exporter is set.

Each case runs the real app (`Lantern.to_asgi()`, BentoML's middleware stack included) in
a fresh interpreter, because BentoML reads its tracing configuration once per process. A
span processor added to BentoML's tracer provider sees every span the middleware starts,
exported or not; sample rate 1 makes every request recorded when it is traced at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.service_fixtures import jpeg

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from bentoml._internal.configuration.containers import BentoMLContainer
    from opentelemetry.sdk.trace import SpanProcessor
    from starlette.testclient import TestClient

    import service.service as service

    started = []

    class Started(SpanProcessor):
        def on_start(self, span, parent_context=None):
            started.append(span.name)

    BentoMLContainer.tracer_provider.get().add_span_processor(Started())
    with TestClient(service.Lantern.to_asgi()) as client:
        image = open(sys.argv[1], "rb").read()
        r = client.post("/predict", files={"image": ("a.jpg", image, "image/jpeg")})
    print(json.dumps({"status": r.status_code, "spans": started}))
    """
)


def predict_spans(tiny_bundle, tmp_path, config: str) -> dict:  # type: ignore[no-untyped-def]
    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(seed=1))
    env = {**os.environ, "LANTERN_MODEL": tiny_bundle.tag, "BENTOML_CONFIG_OPTIONS": config}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(image)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_span_is_started_per_request_without_a_trace_exporter(tiny_bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    answer = predict_spans(tiny_bundle, tmp_path, "tracing.sample_rate=1.0")
    assert answer == {"status": 200, "spans": []}


def test_requests_are_traced_when_a_trace_exporter_is_configured(tiny_bundle, tmp_path) -> None:  # type: ignore[no-untyped-def]
    answer = predict_spans(
        tiny_bundle, tmp_path, "tracing.sample_rate=1.0 tracing.exporter_type=in_memory"
    )
    assert answer["status"] == 200
    assert any("/predict" in name for name in answer["spans"]), answer["spans"]
