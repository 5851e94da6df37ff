"""docker-compose.yml and docker/Dockerfile only name things that exist in the project."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer
import yaml

from app.cli import app as cli_app
from app.core.config import ENV_PREFIX, Settings
from tests.service.conftest import ROOT

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
# Read by the editing core (workers/editing/model.py), not by Settings.
EXTRA_ENV = {"LOKID_VAR_DIR"}


def _dockerfile(service: dict[str, Any]) -> tuple[Path, str]:
    build = service["build"]
    path = ROOT / build["context"] / build["dockerfile"]
    return path, path.read_text()


def _check_lokid_command(argv: list[str]) -> None:
    assert argv[0] == "lokid", argv
    # typer vendors its own click: recognise groups by their sub-commands
    command: Any = typer.main.get_command(cli_app)
    args = argv[1:]
    while hasattr(command, "commands") and args and args[0] in command.commands:
        command = command.commands[args.pop(0)]
    assert not hasattr(command, "commands"), f"{argv}: no such lokid command"
    options = {opt for param in command.params for opt in param.opts}
    for arg in args:
        if arg.startswith("--"):
            assert arg.split("=")[0] in options, f"{argv}: {arg} is not an option"
    ctx = command.make_context("lokid", list(args), resilient_parsing=False)
    assert ctx is not None


def test_services_and_dependencies() -> None:
    assert {"postgres", "redis", "migrate", "api", "worker"} <= set(SERVICES)
    declared_volumes = set(COMPOSE.get("volumes", {}))
    for name, service in SERVICES.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in SERVICES, f"{name} depends on unknown {dependency}"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared_volumes or (ROOT / source).exists(), (name, volume)
    assert SERVICES["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        assert SERVICES[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )


def test_commands_are_lokid_commands() -> None:
    for name, service in SERVICES.items():
        if "build" in service:
            _check_lokid_command(service["command"])
            _, text = _dockerfile(service)
            assert re.search(rf"^FROM .+ AS {service['build']['target']}$", text, re.M), name
    _check_lokid_command(["lokid", "db", "upgrade"])


def test_env_vars_are_settings() -> None:
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            if variable.startswith(ENV_PREFIX):
                assert variable in fields | EXTRA_ENV, f"{name}: {variable} is not a setting"
    env = SERVICES["api"]["environment"]
    assert env["LOKID_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert env["LOKID_REDIS_URL"].startswith("redis://redis:")
    settings = Settings(**{k.removeprefix(ENV_PREFIX).lower(): v for k, v in env.items()})
    # the API listens on every address of its container: only allowed with API keys
    command = SERVICES["api"]["command"]
    assert settings.bind_problem(command[command.index("--host") + 1]) is None
    # the version store lives on the volume both the api and the worker mount
    for name in ("api", "worker"):
        mounts = {v.split(":")[1] for v in SERVICES[name]["volumes"]}
        assert SERVICES[name]["environment"]["LOKID_VERSION_STORE"] in mounts


def test_dockerfile_copies_and_runs_what_exists() -> None:
    path, text = _dockerfile(SERVICES["api"])
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _target = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{path.name}: COPY {source} does not exist"
    for cmd in re.findall(r"^CMD (\[.+\])$", text, re.M):
        argv = yaml.safe_load(cmd)
        if argv[0] == "lokid":
            _check_lokid_command(argv)
    for variable in re.findall(rf"\b({ENV_PREFIX}[A-Z_]+)=", text):
        assert variable in {f"{ENV_PREFIX}{n.upper()}" for n in Settings.model_fields} | EXTRA_ENV
