"""Making the queue agree with the database: every ``queued`` edit gets a job.

Redis may drop jobs (restart without persistence, eviction, an enqueue that failed after the
INSERT committed); Postgres keeps the edit. The reconciler finds edits still ``queued`` after a
grace period whose job is missing or finished, and dispatches them again.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Edit, EditStatus, utcnow
from app.queue.dispatch import Dispatcher

log = logging.getLogger(__name__)


def job_id_of(edit: Edit) -> int:
    return edit.batch_id if edit.batch_id is not None else edit.id


def queued_jobs(session: Session, *, older_than: float) -> list[int]:
    cutoff = utcnow() - timedelta(seconds=older_than)
    job = func.coalesce(Edit.batch_id, Edit.id)
    rows = session.execute(
        select(job)
        .where(Edit.status == EditStatus.queued, Edit.created_at <= cutoff)
        .group_by(job)
        .order_by(job)
    )
    return [int(r[0]) for r in rows]


def reconcile(factory: sessionmaker[Session], dispatcher: Dispatcher, *, grace: float) -> list[int]:
    """Dispatch every queued job the queue has lost; returns their ids."""
    with factory() as session:
        jobs = queued_jobs(session, older_than=grace)
    redispatched = []
    for job_id in jobs:
        if dispatcher.is_pending(job_id):
            continue
        dispatcher.discard(job_id)  # a finished/failed job of that id would block a new one
        dispatcher.enqueue(job_id)
        redispatched.append(job_id)
    if redispatched:
        log.info("reconciler re-dispatched jobs %s", redispatched)
    return redispatched


def recover_interrupted(factory: sessionmaker[Session], *, max_attempts: int = 3) -> list[int]:
    """Edits left ``running`` by a worker that died: queue them again, or mark them ``failed``
    once they have been tried ``max_attempts`` times (an edit that kills its worker every time
    must not kill every worker after it). Call only while holding the model's lease.
    Returns the ids of the jobs queued again."""
    with factory() as session, session.begin():
        job = func.coalesce(Edit.batch_id, Edit.id)
        running = Edit.status == EditStatus.running
        exhausted = running & (Edit.attempts >= max_attempts)
        given_up = session.execute(
            update(Edit)
            .where(exhausted)
            .values(
                status=EditStatus.failed,
                finished_at=utcnow(),
                error=f"the worker stopped during this edit {max_attempts} times; not retried",
            )
            .returning(Edit.id)
        ).all()
        jobs = [int(r[0]) for r in session.execute(select(job).where(running).group_by(job))]
        if jobs:
            session.execute(
                update(Edit).where(running).values(status=EditStatus.queued, started_at=None)
            )
    if given_up:
        log.error("edits %s failed: their worker died on each attempt", [r[0] for r in given_up])
    if jobs:
        log.warning("edits of jobs %s were interrupted; queued again", jobs)
    return jobs


class ReconcilerThread(threading.Thread):
    def __init__(
        self,
        factory: sessionmaker[Session],
        dispatcher: Dispatcher,
        *,
        interval: float,
        grace: float,
    ) -> None:
        super().__init__(name="lokid-reconciler", daemon=True)
        self.factory, self.dispatcher = factory, dispatcher
        self.interval, self.grace = interval, grace
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                reconcile(self.factory, self.dispatcher, grace=self.grace)
            except Exception:
                log.warning("reconciler pass failed", exc_info=True)
