"""Wiring shared by the API and the worker: database, version store, queue and head bus."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis import Redis
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from app.core.config import Settings
from app.db import migrate
from app.db.session import make_engine, make_session_factory
from app.queue.bus import HeadBus, LocalBus, RedisBus
from app.queue.dispatch import Dispatcher, LocalDispatcher, RqDispatcher
from app.queue.lease import ModelLease
from app.versions.store import BlobStore


class StartupError(RuntimeError):
    """Start-up refused; the message says what to fix."""


@dataclass
class Infra:
    settings: Settings
    engine: Engine
    factory: sessionmaker[Session]
    store: BlobStore
    dispatcher: Dispatcher
    bus: HeadBus
    redis: Redis | None = None
    extras: dict[str, object] = field(default_factory=dict)

    def close(self) -> None:
        self.engine.dispose()
        if self.redis is not None:
            self.redis.close()


def head_channel(settings: Settings) -> str:
    return f"lokid:{settings.queue_name}:head"


def apply_threads(settings: Settings) -> None:
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def model_lease(infra: Infra) -> ModelLease:
    """The lease every edit worker of this database and queue competes for."""
    settings = infra.settings
    return ModelLease(
        infra.engine, f"lokid:{settings.queue_name}", check_every=settings.lease_check_interval
    )


def build_infra(settings: Settings, *, migrate_sqlite: bool = True) -> Infra:
    apply_threads(settings)
    engine = make_engine(settings.database_url)
    if settings.is_sqlite and migrate_sqlite:
        # Embedded mode has nobody to run `lokid db upgrade`; the file is ours to migrate.
        migrate.upgrade(settings.database_url)
    problem = migrate.pending(engine, settings.database_url)
    if problem:
        engine.dispose()
        raise StartupError(f"LOKID_DATABASE_URL: {problem}")
    redis: Redis | None = None
    dispatcher: Dispatcher
    bus: HeadBus
    if settings.redis_url is None:
        dispatcher, bus = LocalDispatcher(), LocalBus()
    else:
        redis = Redis.from_url(settings.redis_url, health_check_interval=30)
        dispatcher = RqDispatcher(redis, settings.queue_name, job_timeout=settings.job_timeout)
        bus = RedisBus(redis, head_channel(settings))
    return Infra(
        settings=settings,
        engine=engine,
        factory=make_session_factory(engine),
        store=BlobStore(settings.version_store),
        dispatcher=dispatcher,
        bus=bus,
        redis=redis,
    )
