"""The compose files and images, read statically: valid against the compose specification,
resolved by Compose v2 itself (`docker-compose config`, no engine needed), running exactly the
commands `make up` runs. deploy/compose_e2e.py (`make compose-test`, run by CI) runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata, resources
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


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.gpu.yml"])
def test_compose_files_are_valid_against_the_compose_specification(name: str) -> None:
    schema = _compose_spec_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    document = yaml.safe_load((ROOT / name).read_text())
    errors = sorted(validator.iter_errors(document), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_would_catch_a_broken_compose_file(compose) -> None:  # type: ignore[no-untyped-def]
    broken = json.loads(json.dumps(compose))
    broken["services"]["api"]["depends_on"]["redis"]["condition"] = "when_it_feels_like_it"
    broken["services"]["worker"]["deploy"] = {"resources": {"reservations": {"gpus": "many"}}}
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


def resolved(*files: str, **env: str) -> dict[str, Any]:
    """The project as Compose v2 itself resolves it (merges, extends, variables)."""
    compose_bin = Path(sys.executable).parent / "docker-compose"
    args = [str(compose_bin)]
    for name in files:
        args += ["-f", name]
    environment = {
        k: v for k, v in os.environ.items() if not k.startswith(("LANTERN_", "COMPOSE_"))
    }
    environment.update({"REDIS_PASSWORD": "test-password", **env})
    out = subprocess.run(
        [*args, "config", "--format", "json"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def _devices(service: dict[str, Any]) -> list[dict[str, Any]] | None:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")


def test_the_default_stack_reserves_no_device_so_it_starts_on_a_cpu_host() -> None:
    services = resolved("docker-compose.yml")["services"]
    assert set(services) == {"redis", "model", "worker", "api"}
    assert not [name for name, service in services.items() if _devices(service)]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # --scale worker=N works


def test_the_gpu_file_gives_workers_and_the_model_step_one_pinned_gpu_and_the_api_none() -> None:
    services = resolved("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    for name in ("worker", "model"):
        assert _devices(services[name]) == [
            {"driver": "nvidia", "device_ids": ["0"], "capabilities": ["gpu"]}
        ], name
    assert services["worker"]["environment"]["LANTERN_DEVICE"] == "cuda"
    assert _devices(services["api"]) is None and _devices(services["redis"]) is None
    moved = resolved("docker-compose.yml", "docker-compose.gpu.yml", LANTERN_WORKER_GPU="3")
    assert _devices(moved["services"]["worker"])[0]["device_ids"] == ["3"]  # type: ignore[index]


def test_the_api_is_published_on_the_hosts_loopback_unless_told_otherwise() -> None:
    (port,) = resolved("docker-compose.yml")["services"]["api"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("127.0.0.1", "3000", 3000)
    moved = resolved("docker-compose.yml", LANTERN_PUBLISH_ADDRESS="0.0.0.0", LANTERN_PORT="8080")
    (port,) = moved["services"]["api"]["ports"]
    assert (port["host_ip"], port["published"], port["target"]) == ("0.0.0.0", "8080", 3000)
    # Nothing else is reachable from outside the compose network.
    others = resolved("docker-compose.yml")["services"]
    assert [name for name, service in others.items() if service.get("ports")] == ["api"]


def test_api_keys_and_metrics_access_reach_every_lantern_service_from_the_host_env() -> None:
    closed = resolved("docker-compose.yml")["services"]
    opened = resolved(
        "docker-compose.yml", LANTERN_API_KEYS="k1,k2", LANTERN_METRICS_PUBLIC="true"
    )["services"]
    for name in ("api", "worker", "model"):
        assert closed[name]["environment"]["LANTERN_API_KEYS"] == "", name
        assert closed[name]["environment"]["LANTERN_METRICS_PUBLIC"] == "false", name
        assert opened[name]["environment"]["LANTERN_API_KEYS"] == "k1,k2", name
        assert opened[name]["environment"]["LANTERN_METRICS_PUBLIC"] == "true", name


def test_redis_fsyncs_as_lantern_redis_appendfsync_says() -> None:
    def appendfsync(**env: str) -> str:
        command = resolved("docker-compose.yml", **env)["services"]["redis"]["command"]
        return str(command[command.index("--appendfsync") + 1])

    assert appendfsync() == "everysec"
    assert appendfsync(LANTERN_REDIS_APPENDFSYNC="always") == "always"


def test_gpu_workers_puts_one_complete_worker_on_each_gpu(tmp_path: Path) -> None:
    override = tmp_path / "docker-compose.gpus.yml"
    generated = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "gpu_workers.py"), "4"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # `extends: {file: docker-compose.yml}` is resolved next to the main file
    override.write_text(generated.stdout)
    (tmp_path / "docker-compose.yml").symlink_to(ROOT / "docker-compose.yml")
    services = resolved("docker-compose.yml", "docker-compose.gpu.yml", str(override))["services"]
    workers = {n: s for n, s in services.items() if n == "worker" or n.startswith("worker-gpu")}
    assert sorted(workers) == ["worker", "worker-gpu1", "worker-gpu2", "worker-gpu3"]
    gpus = sorted(_devices(s)[0]["device_ids"][0] for s in workers.values())  # type: ignore[index]
    assert gpus == ["0", "1", "2", "3"]
    for name, worker in workers.items():
        # each is the whole worker: the same image, command, health check and dependencies
        assert worker["command"] == services["worker"]["command"], name
        assert worker["image"] == services["worker"]["image"], name
        assert worker["healthcheck"]["test"] == ["CMD", "lantern", "worker", "--check"], name
        assert set(worker["depends_on"]) == {"redis", "model"}, name
        assert worker["environment"]["REDIS_URL"] == services["worker"]["environment"]["REDIS_URL"]
    script = str(ROOT / "deploy" / "gpu_workers.py")
    bad = subprocess.run([sys.executable, script, "one"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr


def test_services_wait_for_healthy_dependencies_and_share_volumes(compose) -> None:  # type: ignore[no-untyped-def]
    services = compose["services"]
    for name in ("api", "worker"):
        deps = services[name]["depends_on"]
        assert deps["redis"] == {"condition": "service_healthy"}
        assert deps["model"] == {"condition": "service_completed_successfully"}
        volumes = services[name]["volumes"]
        assert "models:/data/bentoml:ro" in volumes and "artifacts:/data/artifacts" in volumes
    assert "models:/data/bentoml" in services["model"]["volumes"]
    assert "runs:/app/runs" in services["model"]["volumes"]  # the model step's report survives
    assert services["api"]["healthcheck"]["test"][-1].endswith("/readyz').status != 200)")
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "lantern", "worker", "--check"]
    assert set(compose["volumes"]) >= {"redis-data", "models", "artifacts", "runs"}


def test_base_and_redis_images_are_variables_with_todays_defaults() -> None:
    services = resolved("docker-compose.yml")["services"]
    assert services["redis"]["image"] == "redis:7.4-alpine"
    assert services["api"]["build"]["args"] == {"LANTERN_BASE_IMAGE": "debian:bookworm-slim"}
    local = resolved(
        "docker-compose.yml",
        LANTERN_BASE_IMAGE="mirror.example/debian:bookworm",
        LANTERN_REDIS_IMAGE="mirror.example/redis:7",
    )["services"]
    assert local["redis"]["image"] == "mirror.example/redis:7"
    for name in ("api", "worker", "model"):
        assert (
            local[name]["build"]["args"]["LANTERN_BASE_IMAGE"] == "mirror.example/debian:bookworm"
        )
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG LANTERN_BASE_IMAGE=debian:bookworm-slim" in dockerfile


def test_images_run_as_an_unprivileged_user_and_need_no_registry_frontend() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    # A `# syntax=` line makes BuildKit fetch its frontend from a registry.
    assert not re.search(r"^#\s*syntax\s*=", dockerfile, flags=re.M | re.I)
    stages = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    finals = {s.split()[2]: s for s in stages if s.split()[2] in ("api", "worker")}
    assert set(finals) == {"api", "worker"}
    for name, stage in finals.items():
        users = re.findall(r"^USER (\S+)$", stage, flags=re.M)
        assert users == ["lantern"], name
        assert "HEALTHCHECK" in stage, name
        # the versions the tests ran
        assert "-c constraints.txt" in stage or "-c constraints.txt" in dockerfile, name


def test_the_build_context_is_only_code_and_pins() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"  # everything is out unless let back in
    let_in = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    assert let_in == {
        "constraints.txt", "pyproject.toml", "README.md", "deploy/requirements.py",
        "lantern", "models", "service", "workers",
    }  # fmt: skip
    # and everything the Dockerfile copies is let in
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.M)
    for sources in copied:
        for source in sources.split():
            assert source.rstrip("/") in let_in, source


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_declared_dependency() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += [d for d in extra if not d.startswith("lantern[")]
    pins = _pins()
    for requirement in declared:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", requirement)[0]).lower()
        assert name in pins, f"{requirement} has no pin in constraints.txt (make lock)"


def test_this_environment_runs_the_pinned_versions() -> None:
    """What the tests run is what the images install: every pinned package that is installed
    here has the pinned version (make install installs with -c constraints.txt)."""
    drift = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue  # e.g. the bench extras, when `make bench` has not run
        if installed != version:
            drift[name] = (installed, version)
    assert not drift, f"installed vs pinned: {drift}"


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


def _stage(dockerfile: str, name: str) -> str:
    """The text of one stage of a multi-stage Dockerfile, up to the next FROM."""
    match = re.search(rf"^FROM \S+ AS {name}\n(.*?)(?=^FROM |\Z)", dockerfile, re.M | re.S)
    assert match, f"no stage {name}"
    return match.group(1)


def test_the_api_image_build_fails_if_torch_gets_in() -> None:
    """README: the API image has "no torch (the build fails if torch gets in)". The api
    stage's last install step ends with a check that exits non-zero when torch can be
    imported; it is run here as the build runs it, in an environment with torch (this
    one) and without (the same interpreter, site-packages off)."""
    api = _stage((ROOT / "Dockerfile").read_text(), "api")
    step = next(block for block in api.split("\nRUN ") if "find_spec('torch')" in block)
    # Chained after the install in the same RUN, so a failing check fails the build.
    assert "pip install -c constraints.txt --no-deps ." in step
    assert step.index("pip install") < step.index("&& python3 -c")
    check = re.search(r'python3 -c "([^"]+)"', step)
    assert check, step
    with_torch = subprocess.run([sys.executable, "-c", check.group(1)], check=False)
    without = subprocess.run([sys.executable, "-I", "-S", "-c", check.group(1)], check=False)
    assert with_torch.returncode != 0 and without.returncode == 0
    # And the api's dependencies (deploy/requirements.py without extras) name no torch.
    listed = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "requirements.py")],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert listed and not [p for p in listed if p.startswith("torch")]
    assert "-c constraints.txt -r /tmp/requirements.txt" in _stage(
        (ROOT / "Dockerfile").read_text(), "api-deps"
    )
