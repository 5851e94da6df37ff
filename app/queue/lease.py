"""The model's lease: lifelong editing is sequential, so one worker at a time may edit a model.

Postgres: a session advisory lock on a connection of its own. SQLite: an exclusive ``flock`` on a
file beside the database. Both vanish with the process that holds them, SIGKILL included, so a
crashed worker never blocks its successor. A held lease is re-checked every few seconds; if its
connection dropped (Postgres restarted) the worker stops claiming jobs until it holds it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """This worker does not hold the model's lease (now): it must not edit."""


def lease_key(name: str) -> int:
    """A signed 64-bit advisory-lock key derived from the lease's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class ModelLease:
    def __init__(self, engine: Engine, name: str, *, check_every: float = 5.0) -> None:
        self.engine = engine
        self.name = name
        self.check_every = check_every
        self._conn: Any = None
        self._file: IO[bytes] | None = None
        self._held = threading.Event()
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held.is_set()

    def try_acquire(self) -> bool:
        if self.held:
            return True
        got = self._try_file() if self.engine.dialect.name == "sqlite" else self._try_pg()
        if got:
            self._held.set()
        return got

    def acquire(self, *, wait_log_every: float = 30.0, poll: float = 1.0) -> None:
        """Block until the lease is ours, saying now and then that another worker holds it."""
        last_log = -wait_log_every
        while not self._stop.is_set() and not self.try_acquire():
            if time.monotonic() - last_log >= wait_log_every:
                log.warning("another worker holds the lease %r; waiting for it", self.name)
                last_log = time.monotonic()
            self._stop.wait(poll)
        if not self.held:  # released while waiting: the worker is shutting down
            return
        log.info("holding the model's lease %r", self.name)
        if self._watch is None and self.engine.dialect.name != "sqlite":
            self._watch = threading.Thread(target=self._keep, name="lokid-lease", daemon=True)
            self._watch.start()

    def check(self) -> None:
        if not self.held:
            raise LeaseLost(f"this worker does not hold the model's lease {self.name!r}")

    def release(self) -> None:
        self._stop.set()
        if self._watch is not None and self._watch is not threading.current_thread():
            self._watch.join(timeout=10)  # it shares the lock's connection: let it finish first
            self._watch = None
        was_held = self.held
        self._held.clear()
        if was_held and self._conn is not None:
            # Unlock explicitly: the server ends a dropped session (and frees its locks) a
            # moment after the socket closes, so a successor asking at once could be refused.
            with contextlib.suppress(Exception):
                self._conn.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": lease_key(self.name)}
                )
                self._conn.commit()
        self._drop_conn()  # and ending the session releases it in any case
        if self._file is not None:
            self._file.close()  # and closing the file releases the flock
            self._file = None

    # -- Postgres ---------------------------------------------------------------------

    def _try_pg(self) -> bool:
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            got = self._conn.execute(
                text("SELECT pg_try_advisory_lock(:key)"), {"key": lease_key(self.name)}
            ).scalar()
            self._conn.commit()  # a session lock outlives transactions; end this one
        except Exception:
            self._drop_conn()
            raise
        return bool(got)

    def _drop_conn(self) -> None:
        # Invalidate, not close: a closed connection goes back to the pool, its session (and
        # the lock with it) alive.
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()
                conn.close()

    def _keep(self) -> None:
        """While held, check the lock's connection; when it is gone, so is the lock: get it
        back before this worker edits again."""
        while not self._stop.wait(self.check_every):
            try:
                if self.held:
                    self._conn.execute(text("SELECT 1")).scalar()
                    self._conn.commit()
                else:
                    self.try_acquire()
                    if self.held:
                        log.info("holding the model's lease %r again", self.name)
            except Exception as error:
                if self.held:
                    log.error("lost the model's lease %r: %s", self.name, error)
                self._held.clear()
                self._drop_conn()

    # -- SQLite -----------------------------------------------------------------------

    def _try_file(self) -> bool:
        if self._file is None:
            database = make_url(self.engine.url).database or "lokid"
            path = Path(f"{database}.{self.name.replace(':', '-')}.lease")
            self._file = path.open("ab")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
