"""BentoML's OpenTelemetry middleware traces requests only when a trace exporter is set.

Without an exporter nothing leaves the server, so whether a span was started at all can
only be seen inside: that case runs the real app (`Lantern.to_asgi()`, BentoML's middleware
stack included) in a fresh interpreter, because BentoML reads its tracing configuration
once per process, with a span processor of its own on BentoML's tracer provider, which sees
every span the middleware starts, exported or not. With the README's OTLP configuration a
real `lantern serve` exports its spans over loopback to a real OTLP/HTTP receiver.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.service_fixtures import jpeg, start_server, stop_server
from tests.worker_fixtures import wait_for

ROOT = Path(__file__).resolve().parent.parent

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


def readme_tracing_options(collector_url: str) -> str:
    """The README's BENTOML_CONFIG_OPTIONS example, its endpoint pointed at `collector_url`
    and every request sampled (the README samples a tenth)."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    match = re.search(r'BENTOML_CONFIG_OPTIONS="(tracing\.exporter_type=otlp[^"]*)"', text)
    assert match, "README: the tracing example is gone"
    options = match.group(1)
    assert "tracing.otlp.endpoint=http://collector:4318/v1/traces" in options, options
    options = options.replace("http://collector:4318/v1/traces", collector_url)
    return re.sub(r"tracing\.sample_rate=[0-9.]+", "tracing.sample_rate=1.0", options)


@dataclass
class ReceivedSpan:
    service: str  # the resource's service.name
    name: str
    attributes: dict[str, Any]


class OtlpCollector:
    """An OTLP/HTTP trace receiver on loopback: what an OpenTelemetry collector is to the
    server. Decodes each export request (protobuf, as the OTLP exporter sends it)."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[ReceivedSpan] = []
        self.paths: list[str] = []
        received, paths = self.spans, self.paths

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                paths.append(self.path)
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    resource = attributes(resource_spans.resource.attributes)
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            received.append(
                                ReceivedSpan(
                                    str(resource.get("service.name")),
                                    span.name,
                                    attributes(span.attributes),
                                )
                            )
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValue pairs as a dict of plain values."""
    found: dict[str, Any] = {}
    for pair in pairs:
        kind = pair.value.WhichOneof("value")
        found[pair.key] = getattr(pair.value, kind) if kind else None
    return found


def for_the_service(options: str) -> str:
    """The same settings for the `lantern` service only: `services.lantern.tracing....`."""
    return " ".join(f"services.lantern.{option}" for option in options.split())


@pytest.mark.parametrize("scope", ["every service", "the lantern service"])
def test_a_real_server_exports_its_prediction_spans_to_the_collector_the_readme_names(
    tiny_bundle: Any, tmp_path: Path, scope: str
) -> None:
    # Configured for every service (the README's example), BentoML itself used to drop the
    # exporter when it started the service, and for the service alone, Lantern excluded
    # every URL from tracing: both exported nothing (service.gateway.tracing_config).
    collector = OtlpCollector()
    options = readme_tracing_options(collector.url)
    if scope == "the lantern service":
        options = for_the_service(options)
    server = start_server(
        tiny_bundle.tag, tmp_path / "serve.log", {"BENTOML_CONFIG_OPTIONS": options}
    )
    try:
        r = httpx.post(
            server.url + "/predict",
            files={"image": ("a.jpg", jpeg(seed=1), "image/jpeg")},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        # The exporter sends in batches, every few seconds (BatchSpanProcessor).
        wait_for(
            lambda: any("/predict" in span.name for span in collector.spans),
            60,
            "the /predict spans at the collector",
        )
    finally:
        stop_server(server)
        collector.close()
    assert set(collector.paths) == {"/v1/traces"}
    predict = [span for span in collector.spans if "/predict" in span.name]
    assert {span.service for span in predict} == {"lantern"}, predict
    statuses = {
        span.attributes.get("http.status_code", span.attributes.get("http.response.status_code"))
        for span in predict
    }
    assert 200 in statuses, predict
