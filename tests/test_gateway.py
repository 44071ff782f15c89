"""Unit tests of service.gateway (route templates, key checks) and lantern.core.job_metrics
(histogram counters in a real redis-server, Prometheus text, Redis down)."""

from __future__ import annotations

import pytest

from lantern.core.job_metrics import (
    ExplainMetrics,
    read_explain_metrics,
    record_job,
    render,
)
from lantern.core.settings import Settings
from service.gateway import is_public, key_matches, presented_key, route_template


@pytest.mark.parametrize(
    "path,template",
    [
        ("/predict", "/predict"),
        ("/predict_batch", "/predict_batch"),
        ("/explain", "/explain"),
        ("/status", "/status"),
        ("/jobs/ex-0123456789abcdef0123456789abcdef", "/jobs/{job_id}"),
        ("/jobs/ex-0123/00-cat.gradcam.overlay.png", "/jobs/{job_id}/{name}"),
        ("/jobs/ex-0123/inputs/00-cat", "/jobs/{job_id}/{name}"),
        ("/static/app.js", "/static/{name}"),
        ("/", "/"),
        ("/docs", "/docs"),
        ("/docs.json", "/docs.json"),
        ("/metrics", "/metrics"),
        ("/livez", "/livez"),
        ("/readyz", "/readyz"),
        ("/jobs/", "other"),
        ("/wp-admin/setup.php", "other"),
        ("/predict/extra", "other"),
    ],
)
def test_every_path_maps_to_its_route_template_or_other(path: str, template: str) -> None:
    assert route_template(path) == template


def test_the_key_comes_from_bearer_or_x_api_key() -> None:
    assert presented_key([(b"authorization", b"Bearer k1")]) == b"k1"
    assert presented_key([(b"Authorization", b"bearer  k2 ")]) == b"k2"
    assert presented_key([(b"x-api-key", b"k3")]) == b"k3"
    assert presented_key([(b"authorization", b"Basic k1")]) is None
    assert presented_key([(b"authorization", b"Bearer ")]) is None
    assert presented_key([]) is None


def test_keys_are_compared_against_every_configured_key() -> None:
    keys = [b"alpha", b"beta"]
    assert key_matches(b"alpha", keys) and key_matches(b"beta", keys)
    assert not key_matches(b"alph", keys) and not key_matches(b"", keys)
    assert not key_matches(b"alpha", [])


def test_only_probes_and_the_page_shell_are_public() -> None:
    for path in ("/livez", "/readyz", "/", "/static/app.js", "/static_content/swagger-ui.css"):
        assert is_public(path, metrics_public=False)
    for path in ("/predict", "/jobs/x", "/docs.json", "/status", "/healthz", "/metrics"):
        assert not is_public(path, metrics_public=False)
    assert is_public("/metrics", metrics_public=True)


def test_api_keys_are_a_secret_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANTERN_API_KEYS", " one, two ,,")
    settings = Settings()
    assert settings.api_key_list() == ["one", "two"]
    assert "one" not in repr(settings) and "one" not in str(settings.model_dump())
    monkeypatch.setenv("LANTERN_API_KEYS", "")
    assert Settings().api_key_list() == []


def test_job_histograms_accumulate_in_redis(redis_conn) -> None:  # type: ignore[no-untyped-def]
    record_job(redis_conn, 0.3, 3, "finished")  # 0.1 s per image
    record_job(redis_conn, 4.0, 1, "finished")
    record_job(redis_conn, 5000.0, 2, "failed")
    record_job(redis_conn, 1.0, 2, "retried")
    with pytest.raises(ValueError):
        record_job(redis_conn, 1.0, 1, "lost")
    m = read_explain_metrics(redis_conn, Settings(queue="q-metrics"))
    assert m.available and m.outcomes == {"finished": 2, "failed": 1, "retried": 1}
    text = render(m)
    lines = set(text.splitlines())
    assert 'lantern_explain_job_duration_seconds_bucket{le="0.5"} 1' in lines
    assert 'lantern_explain_job_duration_seconds_bucket{le="1.0"} 2' in lines
    assert 'lantern_explain_job_duration_seconds_bucket{le="5.0"} 3' in lines
    assert 'lantern_explain_job_duration_seconds_bucket{le="1800.0"} 3' in lines
    assert 'lantern_explain_job_duration_seconds_bucket{le="+Inf"} 4' in lines
    assert "lantern_explain_job_duration_seconds_count 4" in lines
    assert "lantern_explain_job_duration_seconds_sum 5005.3" in lines
    # per image: finished jobs only, one observation per image
    assert 'lantern_explain_image_seconds_bucket{le="0.1"} 3' in lines
    assert 'lantern_explain_image_seconds_bucket{le="5.0"} 4' in lines
    assert "lantern_explain_image_seconds_count 4" in lines
    assert 'lantern_explain_job_outcomes_total{outcome="failed"} 1' in lines
    assert "lantern_explanations_available 1" in lines
    assert 'lantern_explain_jobs{status="queued"} 0' in lines
    assert "lantern_explain_workers 0" in lines


def test_an_untimed_attempt_counts_its_outcome_and_no_duration(redis_conn) -> None:  # type: ignore[no-untyped-def]
    # An abandoned attempt (workers.worker._count_abandoned): nobody timed it.
    record_job(redis_conn, 2.0, 1, "finished")
    record_job(redis_conn, None, 4, "retried")
    record_job(redis_conn, None, 4, "failed")
    m = read_explain_metrics(redis_conn, Settings(queue="q-untimed"))
    assert m.outcomes == {"finished": 1, "retried": 1, "failed": 1}
    lines = set(render(m).splitlines())
    assert "lantern_explain_job_duration_seconds_count 1" in lines
    assert "lantern_explain_job_duration_seconds_sum 2.0" in lines
    assert "lantern_explain_image_seconds_count 1" in lines


def test_record_job_never_fails_a_job_when_redis_is_down() -> None:
    import redis

    down = redis.Redis(port=1, socket_connect_timeout=0.2)
    record_job(down, 1.0, 1, "finished")  # no exception
    m = read_explain_metrics(down, Settings())
    assert not m.available and m.reason and "Redis" in m.reason
    assert render(m).splitlines()[-1] == "lantern_explanations_available 0"
    assert render(ExplainMetrics(available=False)).count("\n") == 3
