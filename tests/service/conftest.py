"""Fixtures for the service tests: a fresh Postgres database, Redis db 15, loaded models and
an embedded lokid server on a free port."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import torch
import uvicorn

from app.api_runtime import ApiRuntime, build_runtime
from app.core.config import Settings, load_settings
from app.main import create_app
from workers.editing.model import LoadedModel, load_model

ROOT = Path(__file__).resolve().parents[2]
COUNTERFACT = ROOT.parent / "shared" / "data" / "counterfact" / "train.json"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# Overridable so two checkouts can run their suites side by side without flushing each other.
REDIS_URL = os.environ.get("LOKID_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RANK_ONE = "tests.service.rank_one:RankOneEditor"
# What a served lokid does by default, for tests of the edit guard and the dashboard's probes.
GUARDED = {"edit_guard": True, "probe_tokens": 8}

# The test machine's two cores are shared; oversubscribed OpenMP threads spin on each other.
torch.set_num_threads(1)
os.environ.setdefault("LOKID_TORCH_THREADS", "1")


def counterfact() -> list[dict[str, Any]]:
    return json.loads(COUNTERFACT.read_text())


def as_edit(record: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": record["prompt"],
        "subject": record["subject"],
        "target_new": record["target_new"],
        "ground_truth": record["ground_truth"],
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_pg_database() -> str:
    name = f"lokid_test_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_pg_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_url() -> Iterator[str]:
    name = create_pg_database()
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    drop_pg_database(name)


@pytest.fixture(scope="session")
def redis_db() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def models() -> Iterator[tuple[LoadedModel, LoadedModel]]:
    """A serving copy and a worker copy, shared by every embedded test server."""
    yield load_model(), load_model()


@dataclass
class Server:
    url: str
    runtime: ApiRuntime
    settings: Settings

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=300, headers=headers)

    def wait_edit(
        self, edit_id: int, timeout: float = 300, headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        with self.client(headers) as client:

            def done() -> dict[str, Any] | None:
                body = client.get(f"/v1/edits/{edit_id}").json()
                return body if body["status"] not in ("queued", "running") else None

            return wait_for(done, timeout, f"edit {edit_id} to finish")


class _ThreadServer(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the test process keeps its own handlers
        pass


def start_server(
    tmp: Path, models: tuple[LoadedModel, LoadedModel], **overrides: Any
) -> tuple[Server, Callable[[], None]]:
    """An embedded lokid (SQLite unless ``database_url`` says otherwise, in-process worker) on
    a free port, sharing loaded models."""
    defaults = {
        "database_url": f"sqlite:///{tmp}/lokid.db",
        "redis_url": None,
        "version_store": tmp / "versions",
        "session_secret_file": tmp / "session-secret",
        # The rank-one test editor's crude edits often break canary facts, so the edit guard
        # would reject edits that plumbing tests need applied; the guard's and the dashboard's
        # tests turn it (and the before/after probes, ~1 s an edit) back on.
        "edit_guard": False,
        "probe_tokens": 0,
    }
    settings = load_settings(**{**defaults, **overrides})
    serving, worker = models
    runtime = build_runtime(settings, serving_model=serving, worker_model=worker)
    port = free_port()
    server = _ThreadServer(
        uvicorn.Config(create_app(settings, runtime=runtime), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn to start", every=0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        runtime.close()
        # The models outlive this server: put them back to the base weights for the next one.
        runtime.serving.live.reset()
        if runtime.worker is not None:
            runtime.worker.live.reset()  # type: ignore[attr-defined]

    return Server(f"http://127.0.0.1:{port}", runtime, settings), stop


@pytest.fixture(scope="module")
def embedded(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[Server]:
    """Embedded server with the fast rank-one test editor, for the plumbing tests."""
    server, stop = start_server(
        tmp_path_factory.mktemp("embedded"), models, editor=RANK_ONE, keyframe_every=3
    )
    yield server
    stop()
