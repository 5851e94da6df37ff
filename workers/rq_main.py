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

# How long rq's command-channel thread waits per poll: bounds how long a stop can take.
PUBSUB_POLL_SECONDS = 1.0


class EditQueueWorker(SimpleWorker):
    """rq's SimpleWorker (jobs run in this process, beside the resident model), with a
    command-channel thread that notices a stop within ``PUBSUB_POLL_SECONDS``.

    rq 3 starts that thread with a 60 s poll, and redis-py 8's ``PubSubWorkerThread.stop()``
    joins it without a timeout. When the thread had already read the unsubscribe reply, it
    sat in a 60 s wait for a new subscription, and ``lokid worker`` took up to a minute to
    exit after SIGINT/SIGTERM (``docker stop`` kills after 10 s)."""

    def subscribe(self) -> None:
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=PUBSUB_POLL_SECONDS,
            daemon=True,
            exception_handler=self._pubsub_exception_handler,
        )


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
        EditQueueWorker([dispatcher.queue], connection=infra.redis).work(
            burst=burst, with_scheduler=False, logging_level="INFO"
        )
    finally:
        reconciler.stop.set()
        worker.heartbeat.stop.set()
        worker.heartbeat.join(5)
        set_resident(None)
        lease.release()
        infra.close()
