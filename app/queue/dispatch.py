"""Handing edit jobs to the worker: over rq (production) or an in-process queue (embedded).

The database is the source of truth, so a lost dispatch only delays an edit: the reconciler
finds it still ``queued`` and dispatches it again.
"""

from __future__ import annotations

import contextlib
import queue
from typing import Any, Protocol

from redis import Redis
from rq import Queue
from rq.exceptions import DuplicateJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus

JOB_FUNCTION = "workers.worker.run_edit_job"
_PENDING = {JobStatus.QUEUED, JobStatus.STARTED, JobStatus.DEFERRED, JobStatus.SCHEDULED}


def job_name(job_id: int) -> str:
    return f"edit-{job_id}"


class Dispatcher(Protocol):
    def enqueue(self, job_id: int) -> None: ...

    def enqueue_many(self, job_ids: list[int]) -> None: ...

    def is_pending(self, job_id: int) -> bool: ...

    def discard(self, job_id: int) -> None: ...

    def ping(self) -> None: ...


class RqDispatcher:
    def __init__(self, redis: Redis, queue_name: str, *, job_timeout: int) -> None:
        self.redis = redis
        self.queue = Queue(queue_name, connection=redis)
        self.job_timeout = job_timeout

    def enqueue(self, job_id: int) -> None:
        try:
            self._enqueue(job_id)
        except DuplicateJobError:
            # A finished job of the same id (a database reset, a reconciled retry) would
            # otherwise block this one; a pending one means it is on its way already.
            if not self.is_pending(job_id):
                self.discard(job_id)
                with contextlib.suppress(DuplicateJobError):
                    self._enqueue(job_id)

    def enqueue_many(self, job_ids: list[int]) -> None:
        """Fresh jobs in one Redis round trip (ids the database just handed out)."""
        self.queue.enqueue_many(
            [Queue.prepare_data(JOB_FUNCTION, **self._job_options(job_id)) for job_id in job_ids]
        )

    def _enqueue(self, job_id: int) -> None:
        # unique: one job per edit, even when the reconciler races the API
        self.queue.enqueue_call(JOB_FUNCTION, **self._job_options(job_id), unique=True)

    def _job_options(self, job_id: int) -> dict[str, Any]:
        return {
            "args": (job_id,),
            "job_id": job_name(job_id),
            "timeout": self.job_timeout,
            "result_ttl": 600,
            "failure_ttl": 7 * 86_400,  # failed jobs stay inspectable for a week
        }

    def is_pending(self, job_id: int) -> bool:
        try:
            job = Job.fetch(job_name(job_id), connection=self.redis)
        except NoSuchJobError:
            return False
        return job.get_status(refresh=False) in _PENDING

    def discard(self, job_id: int) -> None:
        with contextlib.suppress(NoSuchJobError, InvalidJobOperation):
            Job.fetch(job_name(job_id), connection=self.redis).delete()

    def ping(self) -> None:
        self.redis.ping()


class LocalDispatcher:
    """A FIFO consumed by the worker thread of the embedded mode."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[int] = queue.Queue()
        self._pending: set[int] = set()
        self.consumer_alive = lambda: True

    def enqueue(self, job_id: int) -> None:
        if job_id not in self._pending:
            self._pending.add(job_id)
            self.jobs.put(job_id)

    def enqueue_many(self, job_ids: list[int]) -> None:
        for job_id in job_ids:
            self.enqueue(job_id)

    def take(self, timeout: float) -> int | None:
        try:
            job_id = self.jobs.get(timeout=timeout)
        except queue.Empty:
            return None
        self._pending.discard(job_id)
        return job_id

    def is_pending(self, job_id: int) -> bool:
        return job_id in self._pending

    def discard(self, job_id: int) -> None:
        self._pending.discard(job_id)

    def ping(self) -> None:
        if not self.consumer_alive():
            raise RuntimeError("in-process worker is not running")
