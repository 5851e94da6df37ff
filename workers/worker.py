"""The edit worker: one resident model and editor, one job at a time.

Used two ways with the same code after the queue: ``lokid worker`` consumes rq jobs with a
non-forking rq worker (a fork per job would lose the loaded model and cannot re-initialise
CUDA); the embedded mode runs ``LocalWorkerThread`` inside the API process.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from app.core import metrics
from app.core.config import Settings
from app.core.logs import edit_context, set_version
from app.db.models import Edit, EditStatus
from app.queue.bus import HeadBus
from app.queue.dispatch import LocalDispatcher
from app.queue.lease import ModelLease
from app.services import jobs
from app.services.versions import Catalog, HeadMoved, get_head
from app.versions import state as state_codec
from app.versions.chain import DELTA, KEYFRAME, STATE, VersionInfo, needs_full_state, needs_keyframe
from app.versions.live import LiveWeights, Prepared
from app.versions.materialise import BaseWeights, Materialiser
from app.versions.store import BlobCorrupted, BlobStore
from workers.editing.editor import Editor
from workers.editing.health import Health, guard_problem, load_canaries, measure, probe
from workers.editing.model import LoadedModel, load_model
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.editing.scoring import answers_already
from workers.editors import make_editor
from workers.heartbeat import Heartbeat

log = logging.getLogger(__name__)
_MAX_REBASES = 3
_MAX_PROBES = 16  # edits of one batch probed before/after: bounds the cost of a large batch


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


class EditWorker:
    def __init__(
        self,
        settings: Settings,
        *,
        factory: sessionmaker[Session],
        store: BlobStore,
        bus: HeadBus,
        loaded: LoadedModel | None = None,
        editor: Editor | None = None,
        lease: ModelLease | None = None,
    ) -> None:
        self.settings = settings
        self.lease = lease
        self.factory = factory
        self.store = store
        self.bus = bus
        self.loaded = loaded or load_model(
            settings.model, device=settings.device, dtype=settings.dtype
        )
        self.editor = editor or self._new_editor()
        self.materialiser = Materialiser(store, BaseWeights(self.loaded.path))
        self.live = LiveWeights(self.loaded.model, self.materialiser)
        self.catalog = Catalog()
        self.editor_state: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()  # lifelong editing is sequential: one job at a time
        self.canaries = load_canaries(settings.canaries_path)
        self.health_by_version: dict[int, Health] = {}
        self.heartbeat = Heartbeat(factory, interval=settings.heartbeat_interval)

    def _new_editor(self) -> Editor:
        return make_editor(
            self.settings.editor,
            self.loaded.model,
            self.loaded.tokenizer,
            self.settings.editor_options,
        )

    # -- following the head -------------------------------------------------------------

    def sync(self) -> int:
        """Bring weights and editor state to the database head (it moves on rollback)."""
        with self.factory() as session:
            head = get_head(session)
            if self.live.path and self.live.version == head:
                return head
            path = self.catalog.path(session, head)
        self.live.install(self.live.prepare(path))
        state = self.materialiser.state(path)
        if state:
            self.editor.load_state_dict(state)
        elif self.editor.state_dict():
            self.editor = self._new_editor()  # back to an editor that has seen no edit
        self.editor_state = _clone(state)
        log.info("worker now at version %s", head)
        return head

    def sync_at_start(self) -> None:
        """``sync``, but an unreadable head does not stop the worker: it logs why, and each edit
        fails with that reason until an operator rolls back to a readable version."""
        try:
            self.sync()
        except BlobCorrupted as error:
            log.error("the worker cannot load the head version: %s", error)

    def start(self) -> None:
        """Ready for jobs: at the head (if readable), its health known, the heartbeat saying so."""
        self.sync_at_start()
        version = self.live.version  # the head, or where the weights stayed if it was unreadable
        self.health_at(version)
        self.heartbeat.state = {"state": "idle", "version": version}
        self.heartbeat.start()

    def _abandon(self, changed: list[str]) -> None:
        """Undo an edit that reached the weights but not the database, bit for bit."""
        self.live.restore(changed)
        try:
            if self.editor_state:
                self.editor.load_state_dict(self.editor_state)
            else:
                self.editor = self._new_editor()
        except Exception:
            log.exception("could not restore editor state; rebuilding from the head")
            self.live.path = []  # forces a full re-sync before the next job

    # -- one job ------------------------------------------------------------------------

    def process(self, job_id: int) -> str | None:
        """Run edit job ``job_id``; returns the final status, None if there was nothing to do."""
        with self.lock, edit_context(job_id, self.live.version):
            if self.lease is not None:
                self.lease.check()  # raises: the edit stays queued for the lease's holder
            edits = jobs.claim(self.factory, job_id)
            if not edits:
                return None
            log.info("edit job %s claimed (%d edits)", job_id, len(edits))
            self.heartbeat.set(state="editing", edit_id=job_id, version=self.live.version)
            started = time.perf_counter()
            try:
                status = self._run(edits)
            finally:
                self.heartbeat.set(state="idle", version=self.live.version)
            metrics.EDITS_FINISHED.labels(status=status).inc()
            if status == EditStatus.applied:
                metrics.EDIT_SECONDS.observe(time.perf_counter() - started)
            log.info("edit job %s %s in %.2fs", job_id, status, time.perf_counter() - started)
            return status

    # -- model health and the edit guard ------------------------------------------------

    def _measure(self) -> Health:
        lm = self.loaded
        return measure(
            lm.model, lm.tokenizer, self.canaries, text_tokens=self.settings.health_text_tokens
        )

    def health_at(self, version: int) -> Health:
        """Health of the weights now held, which are ``version``'s; measured once per version."""
        if version not in self.health_by_version:
            health = self._measure()
            jobs.record_health(self.factory, version, health.public())
            self.health_by_version[version] = health
        return self.health_by_version[version]

    def _probe(self, requests: list[EditRequest]) -> list[dict[str, Any]]:
        if not self.settings.probe_tokens:
            return []
        some = requests[:_MAX_PROBES]
        found = probe(
            self.loaded.model,
            self.loaded.tokenizer,
            [r.text for r in some],
            [r.target_new for r in some],
            [r.ground_truth for r in some],
            max_new_tokens=self.settings.probe_tokens,
        )
        return [vars(p) for p in found]

    def _guard(self, before: Health, after: Health) -> str | None:
        if not self.settings.edit_guard:
            return None
        return guard_problem(
            before,
            after,
            max_canaries_broken=self.settings.guard_max_canaries_broken,
            max_perplexity_ratio=self.settings.guard_max_perplexity_ratio,
        )

    def _run(self, edits: list[Edit]) -> str:
        try:
            requests = [EditRequest.from_dict(e.request) for e in edits]
        except ValueError as error:
            return self._finish(edits, EditStatus.rejected, str(error))
        for _ in range(_MAX_REBASES):
            changed: list[str] = []
            try:
                base = self.sync()
                set_version(base)
                nothing_to_do = self._already_answered(requests, base)
                if nothing_to_do:
                    return self._reject(edits, nothing_to_do, {})
                before = self.health_at(base)
                probes_before = self._probe(requests)
                result, prepared, changed = self._edit(requests, base)
                summary = result.summary()
                if prepared is None:  # did not take: nothing reached the weights
                    return self._reject(
                        edits,
                        "edit did not take: the target is not the top prediction on every "
                        "observation, so the weights were left unchanged",
                        summary,
                    )
                checked = time.perf_counter()
                after = self._measure()
                summary["health"] = {"before": before.public(), "after": after.public()}
                problem = self._guard(before, after)
                summary["guard_seconds"] = round(time.perf_counter() - checked, 4)
                if problem:
                    self._abandon(changed)
                    return self._reject(
                        edits, f"edit guard: {problem}; the weights were left unchanged", summary
                    )
                probes = zip(probes_before, self._probe(requests), strict=True)
                per_edit = {
                    e.id: {"probe": {"before": b, "after": a}}
                    for e, (b, a) in zip(edits, probes, strict=False)
                }
                version = self._commit(edits, base, result, prepared, after, summary, per_edit)
            except HeadMoved:
                log.info("head moved during edit %s; editing again on the new head", edits[0].id)
                self._abandon(changed)
                continue
            except ValueError as error:  # the editor's way of saying the request cannot be edited
                self._abandon(changed)
                return self._finish(edits, EditStatus.rejected, str(error))
            except Exception as error:
                log.exception("edit job %s failed", edits[0].id)
                self._abandon(changed)
                return self._finish(edits, EditStatus.failed, f"{type(error).__name__}: {error}")
            self.bus.publish(version)
            return EditStatus.applied
        return self._finish(edits, EditStatus.failed, "head kept moving (rollbacks) during edit")

    def _already_answered(self, requests: list[EditRequest], base: int) -> str | None:
        """An edit whose target the model already answers would change weights for nothing."""
        model, tokenizer = self.loaded.model, self.loaded.tokenizer
        prompts = [r.text for r in requests]
        hits = answers_already(model, tokenizer, prompts, [r.target for r in requests])
        for i, (request, hit) in enumerate(zip(requests, hits, strict=True)):
            if hit:
                which = f"edit {i} of the batch: " if len(requests) > 1 else ""
                return (
                    f"{which}target_new: {request.target_new!r} is already the model's greedy "
                    f"answer at version {base}, so there is nothing to change"
                )
        return None

    def _edit(
        self, requests: list[EditRequest], base: int
    ) -> tuple[EditResult, Prepared | None, list[str]]:
        """``Editor.apply``, with the weights written from fp32 masters instead of in place:
        undoing ``w + Δ`` by ``- Δ`` is not exact in floating point, restoring a master is.

        An edit that did not take, under ``reject_unsuccessful``, is never written: no prepared
        version then, and the editor's state is untouched."""
        started = time.perf_counter()
        result = self.editor.compute(requests)
        if not result.success and self.settings.reject_unsuccessful:
            result.applied = False
            result.seconds = time.perf_counter() - started
            return result, None, []
        names = sorted({d.name for d in result.deltas})
        every = self.settings.keyframe_every
        keyframes = [n for n in names if needs_keyframe(self.live.path, n, every)]
        draft = VersionInfo(id=-1, parent=base, matrices=tuple(names), keyframes=tuple(keyframes))
        prepared = self.live.prepare_edit(draft, result.deltas)
        changed = self.live.preview(prepared)
        try:
            self.editor.after_apply(requests, result)
        except BaseException:
            self._abandon(changed)
            raise
        result.seconds = time.perf_counter() - started
        for delta in result.deltas:  # every editor's log shows ‖ΔW‖, whether it reports it or not
            result.delta_norm.setdefault(delta.name, round(delta.norm(), 6))
        return result, prepared, changed

    def _reject(self, edits: list[Edit], reason: str, summary: dict[str, Any]) -> str:
        log.warning("edit job %s rejected: %s", edits[0].id, reason)
        return self._finish(edits, EditStatus.rejected, reason, summary)

    def _finish(
        self,
        edits: list[Edit],
        status: EditStatus,
        error: str,
        summary: dict[str, Any] | None = None,
    ) -> str:
        jobs.finish(self.factory, edits, status, error=error, metrics=summary)
        return status

    def _commit(
        self,
        edits: list[Edit],
        base: int,
        result: EditResult,
        prepared: Prepared,
        health: Health,
        summary: dict[str, Any],
        per_edit: dict[int, dict[str, Any]],
    ) -> int:
        draft = prepared.path[-1]
        new_state = _clone(self.editor.state_dict())
        full_state = needs_full_state(self.live.path, self.settings.state_keyframe_every)
        state_tensors, state_full = state_codec.encode(
            new_state, None if full_state else self.editor_state
        )
        delta_tensors: dict[str, torch.Tensor] = {}
        for delta in result.deltas:
            delta_tensors.update(delta.tensors())
        # Blobs are durable before the transaction that makes them reachable.
        blobs = {DELTA: self.store.put(delta_tensors), STATE: self.store.put(state_tensors)}
        if draft.keyframes:
            blobs[KEYFRAME] = self.store.put({n: prepared.masters[n] for n in draft.keyframes})

        version = jobs.commit_version(
            self.factory,
            edits,
            parent=base,
            method=result.method,
            matrices=list(draft.matrices),
            keyframes=list(draft.keyframes),
            state_full=state_full,
            blobs=blobs,
            layers=result.selected_layers,
            metrics=summary,
            health=health.public(),
            per_edit=per_edit,
        )
        self.health_by_version[version] = health
        set_version(version)
        info = VersionInfo(
            id=version,
            parent=base,
            matrices=draft.matrices,
            keyframes=draft.keyframes,
            state_full=state_full,
            blobs={kind: sha for kind, (sha, _) in blobs.items()},
        )
        self.catalog.add(info)
        prepared.path[-1] = info
        prepared.version = version
        self.live.adopt(prepared)
        self.editor_state = new_state
        metrics.VERSION_BYTES.observe(sum(size for _, size in blobs.values()))
        log.info("edit %s applied as version %s", edits[0].id, version)
        return version


class LocalWorkerThread(threading.Thread):
    """The embedded mode's consumer of the in-process queue."""

    def __init__(self, worker: EditWorker, dispatcher: LocalDispatcher) -> None:
        super().__init__(name="lokid-worker", daemon=True)
        self.worker = worker
        self.dispatcher = dispatcher
        self.stop = threading.Event()
        dispatcher.consumer_alive = self.is_alive

    def run(self) -> None:
        while not self.stop.is_set():
            job_id = self.dispatcher.take(timeout=0.5)
            if job_id is None:
                continue
            try:
                self.worker.process(job_id)
            except Exception:  # keep consuming; the reconciler retries what is still queued
                log.exception("edit job %s crashed", job_id)


# -- the rq entry point -----------------------------------------------------------------

_resident: EditWorker | None = None


def set_resident(worker: EditWorker | None) -> None:
    global _resident
    _resident = worker


def run_edit_job(job_id: int) -> str | None:
    """What rq calls for job ``edit-<job_id>``: uses the worker loaded at start-up."""
    if _resident is None:
        raise RuntimeError("no resident edit worker in this process: start it with `lokid worker`")
    return _resident.process(job_id)
