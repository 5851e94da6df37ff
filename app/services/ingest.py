"""Group commit for single-edit submissions.

Under load most of the cost of ``POST /v1/edits`` is per transaction and per Redis round trip,
not per row. Concurrent submissions therefore share them: the first caller to find no write in
progress becomes the leader and writes every edit queued so far in one INSERT, one commit and
one Redis pipeline; the others wait for their ids. An idle server still writes each edit at
once, so no request waits for a batch to fill.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from app.core import metrics
from app.db.models import Edit, EditStatus, utcnow
from app.db.session import engine_of
from app.queue.dispatch import Dispatcher
from app.schemas.edits import EditCreate

log = logging.getLogger(__name__)


class _Slot:
    __slots__ = ("done", "edit", "error", "row")

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.edit: Edit | None = None
        self.error: BaseException | None = None
        self.done = False


class GroupCommit:
    def __init__(
        self, factory: sessionmaker[Session], dispatcher: Dispatcher, *, max_batch: int = 256
    ) -> None:
        self.factory = factory
        self.dispatcher = dispatcher
        self.max_batch = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Slot] = []
        self._writing = False

    def submit(self, item: EditCreate) -> Edit:
        """Store one edit as ``queued`` and dispatch its job (blocking; call from a thread)."""
        slot = _Slot(
            {
                "status": EditStatus.queued.value,
                "request": item.editor_request(),
                "note": item.note,
                "created_at": utcnow(),
                "attempts": 0,
            }
        )
        with self._cond:
            self._queue.append(slot)
        while True:
            with self._cond:
                while not slot.done and self._writing:
                    self._cond.wait()
                if slot.done:
                    return self._result(slot)
                self._writing = True  # this caller leads the next write
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
            try:
                self._write(batch)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    @staticmethod
    def _result(slot: _Slot) -> Edit:
        if slot.error is not None:
            raise slot.error
        assert slot.edit is not None
        return slot.edit

    def _write(self, batch: list[_Slot]) -> None:
        table = Edit.__table__
        try:
            with engine_of(self.factory).begin() as conn:
                stmt = insert(table).returning(table.c.id, sort_by_parameter_order=True)
                ids = [int(i) for i in conn.scalars(stmt, [s.row for s in batch])]
        except BaseException as error:
            for slot in batch:
                slot.error, slot.done = error, True
            return
        try:
            self.dispatcher.enqueue_many(ids)
        except Exception:  # the rows are committed; the reconciler dispatches them later
            log.warning("could not dispatch %d edit jobs now", len(ids), exc_info=True)
        metrics.EDITS_SUBMITTED.inc(len(ids))
        for slot, edit_id in zip(batch, ids, strict=True):
            slot.edit = Edit(id=edit_id, batch_id=None, version=None, **slot.row)
            slot.done = True
