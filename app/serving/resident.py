"""The serving model of an API process: resident weights that follow the head version.

A switch prepares the new version's matrices while generation goes on, then installs them under
the write side of a readers-writer lock; every generation holds the read side from its first to
its last token, so none ever sees weights from two versions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session, sessionmaker

from app.core import metrics
from app.queue.bus import HeadBus
from app.services.versions import Catalog, get_head
from app.serving.rwlock import RWLock
from app.versions.chain import VersionInfo
from app.versions.live import LiveWeights, Prepared
from app.versions.materialise import BaseWeights, Materialiser
from app.versions.store import BlobCorrupted, BlobStore
from workers.editing.model import LoadedModel

log = logging.getLogger(__name__)


class ServingModel:
    def __init__(
        self, loaded: LoadedModel, store: BlobStore, factory: sessionmaker[Session]
    ) -> None:
        self.loaded = loaded
        self.factory = factory
        self.catalog = Catalog()
        self.live = LiveWeights(loaded.model, Materialiser(store, BaseWeights(loaded.path)))
        self.lock = RWLock()
        self._switch = threading.Lock()
        self.version: int | None = None
        # Set while the head cannot be served (a blob missing or failing its checksum).
        self.refused: str | None = None

    @property
    def name(self) -> str:
        return self.loaded.name

    def prepare(self, version: int) -> Prepared:
        """Materialise ``version`` without serving it; raises ``BlobCorrupted`` if it cannot be."""
        with self.factory() as session:
            path = self.catalog.path(session, version)
        return self.live.prepare(path)

    def sync_to_head(self, ready: Prepared | None = None) -> int:
        """Switch to the database's head if it differs; returns the version now served.

        A head whose blobs are missing or corrupt is refused: the current version stays (at
        start-up, the newest readable ancestor of the head), and ``refused`` says why."""
        with self._switch:
            with self.factory() as session:
                head = get_head(session)
                if head == self.version:
                    self.refused = None
                    return head
                path = self.catalog.path(session, head)
            started = time.perf_counter()
            try:
                prepared = ready if ready is not None and ready.version == head else None
                prepared = prepared or self.live.prepare(path)
            except BlobCorrupted as error:
                return self._refuse(head, path, error)
            self.refused = None
            with self.lock.write():
                self.live.install(prepared)
                self.version = head
            metrics.HEAD_SWITCH_SECONDS.observe(time.perf_counter() - started)
            metrics.SERVING_VERSION.set(head)
            log.info("serving version %s", head)
            return head

    def _refuse(self, head: int, path: list[VersionInfo], error: BlobCorrupted) -> int:
        problem = f"head version {head} cannot be served: {error}"
        if problem != self.refused:
            log.error("%s; still serving version %s", problem, self.version)
        self.refused = problem
        if self.version is not None:
            return self.version
        for info in reversed(path[:-1]):  # start-up: the newest ancestor that is readable
            try:
                prepared = self.live.prepare(path[: path.index(info) + 1])
            except BlobCorrupted:
                continue
            with self.lock.write():
                self.live.install(prepared)
                self.version = info.id
            metrics.SERVING_VERSION.set(info.id)
            log.error("serving version %s, the newest readable ancestor of %s", info.id, head)
            return info.id
        raise error

    @contextmanager
    def borrowed(self, version: int) -> Iterator[int]:
        """Hold ``version``'s weights exclusively (the playground's earlier version): it is put
        in under the write lock and the served version's exact values put back afterwards, so
        generation pauses for as long as the caller holds it."""
        with self._switch:
            with self.factory() as session:
                path = self.catalog.path(session, version)
            prepared = self.live.prepare(path)
            with self.lock.write():
                changed = self.live.preview(prepared)
                try:
                    yield version
                finally:
                    self.live.restore(changed)

    @contextmanager
    def reading(self) -> Iterator[int]:
        """Hold the weights of one version; yields that version's id."""
        with self.lock.read():
            if self.version is None:
                raise RuntimeError("serving model has no version loaded yet")
            yield self.version


class HeadFollower(threading.Thread):
    """Switches the serving model when the head moves: on an announcement, or by polling."""

    def __init__(self, serving: ServingModel, bus: HeadBus, *, poll_interval: float) -> None:
        super().__init__(name="lokid-head-follower", daemon=True)
        self.serving = serving
        self.bus = bus
        self.poll_interval = poll_interval
        self.stop = threading.Event()
        self.wake = threading.Event()

    def run(self) -> None:
        listener = threading.Thread(
            target=self.bus.listen,
            args=(lambda _version: self.wake.set(), self.stop),
            name="lokid-head-listener",
            daemon=True,
        )
        listener.start()
        while not self.stop.is_set():
            self.wake.wait(self.poll_interval)
            self.wake.clear()
            if self.stop.is_set():
                break
            try:
                self.serving.sync_to_head()
            except Exception:
                log.warning("could not follow the head", exc_info=True)

    def close(self) -> None:
        self.stop.set()
        self.wake.set()
