"""The compose deployment: valid against the compose specification (no Docker engine runs
here), and running exactly the commands `make up` runs."""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lantern import stack

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _compose_spec_schema() -> dict[str, Any]:
    vendored = resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    return json.loads(vendored.read_text())  # type: ignore[no-any-return]


def test_compose_file_is_valid_against_the_compose_specification(compose) -> None:  # type: ignore[no-untyped-def]
    schema = _compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_would_catch_a_broken_compose_file(compose) -> None:  # type: ignore[no-untyped-def]
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "when_it_feels_like_it"
    broken["services"]["worker"]["deploy"]["resources"]["reservations"]["gpus"] = "many"
    schema = _compose_spec_schema()
    assert list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))


def _lantern_args(service: dict[str, Any]) -> list[str]:
    command = service["command"]
    assert command[0] == "lantern", command
    return list(command[1:])


def test_every_service_runs_the_commands_make_up_runs(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]
    assert _lantern_args(services["model"]) == list(stack.MODEL_COMMAND)
    assert _lantern_args(services["worker"]) == list(stack.WORKER_COMMAND)
    api = _lantern_args(services["api"])
    assert api[: len(stack.API_COMMAND)] == list(stack.API_COMMAND)
    assert api[len(stack.API_COMMAND) :] == ["--host", "0.0.0.0", "--port", "3000"]
    # and the Dockerfile's defaults are the same commands
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmds = re.findall(r"^CMD (\[.*\])$", dockerfile, flags=re.M)
    assert [json.loads(c)[1:] for c in cmds] == [api, list(stack.WORKER_COMMAND)]


def test_redis_is_persistent_password_protected_and_health_checked(compose) -> None:  # type: ignore[no-untyped-def]
    redis = compose["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass ${REDIS_PASSWORD:?" in command
    assert redis["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert any(v.endswith(":/data") for v in redis["volumes"])
    # clients get the password from the environment, never from the file
    url = compose["x-lantern-env"]["REDIS_URL"]
    assert url.startswith("redis://:${REDIS_PASSWORD:?") and url.endswith("@redis:6379/0")


def test_workers_scale_and_reserve_a_gpu(compose) -> None:  # type: ignore[no-untyped-def]
    worker = compose["services"]["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


def test_services_wait_for_healthy_dependencies_and_share_volumes(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"] == {"condition": "service_healthy"}
        assert deps["model"] == {"condition": "service_completed_successfully"}
        volumes = services[name]["volumes"]
        assert "models:/data/bentoml:ro" in volumes and "artifacts:/data/artifacts" in volumes
    assert "models:/data/bentoml" in services["model"]["volumes"]
    assert services["api"]["healthcheck"]["test"][-1].endswith("/readyz').status != 200)")
    assert set(compose["volumes"]) >= {"redis-data", "models", "artifacts"}


def test_no_service_phones_home(compose) -> None:  # type: ignore[no-untyped-def]
    for name in ("model", "worker", "api"):
        env = compose["services"][name]["environment"]
        assert env["BENTOML_DO_NOT_TRACK"] == "true", name


def test_the_api_bento_carries_the_core_dependencies_and_no_torch() -> None:
    import tomllib

    bentofile = yaml.safe_load((ROOT / "bentofile.yaml").read_text())
    core = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    packages = bentofile["python"]["packages"]
    assert packages == core
    assert not any(p.startswith(("torch", "torchvision")) for p in packages)
    assert bentofile["python"]["lock_packages"] is False
    assert bentofile["service"] == "service.service:Lantern"
    assert bentofile["docker"]["base_image"].startswith("nvidia/cuda:13.")
    assert (ROOT / bentofile["docker"]["dockerfile_template"]).exists()
    # the API image carries the service and the torch-free core, nothing of models/ or
    # workers/ (tests/test_layers.py proves the service imports nothing else)
    assert {"service/**/*.py", "lantern/**/*.py"} <= set(bentofile["include"])
    assert not [p for p in bentofile["include"] if p.startswith(("models/", "workers/"))]


def test_readme_settings_table_lists_every_setting() -> None:
    from lantern.commands.settings import markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text()
