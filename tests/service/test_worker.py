"""The worker's failure paths: weights, editor state and head stay exactly as they were."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from app.core.config import load_settings
from app.db.models import Edit, Version
from app.queue.bus import LocalBus
from app.runtime import Infra, build_infra
from app.schemas.edits import EditCreate
from app.services import edits as edit_service
from app.services.rollback import rollback
from app.services.versions import get_head
from tests.service.conftest import as_edit, counterfact
from tests.service.rank_one import RankOneEditor
from workers.editing.model import LoadedModel
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.worker import EditWorker

RECORDS = counterfact()


class UnsuccessfulEditor(RankOneEditor):
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = super().compute(requests)
        result.success = False
        return result

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        raise AssertionError("an edit that did not take must never reach the weights")


class RollbackDuringEdit(RankOneEditor):
    """Moves the head back to version 0 while its first edit is being computed."""

    infra: Infra | None = None
    fired = False

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = super().compute(requests)
        if not RollbackDuringEdit.fired and self.infra is not None:
            RollbackDuringEdit.fired = True
            from app.services.versions import Catalog

            rollback(self.infra.factory, Catalog(), 0)
        return result


@pytest.fixture
def infra(tmp_path: Path) -> Iterator[Infra]:
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path}/w.db",
        redis_url=None,
        version_store=tmp_path / "versions",
        editor="tests.service.rank_one:RankOneEditor",
    )
    infra = build_infra(settings)
    yield infra
    infra.close()


def _worker(infra: Infra, loaded: LoadedModel, editor_cls: type[RankOneEditor]) -> EditWorker:
    spec = f"{editor_cls.__module__}:{editor_cls.__name__}"
    settings = infra.settings.model_copy(update={"editor": spec})
    worker = EditWorker(
        settings,
        factory=infra.factory,
        store=infra.store,
        bus=LocalBus(),
        loaded=loaded,
        editor=editor_cls(loaded.model, loaded.tokenizer),
    )
    worker.sync()
    return worker


def _submit(infra: Infra, record: dict[str, object]) -> int:
    edits, _ = edit_service.submit(
        infra.factory, infra.dispatcher, [EditCreate(**as_edit(record))], batch=False
    )
    return edits[0].id


def _snapshot(worker: EditWorker) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in worker.loaded.model.named_parameters()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _edit(infra: Infra, edit_id: int) -> Edit:
    with infra.factory() as session:
        edit = session.get(Edit, edit_id)
        assert edit is not None
        return edit


def _versions(infra: Infra) -> int:
    with infra.factory() as session:
        return int(session.scalar(select(func.count()).select_from(Version)) or 0)


@pytest.fixture
def loaded(models: tuple[LoadedModel, LoadedModel]) -> Iterator[LoadedModel]:
    yield models[1]


def test_failed_edit_leaves_everything_as_before(infra: Infra, loaded: LoadedModel) -> None:
    from tests.service.rank_one import FailingEditor

    good = _worker(infra, loaded, RankOneEditor)
    try:
        assert good.process(_submit(infra, RECORDS[30])) == "applied"
        before, head, n_versions = _snapshot(good), good.live.version, _versions(infra)
        state = good.editor.state_dict()

        bad = _worker(infra, loaded, FailingEditor)
        bad.editor.load_state_dict(state)
        bad.editor_state = {k: v.clone() for k, v in state.items()}
        edit_id = _submit(infra, RECORDS[31])
        assert bad.process(edit_id) == "failed"
        edit = _edit(infra, edit_id)
        assert edit.status == "failed" and "boom" in (edit.error or "")
        assert edit.version is None and edit.finished_at is not None
        assert _same(_snapshot(bad), before)
        assert torch.equal(bad.editor.state_dict()["keys"], state["keys"])
        with infra.factory() as session:
            assert get_head(session) == head
        assert _versions(infra) == n_versions
        assert bad.process(edit_id) is None  # a finished job is not run twice
    finally:
        good.live.reset()


def test_store_failure_before_commit_changes_nothing(
    infra: Infra, loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = _worker(infra, loaded, RankOneEditor)
    try:
        before = _snapshot(worker)

        def broken_put(_tensors: object) -> tuple[str, int]:
            raise OSError("disk full")

        monkeypatch.setattr(worker.store, "put", broken_put)
        edit_id = _submit(infra, RECORDS[32])
        assert worker.process(edit_id) == "failed"
        assert "disk full" in (_edit(infra, edit_id).error or "")
        assert _same(_snapshot(worker), before)
        assert worker.editor.state_dict()["keys"].shape[0] == 0
        assert _versions(infra) == 1
    finally:
        worker.live.reset()


def test_unsuccessful_edit_is_rejected(infra: Infra, loaded: LoadedModel) -> None:
    worker = _worker(infra, loaded, UnsuccessfulEditor)
    try:
        before = _snapshot(worker)
        edit_id = _submit(infra, RECORDS[33])
        assert worker.process(edit_id) == "rejected"
        edit = _edit(infra, edit_id)
        assert "did not take" in (edit.error or "")
        assert edit.metrics is not None and edit.metrics["success"] is False
        assert edit.metrics["applied"] is False
        assert _same(_snapshot(worker), before)
        assert _versions(infra) == 1
    finally:
        worker.live.reset()


def test_edit_is_redone_when_a_rollback_moves_the_head(infra: Infra, loaded: LoadedModel) -> None:
    worker = _worker(infra, loaded, RankOneEditor)
    try:
        assert worker.process(_submit(infra, RECORDS[34])) == "applied"
        RollbackDuringEdit.infra, RollbackDuringEdit.fired = infra, False
        worker.editor = RollbackDuringEdit(loaded.model, loaded.tokenizer)
        worker.editor.load_state_dict(worker.editor_state)
        edit_id = _submit(infra, RECORDS[35])
        assert worker.process(edit_id) == "applied"
        assert RollbackDuringEdit.fired
        edit = _edit(infra, edit_id)
        with infra.factory() as session:
            version = session.get(Version, edit.version)
            assert version is not None and version.parent_id == 0  # built on the new head
            assert get_head(session) == version.id
        # the edit was computed again from the base: one key in the state, not two
        assert worker.editor.state_dict()["keys"].shape[0] == 1
    finally:
        RollbackDuringEdit.infra = None
        worker.live.reset()


def test_worker_builds_the_editor_with_the_configured_options(
    infra: Infra, loaded: LoadedModel
) -> None:
    from workers.editing.loki import LokiEditor

    def worker(options: dict[str, str]) -> EditWorker:
        settings = infra.settings.model_copy(update={"editor": "loki", "editor_options": options})
        return EditWorker(
            settings, factory=infra.factory, store=infra.store, bus=LocalBus(), loaded=loaded
        )

    editor = worker({"trim_min_prob": "0.5", "target.clamp_norm_factor": "0.4"}).editor
    assert isinstance(editor, LokiEditor)
    assert editor.config.trim_min_prob == 0.5 and editor.config.target.clamp_norm_factor == 0.4
    # a range only the editor knows stops the worker at start, naming the field
    with pytest.raises(ValueError, match="trim_min_prob"):
        worker({"trim_min_prob": "1.5"})
    with pytest.raises(ValueError, match="candidate_layers"):
        worker({"candidate_layers": "(3, 99)"})
