"""Everything the API process runs besides HTTP: serving model, head follower, and in the
embedded mode the edit worker and the reconciler on threads of their own."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db.models import BASE_MODEL_KEY, KeyValue, Version, utcnow
from app.queue.dispatch import LocalDispatcher
from app.queue.lease import ModelLease
from app.queue.reconciler import ReconcilerThread, reconcile, recover_interrupted
from app.runtime import Infra, StartupError, build_infra, model_lease
from app.services.ingest import GroupCommit
from app.services.limits import Limits
from app.services.ratelimit import RateLimiter
from app.serving.generation import Generator
from app.serving.resident import HeadFollower, ServingModel
from workers.editing.editor import Editor
from workers.editing.model import LoadedModel, load_model

log = logging.getLogger(__name__)


def check_base_model(factory: sessionmaker[Session], name: str) -> None:
    """Versions are deltas against one base model; refuse to apply them to another."""
    with factory() as session, session.begin():
        row = session.get(KeyValue, BASE_MODEL_KEY)
        if row is None:
            session.add(KeyValue(key=BASE_MODEL_KEY, value=name, updated_at=utcnow()))
            return
        if row.value != name:
            has_versions = session.scalar(select(Version.id).where(Version.id > 0).limit(1))
            if has_versions is not None:
                raise StartupError(
                    f"LOKID_MODEL: the database holds versions of {row.value!r}, "
                    f"not of {name!r}; use a fresh database for another model"
                )
            row.value = name


@dataclass
class ApiRuntime:
    infra: Infra
    serving: ServingModel
    generator: Generator
    follower: HeadFollower
    ingest: GroupCommit
    limits: Limits
    limiter: RateLimiter | None = None
    threads: list[object] = field(default_factory=list)
    worker: object | None = None
    lease: ModelLease | None = None

    @property
    def settings(self) -> Settings:
        return self.infra.settings

    def close(self, *, join_timeout: float = 120) -> None:
        """Stop the threads; an edit in progress is finished first (it commits or fails
        cleanly) rather than torn down half-way by interpreter exit."""
        self.follower.close()
        for thread in self.threads:
            stop = getattr(thread, "stop", None)
            if stop is not None:
                stop.set()
        for thread in self.threads:
            join = getattr(thread, "join", None)
            if join is not None:
                join(join_timeout)
        if self.lease is not None:
            self.lease.release()
        self.infra.close()


def build_runtime(
    settings: Settings,
    *,
    serving_model: LoadedModel | None = None,
    worker_model: LoadedModel | None = None,
    editor: Editor | None = None,
) -> ApiRuntime:
    infra = build_infra(settings)
    try:
        loaded = serving_model or load_model(
            settings.model, device=settings.device, dtype=settings.dtype
        )
        check_base_model(infra.factory, loaded.name)
        serving = ServingModel(loaded, infra.store, infra.factory)
        serving.sync_to_head()
        runtime = ApiRuntime(
            infra=infra,
            serving=serving,
            generator=Generator(serving, Limits.of(settings)),
            follower=HeadFollower(serving, infra.bus, poll_interval=settings.head_poll_interval),
            ingest=GroupCommit(infra.factory, infra.dispatcher),
            limits=Limits.of(settings),
            limiter=RateLimiter.of(settings),
        )
        if isinstance(infra.dispatcher, LocalDispatcher):
            _start_embedded_worker(runtime, worker_model, editor)
        runtime.follower.start()
        return runtime
    except BaseException:
        infra.close()
        raise


def _start_embedded_worker(
    runtime: ApiRuntime, worker_model: LoadedModel | None, editor: Editor | None
) -> None:
    from workers.worker import EditWorker, LocalWorkerThread

    infra, settings = runtime.infra, runtime.settings
    assert isinstance(infra.dispatcher, LocalDispatcher)
    lease = model_lease(infra)
    if not lease.try_acquire():
        raise StartupError(
            "another lokid process is the edit worker of this database (it holds the model's "
            "lease): stop it, or run one `lokid worker` with LOKID_REDIS_URL and API processes"
        )
    runtime.lease = lease
    # The worker edits its own copy in place; serving keeps answering from the other one.
    worker = EditWorker(
        settings,
        factory=infra.factory,
        store=infra.store,
        bus=infra.bus,
        loaded=worker_model
        or load_model(settings.model, device=settings.device, dtype=settings.dtype),
        editor=editor,
        lease=lease,
    )
    worker.start()
    thread = LocalWorkerThread(worker, infra.dispatcher)
    thread.start()
    recover_interrupted(infra.factory, max_attempts=settings.max_attempts)
    reconcile(infra.factory, infra.dispatcher, grace=0)  # the in-process queue starts empty
    reconciler = ReconcilerThread(
        infra.factory,
        infra.dispatcher,
        interval=settings.reconcile_interval,
        grace=settings.reconcile_grace,
    )
    reconciler.start()
    runtime.worker = worker
    runtime.threads += [thread, reconciler, worker.heartbeat]
