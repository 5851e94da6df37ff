"""The edit worker's heartbeat: its state, written to the database every few seconds.

The database rather than Redis, so the dashboard reads the same thing in the embedded mode (no
Redis) and in production, from any API process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from app.db.models import WORKER_KEY, KeyValue, utcnow

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    def __init__(self, factory: sessionmaker[Session], *, interval: float) -> None:
        super().__init__(name="lokid-heartbeat", daemon=True)
        self.factory = factory
        self.interval = interval
        self.stop = threading.Event()
        self.state: dict[str, Any] = {"state": "starting"}
        self._lock = threading.Lock()

    def set(self, **state: Any) -> None:
        """Replace the reported state and write it now (a job starting or ending)."""
        with self._lock:
            self.state = state
        self.beat()

    def beat(self) -> None:
        with self._lock:
            body = {
                **self.state,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "interval": self.interval,
            }
        try:
            with self.factory() as session, session.begin():
                session.merge(KeyValue(key=WORKER_KEY, value=json.dumps(body), updated_at=utcnow()))
        except Exception:  # a missed beat shows as a stale worker; editing goes on
            log.warning("could not write the worker heartbeat", exc_info=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.beat()
            self.stop.wait(self.interval)
        self.set(state="stopped")
