"""The edit guard: an edit that damages canary facts or fixed-text perplexity is rejected with
the reason, and weights, editor state and head stay bit for bit as they were; health is stored
per version."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from app.core.config import SettingsError, load_settings
from app.db.models import Edit, Version
from app.runtime import Infra
from app.services.versions import get_head
from tests.service.rank_one import RankOneEditor, ScramblingEditor
from tests.service.test_worker import (
    RECORDS,
    _edit,
    _same,
    _snapshot,
    _submit,
    _versions,
    _worker,
    infra,  # noqa: F401  (fixture)
    loaded,  # noqa: F401  (fixture)
)
from workers.editing.health import Health, guard_problem, load_canaries
from workers.editing.model import LoadedModel
from workers.worker import EditWorker


def _rejected_without_a_trace(
    infra: Infra,  # noqa: F811
    worker: EditWorker,
    record: dict[str, Any],
) -> Edit:
    """Runs ``record``'s edit, expects ``rejected``, and checks nothing changed, bit for bit."""
    before = _snapshot(worker)
    edit_id = _submit(infra, record)
    assert worker.process(edit_id) == "rejected"
    edit = _edit(infra, edit_id)
    assert edit.version is None
    assert _same(_snapshot(worker), before)
    assert worker.editor.state_dict()["keys"].shape[0] == 0
    with infra.factory() as session:
        assert get_head(session) == 0
    assert _versions(infra) == 1
    return edit


def test_scrambling_edit_is_rejected_and_changes_nothing(
    infra: Infra,  # noqa: F811
    loaded: LoadedModel,  # noqa: F811
) -> None:
    worker = _worker(infra, loaded, ScramblingEditor)
    try:
        assert worker.health_at(0).canary_accuracy == 1.0  # the shipped canaries: facts it knows
        edit = _rejected_without_a_trace(infra, worker, RECORDS[40])
        assert (edit.error or "").startswith("edit guard: edit broke"), edit.error
        assert edit.metrics is not None
        assert edit.metrics["health"]["after"]["canary_accuracy"] < 0.75
    finally:
        worker.live.reset()


def test_strict_perplexity_bound_rejects_a_real_edit(
    infra: Infra,  # noqa: F811
    loaded: LoadedModel,  # noqa: F811
) -> None:
    worker = _worker(infra, loaded, RankOneEditor)
    # ×1.0 allows no rise at all; the rank-one edit nudges perplexity up on this text
    strict = {"guard_max_perplexity_ratio": 1.0, "guard_max_canaries_broken": 1.0}
    worker.settings = worker.settings.model_copy(update=strict)
    try:
        edit = _rejected_without_a_trace(infra, worker, RECORDS[41])
        assert "edit guard: edit raised fixed-text perplexity" in (edit.error or ""), edit.error
    finally:
        worker.live.reset()


def test_applied_edit_stores_health_and_probes(
    infra: Infra,  # noqa: F811
    loaded: LoadedModel,  # noqa: F811
) -> None:
    worker = _worker(infra, loaded, RankOneEditor)
    try:
        worker.health_at(0)
        edit_id = _submit(infra, RECORDS[42])
        assert worker.process(edit_id) == "applied"
        edit = _edit(infra, edit_id)
        with infra.factory() as session:
            base, new = session.get(Version, 0), session.get(Version, edit.version)
            assert base is not None and new is not None
            assert base.health is not None and base.health["canary_accuracy"] == 1.0
            assert new.health is not None and new.health["perplexity"] > 1
        probe = edit.metrics["probe"]  # type: ignore[index]
        assert probe["before"]["efficacy"] is False and probe["after"]["efficacy"] is True
        assert probe["after"]["generation"].strip().startswith(RECORDS[42]["target_new"])
        assert probe["after"]["target_logprob"] > probe["before"]["target_logprob"]
    finally:
        worker.live.reset()


def test_guard_rule() -> None:
    before = Health(1.0, (True, True, True, True), 10.0)
    assert guard_problem(before, before, max_canaries_broken=0.0, max_perplexity_ratio=1.0) is None
    one_broken = Health(0.75, (True, False, True, True), 10.0)
    rule = {"max_canaries_broken": 0.25, "max_perplexity_ratio": 1.1}
    assert guard_problem(before, one_broken, **rule) is None  # 25% is allowed, not more
    two_broken = Health(0.5, (False, False, True, True), 10.0)
    assert "broke 2 of 4 canary facts" in (guard_problem(before, two_broken, **rule) or "")
    worse = Health(1.0, before.canaries_correct, 11.5)
    assert "×1.150 > ×1.100" in (guard_problem(before, worse, **rule) or "")


def test_canary_setting_refuses_a_bad_file(tmp_path: Path) -> None:
    assert len(load_canaries()) >= 16
    bad = tmp_path / "canaries.json"
    bad.write_text(json.dumps([{"prompt": "x"}]))
    with pytest.raises(SettingsError, match=r"LOKID_CANARIES: .*item 0 needs"):
        load_settings(canaries=bad)
    with pytest.raises(SettingsError, match="LOKID_GUARD_MAX_PERPLEXITY_RATIO"):
        load_settings(guard_max_perplexity_ratio=0.5)
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"prompt": "The capital of France is", "answer": "Paris"}]))
    assert load_settings(canaries=good).canaries_path == good
