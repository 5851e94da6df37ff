"""Injected faults: a worker SIGKILLed mid-edit, a second worker, Redis restarted with edits
queued, Postgres stopped, corrupted or missing version blobs, an API restart.

Anything that stops a server uses a private instance (tests/service/private_servers.py)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from rq import Queue
from sqlalchemy import func, select

from app.core.config import load_settings
from app.db import migrate
from app.db.models import Edit, EditStatus, Version, VersionBlob
from app.db.session import make_engine
from app.queue.lease import ModelLease
from app.runtime import Infra, build_infra
from app.schemas.edits import EditCreate
from app.services import edits as edit_service
from app.services.versions import get_head
from bench.private_redis import PrivateRedis
from tests.service.conftest import (
    RANK_ONE,
    ROOT,
    Server,
    as_edit,
    counterfact,
    start_server,
    wait_for,
)
from tests.service.private_servers import PrivatePostgres
from workers.editing.model import LoadedModel
from workers.rq_main import PUBSUB_POLL_SECONDS, EditQueueWorker

RECORDS = counterfact()
LOKID = str(ROOT / ".venv" / "bin" / "lokid")
SLOW = "tests.service.slow_editor:SlowRankOneEditor"
PROMPTS = [RECORDS[i]["prompt"] for i in (40, 41)]


# -- worker processes on Postgres + a private Redis ----------------------------------------


class Stack:
    """Edit workers as processes; the test submits edits and reads the log in-process."""

    def __init__(self, pg_url: str, redis_url: str, tmp: Path, edit_seconds: float) -> None:
        self.tmp = tmp
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LOKID_DATABASE_URL": pg_url,
            "LOKID_REDIS_URL": redis_url,
            "LOKID_VERSION_STORE": str(tmp / "versions"),
            "LOKID_EDITOR": SLOW,
            "LOKID_TEST_EDIT_SECONDS": str(edit_seconds),
            "LOKID_RECONCILE_INTERVAL": "1",
            "LOKID_RECONCILE_GRACE": "0.5",
            "LOKID_LEASE_CHECK_INTERVAL": "1",
            "LOKID_TORCH_THREADS": "1",
        }
        migrate.upgrade(pg_url)
        settings = load_settings(
            database_url=pg_url, redis_url=redis_url, version_store=tmp / "versions"
        )
        self.infra: Infra = build_infra(settings)
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def start_worker(self, name: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [LOKID, "worker"], env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        self.workers[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def wait_log(self, name: str, text: str, timeout: float = 120) -> None:
        def seen() -> bool:
            assert self.workers[name].poll() is None, self.log(name)[-3000:]
            return text in self.log(name)

        wait_for(seen, timeout, f"{name} to log {text!r}")

    def submit(self, record: dict[str, Any]) -> int:
        item = EditCreate(**as_edit(record))
        edits, _ = edit_service.submit(
            self.infra.factory, self.infra.dispatcher, [item], batch=False
        )
        return edits[0].id

    def edit(self, edit_id: int) -> Edit:
        with self.infra.factory() as session:
            row = session.get(Edit, edit_id)
            assert row is not None
            return row

    def versions(self) -> list[int]:
        with self.infra.factory() as session:
            return list(session.scalars(select(Version.id).order_by(Version.id)))

    def head(self) -> int:
        with self.infra.factory() as session:
            return get_head(session)

    def all_blobs_verify(self) -> None:
        with self.infra.factory() as session:
            for blob in session.scalars(select(VersionBlob)):
                self.infra.store.get(blob.sha256)  # raises on a missing or corrupt blob

    def close(self) -> None:
        for proc in self.workers.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in self.workers.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.infra.close()


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    yield server
    server.close()


@pytest.fixture
def stack(pg_url: str, private_redis: PrivateRedis, tmp_path: Path) -> Iterator[Stack]:
    built = Stack(pg_url, private_redis.url, tmp_path, edit_seconds=3)
    yield built
    built.close()


def test_sigkill_mid_edit_and_a_second_worker_waiting_for_the_lease(stack: Stack) -> None:
    first = stack.start_worker("first")
    stack.wait_log("first", "holding the model's lease")
    stack.start_worker("second")
    stack.wait_log("second", "another worker holds the lease")  # it waits, it does not edit

    edit_id = stack.submit(RECORDS[30])
    wait_for(lambda: stack.edit(edit_id).status == EditStatus.running, 60, "the edit to start")
    first.send_signal(signal.SIGKILL)  # in the middle of the (3 s) edit
    first.wait(10)
    assert stack.head() == 0 and stack.versions() == [0]  # nothing half-made became visible
    assert stack.edit(edit_id).status == EditStatus.running

    # the waiting worker takes the lease, finds the interrupted edit and applies it once
    stack.wait_log("second", "holding the model's lease", timeout=60)
    done = wait_for(
        lambda: (e := stack.edit(edit_id)).status not in ("queued", "running") and e,
        120,
        "the interrupted edit to finish",
    )
    assert done.status == EditStatus.applied, done.error
    assert done.attempts == 2
    assert stack.versions() == [0, done.version] and stack.head() == done.version
    stack.all_blobs_verify()
    with stack.infra.factory() as session:
        applied = session.scalar(select(func.count()).where(Edit.version == done.version))
    assert applied == 1


def test_redis_restarted_with_edits_queued(
    pg_url: str, private_redis: PrivateRedis, tmp_path: Path
) -> None:
    stack = Stack(pg_url, private_redis.url, tmp_path, edit_seconds=0.5)
    try:
        stack.start_worker("worker")
        stack.wait_log("worker", "holding the model's lease")
        ids = [stack.submit(RECORDS[50 + i]) for i in range(4)]
        wait_for(lambda: stack.edit(ids[0]).status != "queued", 60, "the first edit to start")
        private_redis.kill()  # every queued job is gone with it
        private_redis.start()

        def all_terminal() -> bool:
            return all(stack.edit(i).status not in ("queued", "running") for i in ids)

        wait_for(all_terminal, 120, "every edit to reach a terminal state")
        finished = [stack.edit(i) for i in ids]
        assert [e.status for e in finished] == ["applied"] * 4, [e.error for e in finished]
        versions = [e.version for e in finished]
        assert len(set(versions)) == 4 and stack.versions() == [0, *versions]
        assert stack.workers["worker"].poll() is None, stack.log("worker")[-3000:]
    finally:
        stack.close()


def test_sigterm_mid_edit_finishes_the_edit_then_exits(stack: Stack) -> None:
    worker = stack.start_worker("worker")
    stack.wait_log("worker", "Listening on")
    edit_id = stack.submit(RECORDS[31])
    wait_for(lambda: stack.edit(edit_id).status == EditStatus.running, 60, "the edit to start")
    worker.send_signal(signal.SIGTERM)  # in the middle of the (3 s) edit: a warm shutdown
    assert worker.wait(60) == 0, stack.log("worker")[-3000:]
    done = stack.edit(edit_id)
    assert done.status == EditStatus.applied and done.attempts == 1, done.error
    assert stack.head() == done.version


def test_worker_stops_promptly_when_its_command_thread_has_already_unsubscribed(
    redis_db: redis.Redis,
) -> None:
    # the race that kept `lokid worker` alive up to 60 s after SIGINT: the command thread has
    # read the unsubscribe reply and waits for a new subscription when the stop arrives
    queue = Queue(f"stop_{secrets.token_hex(4)}", connection=redis_db)
    worker = EditQueueWorker([queue], connection=redis_db)
    worker.subscribe()
    wait_for(lambda: worker.pubsub.subscribed, 10, "the command channel subscription")
    worker.pubsub.unsubscribe()
    wait_for(lambda: not worker.pubsub.subscribed, 10, "the thread to read the unsubscribe")
    started = time.monotonic()
    worker.unsubscribe()
    assert time.monotonic() - started < 3 * PUBSUB_POLL_SECONDS + 1
    assert not worker.pubsub_thread.is_alive()


# -- lease units ---------------------------------------------------------------------------


def test_lease_is_exclusive_and_freed_when_its_holder_goes(pg_url: str, tmp_path: Path) -> None:
    for url in (pg_url, f"sqlite:///{tmp_path}/lease.db"):
        engine = make_engine(url)
        try:
            first, second = ModelLease(engine, "lokid:edits"), ModelLease(engine, "lokid:edits")
            assert first.try_acquire() and not second.try_acquire(), url
            assert ModelLease(engine, "lokid:other").try_acquire()  # another queue, another lease
            first.release()
            assert second.try_acquire(), url
            second.release()
        finally:
            engine.dispose()


def test_a_second_embedded_server_on_one_database_refuses_to_start(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    _, stop = start_server(tmp_path, models, editor=RANK_ONE)
    try:
        with pytest.raises(Exception, match="holds the model's lease"):
            start_server(tmp_path, models, editor=RANK_ONE)
    finally:
        stop()


# -- Postgres stopped: 503 + Retry-After, generation goes on, recovery by itself ------------


def test_postgres_stopped_answers_503_and_recovers(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    pg = PrivatePostgres()
    try:
        migrate.upgrade(pg.url)
        server, stop = start_server(
            tmp_path, models, editor=RANK_ONE, database_url=pg.url, head_poll_interval=0.5
        )
        try:
            _postgres_outage(server, pg)
        finally:
            stop()
    finally:
        pg.close()


def _postgres_outage(server: Server, pg: PrivatePostgres) -> None:
    body = {"prompt": PROMPTS[0], "max_new_tokens": 6}
    with server.client() as client:
        before = client.post("/v1/generate", json=body).json()
        pg.stop()
        for method, path, payload in [
            ("POST", "/v1/edits", as_edit(RECORDS[60])),
            ("GET", "/v1/edits", None),
            ("GET", "/v1/versions", None),
            ("POST", "/v1/rollback", {"version": 0}),
        ]:
            response = client.request(method, path, json=payload)
            assert response.status_code == 503, (path, response.text)
            assert int(response.headers["retry-after"]) > 0
            assert "database is unavailable" in response.json()["detail"]
        assert client.get("/readyz").status_code == 503
        during = client.post("/v1/generate", json=body)  # the resident model needs no database
        assert during.status_code == 200 and during.json() == before
        pg.start()

        def accepted() -> httpx.Response | None:
            response = client.post("/v1/edits", json=as_edit(RECORDS[60]))
            return response if response.status_code == 202 else None

        posted = wait_for(accepted, 30, "the API to take edits again").json()
        assert client.get("/readyz").status_code == 200
    assert server.wait_edit(posted["id"])["status"] == "applied"


# -- version blobs: corrupt or missing ---------------------------------------------------


def _answers(server: Server) -> list[dict[str, Any]]:
    with server.client() as client:
        return [
            client.post("/v1/generate", json={"prompt": p, "max_new_tokens": 8}).json()
            for p in PROMPTS
        ]


def _two_versions(
    tmp: Path, models: tuple[LoadedModel, LoadedModel]
) -> tuple[Server, list[dict[str, Any]]]:
    server, stop = start_server(tmp, models, editor=RANK_ONE)
    try:
        with server.client() as client:
            posted = [client.post("/v1/edits", json=as_edit(RECORDS[i])).json() for i in (40, 41)]
        return server, [server.wait_edit(p["id"]) for p in posted]
    finally:
        stop()


def _delta_blob(server: Server, version: int) -> Path:
    with server.runtime.infra.factory() as session:
        sha = session.scalar(
            select(VersionBlob.sha256).where(
                VersionBlob.version_id == version, VersionBlob.kind == "delta"
            )
        )
    assert sha is not None
    return server.runtime.infra.store.path(sha)


def test_corrupt_or_missing_blob_is_refused_and_the_last_good_version_served(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    server, (first, second) = _two_versions(tmp_path, models)
    assert first["status"] == second["status"] == "applied"
    v1, v2 = first["version"], second["version"]
    blob = _delta_blob(server, v2)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))

    server, stop = start_server(tmp_path, models, editor=RANK_ONE)
    try:
        assert server.runtime.serving.version == v1  # the head's parent: newest readable
        assert {a["version"] for a in _answers(server)} == {v1}
        with server.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503
            assert f"head version {v2} cannot be served" in ready.json()["checks"]["model"]
            assert "fails its checksum" in ready.json()["checks"]["model"]
            refused = client.post("/v1/rollback", json={"version": v2})
            assert refused.status_code == 409 and "fails its checksum" in refused.text
            assert client.post("/v1/rollback", json={"version": 0}).status_code == 200
            assert client.get("/readyz").status_code == 200
    finally:
        stop()
    _delta_blob(server, v1).unlink()
    server, stop = start_server(tmp_path, models, editor=RANK_ONE)  # a cold blob cache
    try:
        with server.client() as client:
            missing = client.post("/v1/rollback", json={"version": v1})
            assert missing.status_code == 409 and "is missing" in missing.text
            assert client.get("/v1/versions/head").json()["id"] == 0
        assert {a["version"] for a in _answers(server)} == {0}
    finally:
        stop()


def test_api_restart_serves_the_head_with_the_same_answers(
    tmp_path: Path, models: tuple[LoadedModel, LoadedModel]
) -> None:
    server, stop = start_server(tmp_path, models, editor=RANK_ONE)
    try:
        with server.client() as client:
            posted = client.post("/v1/edits", json=as_edit(RECORDS[40])).json()
        head = server.wait_edit(posted["id"])["version"]
        before = _answers(server)
    finally:
        stop()
    server, stop = start_server(tmp_path, models, editor=RANK_ONE)
    try:
        with server.client() as client:
            assert client.get("/v1/versions/head").json()["id"] == head
        after = _answers(server)
    finally:
        stop()
    assert {a["version"] for a in after} == {head}
    assert after == before
