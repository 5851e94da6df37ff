"""``lokid worker``: the production edit worker, consuming the rq queue without forking."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server
from rq import SimpleWorker

from app.core.config import Settings
from app.queue.dispatch import RqDispatcher
from app.queue.reconciler import ReconcilerThread, reconcile, recover_interrupted
from app.runtime import StartupError, build_infra, model_lease
from workers.worker import EditWorker, set_resident

log = logging.getLogger(__name__)


def run(settings: Settings, *, burst: bool = False, metrics_port: int | None = None) -> None:
    if settings.redis_url is None:
        raise StartupError(
            "LOKID_REDIS_URL: `lokid worker` consumes the Redis queue; set it, or run "
            "`lokid serve` alone for the embedded mode (worker on a thread)"
        )
    infra = build_infra(settings, migrate_sqlite=False)
    dispatcher = infra.dispatcher
    assert isinstance(dispatcher, RqDispatcher)
    try:
        dispatcher.ping()
    except Exception as error:
        raise StartupError(f"LOKID_REDIS_URL: cannot reach Redis: {error}") from None
    if metrics_port:
        start_http_server(metrics_port)
    lease = model_lease(infra)
    worker = EditWorker(
        settings, factory=infra.factory, store=infra.store, bus=infra.bus, lease=lease
    )
    # Loaded before waiting, so a standby worker takes over within seconds of the holder's end.
    lease.acquire()
    worker.start()  # the heartbeat starts only now: a standby worker does not report itself
    set_resident(worker)
    # This process is now the model's only writer: whatever is 'running' was interrupted.
    for job_id in recover_interrupted(infra.factory, max_attempts=settings.max_attempts):
        dispatcher.discard(job_id)
    reconcile(infra.factory, dispatcher, grace=0)
    reconciler = ReconcilerThread(
        infra.factory,
        dispatcher,
        interval=settings.reconcile_interval,
        grace=settings.reconcile_grace,
    )
    reconciler.start()
    log.info(
        "edit worker ready on queue %r at version %s", settings.queue_name, worker.live.version
    )
    try:
        SimpleWorker([dispatcher.queue], connection=infra.redis).work(
            burst=burst, with_scheduler=False, logging_level="INFO"
        )
    finally:
        reconciler.stop.set()
        worker.heartbeat.stop.set()
        worker.heartbeat.join(5)
        set_resident(None)
        lease.release()
        infra.close()
