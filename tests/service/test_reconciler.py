"""The reconciler against real Postgres and Redis: Postgres is the truth, Redis may forget."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from rq.job import Job

from app.core.config import load_settings
from app.db import migrate
from app.db.models import Edit, EditStatus, utcnow
from app.queue.dispatch import RqDispatcher, job_name
from app.queue.reconciler import reconcile, recover_interrupted
from app.runtime import Infra, build_infra
from app.schemas.edits import EditCreate
from app.services import edits as edit_service
from tests.service.conftest import REDIS_URL, as_edit, counterfact

RECORD = as_edit(counterfact()[40])


@pytest.fixture
def infra(pg_url: str, redis_db: redis.Redis, tmp_path: Path) -> Iterator[Infra]:
    migrate.upgrade(pg_url)
    settings = load_settings(
        database_url=pg_url,
        redis_url=REDIS_URL,
        queue_name=f"test_{secrets.token_hex(4)}",
        version_store=tmp_path / "versions",
    )
    infra = build_infra(settings)
    yield infra
    assert isinstance(infra.dispatcher, RqDispatcher)
    infra.dispatcher.queue.empty()
    infra.close()


def _insert(infra: Infra, status: EditStatus = EditStatus.queued, age: float = 60) -> int:
    with infra.factory() as session, session.begin():
        edit = Edit(
            status=status,
            request=RECORD,
            created_at=utcnow() - timedelta(seconds=age),
            attempts=0,
        )
        session.add(edit)
        session.flush()
        return edit.id


def test_lost_jobs_are_dispatched_once(infra: Infra) -> None:
    dispatcher = infra.dispatcher
    assert isinstance(dispatcher, RqDispatcher)
    queue = dispatcher.queue
    lost = _insert(infra)
    young = _insert(infra, age=0)  # its API request may still be enqueueing it
    _insert(infra, status=EditStatus.applied)

    assert reconcile(infra.factory, dispatcher, grace=10) == [lost]
    assert queue.job_ids == [job_name(lost)]
    job = Job.fetch(job_name(lost), connection=infra.redis)
    assert job.func_name == "workers.worker.run_edit_job" and job.args == (lost,)
    assert job.timeout == infra.settings.job_timeout

    assert reconcile(infra.factory, dispatcher, grace=10) == []  # pending: not queued twice
    dispatcher.enqueue(lost)  # nor by a racing API request
    assert queue.count == 1

    # Redis forgot the job (restart without persistence): dispatched again
    queue.empty()  # deletes the job too
    assert not dispatcher.is_pending(lost)
    assert reconcile(infra.factory, dispatcher, grace=10) == [lost]
    assert queue.job_ids == [job_name(lost)]

    assert reconcile(infra.factory, dispatcher, grace=0) == [young]


def test_finished_rq_job_does_not_block_a_queued_edit(infra: Infra) -> None:
    dispatcher = infra.dispatcher
    assert isinstance(dispatcher, RqDispatcher)
    edit_id = _insert(infra)
    dispatcher.enqueue(edit_id)
    dispatcher.queue.remove(job_name(edit_id))  # as if a worker took it and died
    job = Job.fetch(job_name(edit_id), connection=infra.redis)
    job.set_status("failed")
    assert not dispatcher.is_pending(edit_id)
    assert reconcile(infra.factory, dispatcher, grace=0) == [edit_id]
    assert dispatcher.queue.job_ids == [job_name(edit_id)]


def test_interrupted_edits_are_queued_again(infra: Infra) -> None:
    running = _insert(infra, status=EditStatus.running)
    assert recover_interrupted(infra.factory) == [running]
    with infra.factory() as session:
        edit = session.get(Edit, running)
        assert edit is not None and edit.status == EditStatus.queued


def test_an_edit_that_keeps_killing_its_worker_is_failed(infra: Infra) -> None:
    tried = _insert(infra, status=EditStatus.running)
    fresh = _insert(infra, status=EditStatus.running)
    with infra.factory() as session, session.begin():
        session.get(Edit, tried).attempts = 3  # type: ignore[union-attr]
        session.get(Edit, fresh).attempts = 2  # type: ignore[union-attr]
    assert recover_interrupted(infra.factory, max_attempts=3) == [fresh]
    with infra.factory() as session:
        given_up, again = session.get(Edit, tried), session.get(Edit, fresh)
        assert given_up is not None and again is not None
        assert given_up.status == EditStatus.failed and "3 times" in (given_up.error or "")
        assert again.status == EditStatus.queued


def test_submit_survives_a_dead_queue_and_batches_are_one_job(infra: Infra) -> None:
    class DeadQueue:
        def enqueue(self, job_id: int) -> None:
            raise ConnectionError("redis is down")

    edits, replayed = edit_service.submit(
        infra.factory,
        DeadQueue(),
        [EditCreate(**RECORD)] * 3,
        batch=True,  # type: ignore[arg-type]
    )
    assert not replayed and len(edits) == 3
    with infra.factory() as session:
        rows = [session.get(Edit, e.id) for e in edits]
    assert {r.status for r in rows if r} == {EditStatus.queued}
    assert {r.batch_id for r in rows if r} == {edits[0].id}
    assert reconcile(infra.factory, infra.dispatcher, grace=0) == [edits[0].id]
    assert infra.dispatcher.queue.job_ids == [job_name(edits[0].id)]  # type: ignore[attr-defined]


def test_group_commit_under_concurrency(infra: Infra) -> None:
    """Many concurrent POSTs share commits: every edit is stored once and dispatched once."""
    from concurrent.futures import ThreadPoolExecutor

    from app.services.ingest import GroupCommit

    ingest = GroupCommit(infra.factory, infra.dispatcher, max_batch=16)
    item = EditCreate(**RECORD)
    with ThreadPoolExecutor(32) as pool:
        edits = list(pool.map(lambda _: ingest.submit(item), range(200)))
    ids = [e.id for e in edits]
    assert len(set(ids)) == 200 and all(e.status == EditStatus.queued for e in edits)
    with infra.factory() as session:
        stored = session.query(Edit.id).filter(Edit.id.in_(ids)).count()
    assert stored == 200
    queue = infra.dispatcher.queue  # type: ignore[attr-defined]
    assert sorted(queue.job_ids) == sorted(job_name(i) for i in ids)
    assert reconcile(infra.factory, infra.dispatcher, grace=0) == []  # nothing was lost


def test_group_commit_reports_a_failed_write_to_every_caller(infra: Infra) -> None:
    from app.services.ingest import GroupCommit

    infra.engine.dispose()
    broken = infra.settings.database_url.replace("5432", "1")  # nothing listens there
    from app.db.session import make_engine, make_session_factory

    engine = make_engine(broken)
    ingest = GroupCommit(make_session_factory(engine), infra.dispatcher)
    with pytest.raises(Exception, match=r"connect|Connection"):
        ingest.submit(EditCreate(**RECORD))
    engine.dispose()
    assert infra.dispatcher.queue.count == 0  # type: ignore[attr-defined]
