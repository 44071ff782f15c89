"""Schemathesis fuzzes a real `lantern serve` (with a real Redis) against its own /docs.json.

Every operation in the served document gets a fixed number of generated requests, valid
(positive) and invalid (negative), with a fixed seed; each response must be no 5xx, carry
a documented status code, headers and content type, match the documented schema, and
invalid data must be refused. Uploads are real images (good, huge, zero-sized, truncated)
as often as random bytes. Then: a server with LANTERN_API_KEYS (401 everywhere but the
probes, and the same contract with the key), Swagger UI at /docs in Chromium, and last
the first server with its Redis stopped (only the documented 503). Bounded: EXAMPLES per
operation and mode, no shrinking; about 670 cases, the module ~35 s on 2 cores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis  # the dev extra: a missing install fails here, it is never skipped
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import RedisServer, start_redis
from tests.service_fixtures import (
    Server,
    jpeg,
    png,
    png_header_only,
    start_server,
    stop_server,
    truncated,
)

pytestmark = pytest.mark.integration

EXAMPLES = 50  # per operation and generation mode
SEED = 20261201


def _negations_never_sent(response: Any, case: Any) -> bool:
    """Whether every negation of a multipart body is a field turned into an array that
    then never reached the server: multipart sends an empty array as no field at all, so
    the request on the wire only leaves out optional fields and is valid (schemathesis
    allows for the query-string and one-element cases of this, not this one)."""
    meta = getattr(case, "meta", None)
    media_type = str(getattr(case, "media_type", "") or "")
    if meta is None or not media_type.startswith("multipart/"):
        return False
    mutations = getattr(getattr(meta.phase, "data", None), "mutations", ())
    sent = getattr(response.request, "body", None) or b""
    if not mutations or not isinstance(sent, bytes):
        return False
    for mutation in mutations:
        name = str(mutation.schema_pointer or "").removeprefix("/properties/")
        if (
            mutation.keywords != ("type",)
            or mutation.new_value != "array"
            or not name
            or "/" in name
            or f'name="{name}"'.encode() in sent
        ):
            return False
    return True


def rejects_negative_data(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' negative_data_rejection, less the multipart case above."""
    if _negations_never_sent(response, case):
        return None
    return negative_data_rejection(ctx, response, case)  # type: ignore[no-any-return]


CHECKS = [
    not_a_server_error,
    rejects_negative_data,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def only_the_queue_503(ctx: Any, response: Any, case: Any) -> None:
    """With Redis gone: a 5xx must be the 503 status_code_conformance finds documented."""
    assert response.status_code < 500 or response.status_code == 503, (
        f"{case.operation.label} answered {response.status_code}"
    )


OUTAGE_CHECKS = [only_the_queue_503, *CHECKS[1:]]
assert CHECKS[0] is not_a_server_error
# A finished job in the artifact store, so the job routes also answer 200 and 404.
JOB_ID = "ex-" + "0123456789abcdef" * 2
ARTIFACT = "00-cat.gradcam.heatmap.png"
UNKNOWN_JOB = "ex-" + "f" * 32
KEY = "fuzz-key-0123456789"
OPERATIONS = {
    "POST /predict",
    "POST /predict_batch",
    "POST /explain",
    "GET /jobs/{job_id}",
    "GET /jobs/{job_id}/{name}",
    "GET /status",
    "GET /model",
    "GET /models",
    "GET /livez",
    "GET /readyz",
    "GET /metrics",
    "POST /v1/predict",
    "POST /v1/predict_batch",
    "POST /v1/explain",
    "POST /v1/job_status",
}

# Uploads: real images (valid, huge, zero-sized, truncated) as often as random bytes.
IMAGES = [
    png(),
    jpeg(),
    png((8, 8)),
    png_header_only(10_000, 10_000),  # over LANTERN_MAX_PIXELS: 413
    png_header_only(0, 5),  # 422
    truncated(png()),  # 422
    b"",
]
schemathesis.openapi.format("binary", st.one_of(st.sampled_from(IMAGES), st.binary(max_size=64)))
schemathesis.openapi.media_type("image/*", st.one_of(st.sampled_from(IMAGES), st.binary()))


def _start(tiny_bundle, tmp: Path, extra_env: dict[str, str]) -> tuple[Server, RedisServer]:  # type: ignore[no-untyped-def]
    redis = start_redis(tmp / "redis")
    artifacts = tmp / "artifacts"
    job = artifacts / JOB_ID
    job.mkdir(parents=True)
    (job / ARTIFACT).write_bytes(png((8, 8)))
    files = {"gradcam": {"heatmap": ARTIFACT}}
    (job / "manifest.json").write_text(json.dumps({"images": [{"name": "00-cat", "files": files}]}))
    env = {"REDIS_URL": redis.url, "LANTERN_ARTIFACT_DIR": str(artifacts), **extra_env}
    return start_server(tiny_bundle.tag, tmp / "serve.log", env), redis


@pytest.fixture(scope="module")
def served(
    tiny_bundle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, RedisServer]]:  # type: ignore[no-untyped-def]
    running, redis = _start(tiny_bundle, tmp_path_factory.mktemp("fuzz"), {})
    yield running, redis
    stop_server(running)
    redis.stop()


@pytest.fixture(scope="module")
def server(served: tuple[Server, RedisServer]) -> Server:
    return served[0]


@pytest.fixture(scope="module")
def keyed_server(tiny_bundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    env = {"LANTERN_API_KEYS": KEY}
    running, redis = _start(tiny_bundle, tmp_path_factory.mktemp("fuzz-keyed"), env)
    yield running
    stop_server(running)
    redis.stop()


def _fuzz(
    case_strategy: Any,
    examples: int,
    base_url: str,
    session: Any,
    stats: dict[str, int],
    headers: dict[str, str] | None,
    checks: list[Any],
) -> None:
    @seed(SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=case_strategy)
    def run(case: Any) -> None:
        stats["cases"] += 1
        response = case.call_and_validate(
            base_url=base_url, session=session, headers=headers, checks=checks, timeout=30
        )
        key = f"{case.operation.label} {response.status_code}"
        stats[key] = stats.get(key, 0) + 1

    run()


def fuzz_every_operation(
    server: Server,
    examples: int,
    headers: dict[str, str] | None = None,
    negative: bool = True,
    key: str | None = None,
    only: set[str] | None = None,
    checks: list[Any] = CHECKS,
) -> dict[str, int]:
    """Fuzz with `headers` on every request; {"<operation> <status>": count}.

    `key` fetches the document itself, when the server wants one; `only` names the
    operations to fuzz (default: all).
    """
    import requests

    schema = schemathesis.openapi.from_url(
        server.url + "/docs.json", headers={"X-API-Key": key} if key else {}
    )
    assert schema.raw_schema["info"]["title"] == "Lantern"
    session = requests.Session()
    stats: dict[str, int] = {"cases": 0}
    failures: list[str] = []
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        if only and operation.label not in only:
            continue
        raw = schema.raw_schema["paths"][operation.path][operation.method.lower()]
        runs = [(operation.as_strategy(), examples)]
        # Path parameters are free-form strings: only a query or a body can be invalid.
        query = [p for p in raw.get("parameters", []) if p["in"] == "query"]
        if negative and (query or "requestBody" in raw):
            runs.append((operation.as_strategy(generation_mode=GenerationMode.NEGATIVE), examples))
        if operation.path.startswith("/jobs/"):  # the stored job, and one of its files
            runs.append((operation.as_strategy(path_parameters={"job_id": JOB_ID}), examples))
            runs.append((operation.as_strategy(path_parameters={"job_id": UNKNOWN_JOB}), 1))
            if "{name}" in operation.path:
                known = {"job_id": JOB_ID, "name": ARTIFACT}
                runs.append((operation.as_strategy(path_parameters=known), 1))
        for strategy, n in runs:
            try:
                _fuzz(strategy, n, server.url, session, stats, headers, checks)
            except BaseException as e:  # hypothesis raises exception groups
                if isinstance(e, KeyboardInterrupt):
                    raise
                failures.append(f"{operation.label}: {e}")
    elapsed = time.monotonic() - started
    cases = stats.pop("cases")
    print(f"\nschemathesis: {cases} cases over {len(operations)} operations in {elapsed:.1f} s")
    print("\n".join(f"  {key}: {n}" for key, n in sorted(stats.items())))
    assert not failures, "\n\n".join(failures) + "\n\nserver log:\n" + server.log_text()[-3000:]
    assert {op.label for op in operations} == OPERATIONS
    return stats


@pytest.mark.timeout(240)
def test_fuzzing_finds_no_server_error_and_no_undocumented_answer(server: Server) -> None:
    started = time.monotonic()
    stats = fuzz_every_operation(server, EXAMPLES)
    answered = {key.rsplit(" ", 1)[1] for key in stats}
    assert {"200", "202", "400", "404", "413", "415", "422"} <= answered
    assert sum(stats.values()) >= 300
    assert time.monotonic() - started < 120


@pytest.mark.timeout(180)
def test_with_api_keys_set_every_protected_route_answers_the_documented_401(
    keyed_server: Server,
) -> None:
    import httpx

    assert httpx.get(keyed_server.url + "/docs.json", timeout=10).status_code == 401
    wrong = {"X-API-Key": "wrong"}
    stats = fuzz_every_operation(keyed_server, 10, headers=wrong, negative=False, key=KEY)
    assert {key for key in stats if not key.endswith(" 401")} == {
        "GET /livez 200",
        "GET /readyz 200",
    }
    # With the key, the same document holds.
    right = {"X-API-Key": KEY}
    stats = fuzz_every_operation(keyed_server, 10, headers=right, negative=False, key=KEY)
    assert not any(key.endswith(" 401") for key in stats)


def test_the_served_document_is_the_one_built_from_the_app(server: Server) -> None:
    import httpx

    from service.api import app
    from service.openapi import build_document

    served = httpx.get(server.url + "/docs.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(build_document(app)))
    docs_page = httpx.get(server.url + "/docs", timeout=10)
    assert docs_page.status_code == 200 and "swagger-ui" in docs_page.text
    assert httpx.get(server.url + "/static_content/swagger-ui-bundle.js", timeout=10).is_success


def _swagger(url: str, key: str | None = None) -> tuple[str, set[str], int, list[str]]:
    """(title, operations shown, prompts answered, page errors) of /docs in Chromium;
    `key` answers the page's prompt for an API key."""
    from playwright.sync_api import sync_playwright

    from tests.test_page import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: install Debian's package (README)")
    prompts: list[str] = []

    def answer(dialog: Any) -> None:
        prompts.append(dialog.message)
        dialog.accept(key or "")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", answer)
            page.goto(url + "/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            title = page.inner_text(".info .title")
            shown = set(
                page.eval_on_selector_all(
                    ".opblock",
                    "blocks => blocks.map(b => b.querySelector('.opblock-summary-method')"
                    ".innerText + ' ' + b.querySelector('.opblock-summary-path')"
                    ".getAttribute('data-path'))",
                )
            )
            errors += [e.inner_text() for e in page.query_selector_all(".errors-wrapper")]
        finally:
            browser.close()
    return title, shown, len(prompts), errors


@pytest.mark.browser
def test_swagger_ui_at_docs_renders_every_operation(server: Server) -> None:
    """/docs in Debian's Chromium: Swagger UI reads /docs.json and lists every operation."""
    title, shown, prompts, errors = _swagger(server.url)
    assert title.startswith("Lantern") and "0.1.0" in title.replace("\n", " ")
    assert shown == OPERATIONS
    assert prompts == 0 and not errors


@pytest.mark.browser
def test_swagger_ui_asks_for_the_api_key_once_when_keys_are_set(keyed_server: Server) -> None:
    title, shown, prompts, errors = _swagger(keyed_server.url, key=KEY)
    assert title.startswith("Lantern")
    assert shown == OPERATIONS
    assert prompts == 1 and not errors


@pytest.fixture
def outage(tiny_bundle, tmp_path: Path) -> Iterator[tuple[Server, RedisServer]]:  # type: ignore[no-untyped-def]
    """A server and Redis of this test's own: the test stops the Redis."""
    running, redis = _start(tiny_bundle, tmp_path, {})
    yield running, redis
    stop_server(running)
    redis.stop()


@pytest.mark.timeout(180)
def test_with_redis_gone_the_explanation_routes_answer_the_documented_503(
    outage: tuple[Server, RedisServer],
) -> None:
    import httpx

    server, redis = outage
    redis.stop()
    down = httpx.post(server.url + "/explain", files={"images": ("a.png", png())}, timeout=30)
    assert down.status_code == 503 and down.headers["retry-after"].isdigit()
    assert set(down.json()) == {"error"}
    jobs = {"POST /explain", "GET /jobs/{job_id}", "GET /jobs/{job_id}/{name}"}
    stats = fuzz_every_operation(server, 10, only=jobs | {"POST /predict"}, checks=OUTAGE_CHECKS)
    # (Few generated /explain requests get as far as the queue; the one above did.)
    assert "GET /jobs/{job_id} 503" in stats
    assert "GET /jobs/{job_id} 200" in stats  # the finished job, from its manifest
    assert "POST /predict 200" in stats  # predictions do not need Redis


def test_only_negations_that_never_reached_the_server_are_let_through() -> None:
    """The exemption in rejects_negative_data, on hand-made cases: a field mutated into an
    array that is absent from the multipart body sent is exempt; one that was sent, a
    mutation of another kind, or a JSON body is not."""
    from types import SimpleNamespace as NS

    def case(media_type: str, *mutations: Any) -> Any:
        return NS(media_type=media_type, meta=NS(phase=NS(data=NS(mutations=mutations))))

    def sent(body: bytes) -> Any:
        return NS(request=NS(body=body))

    to_array = NS(keywords=("type",), new_value="array", schema_pointer="/properties/force")
    to_int = NS(keywords=("type",), new_value="integer", schema_pointer="/properties/force")
    images_only = b'--b\r\nContent-Disposition: form-data; name="images"\r\n\r\nx\r\n--b--\r\n'
    with_force = images_only + b'Content-Disposition: form-data; name="force"\r\n\r\n1'
    multipart = "multipart/form-data"
    assert _negations_never_sent(sent(images_only), case(multipart, to_array))
    assert not _negations_never_sent(sent(with_force), case(multipart, to_array))
    assert not _negations_never_sent(sent(images_only), case(multipart, to_array, to_int))
    assert not _negations_never_sent(sent(images_only), case("application/json", to_array))
    assert not _negations_never_sent(sent(images_only), case(multipart))
