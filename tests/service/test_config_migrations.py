"""Settings that refuse bad values, and the migrations on Postgres and SQLite."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from app.core.config import SettingsError, load_settings
from app.db import migrate
from app.db.models import Base
from app.db.session import make_engine
from tests.service.conftest import ROOT

TABLES = {
    "edits",
    "versions",
    "version_blobs",
    "kv",
    "idempotency_keys",
    "api_keys",
    "alembic_version",
}


@pytest.mark.parametrize(
    ("field", "value", "variable", "message"),
    [
        ("database_url", "mysql://localhost/x", "LOKID_DATABASE_URL", "postgresql+psycopg://"),
        ("database_url", "postgresql://localhost/x", "LOKID_DATABASE_URL", "psycopg 3"),
        ("redis_url", "http://localhost", "LOKID_REDIS_URL", "redis://"),
        ("model", "/nonexistent/model", "LOKID_MODEL", "not a Hugging Face model directory"),
        ("device", "tpu", "LOKID_DEVICE", "auto, cpu"),
        ("dtype", "int4", "LOKID_DTYPE", "float32"),
        ("keyframe_every", 0, "LOKID_KEYFRAME_EVERY", "greater than or equal to 1"),
        ("editor", "rm -rf /", "LOKID_EDITOR", "method name"),
        ("queue_name", "a b", "LOKID_QUEUE_NAME", "pattern"),
        ("editor_options", {"trim_min_pro": 0.5}, "LOKID_EDITOR_OPTIONS", "no such setting"),
        ("editor_options", {"top_k": 1.5}, "LOKID_EDITOR_OPTIONS", "expected a int"),
        ("editor_options", {"target.lr": "fast"}, "LOKID_EDITOR_OPTIONS", "not a Python literal"),
    ],
)
def test_bad_settings_name_the_variable(
    field: str, value: object, variable: str, message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(**{field: value})
    assert variable in str(error.value) and message in str(error.value)


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKID_REDIS_URL", "redis://127.0.0.1:6379/15")
    monkeypatch.setenv("LOKID_DTYPE", "bfloat16")
    monkeypatch.setenv("LOKID_VERSION_STORE", "/tmp/somewhere")
    settings = load_settings()
    assert settings.redis_url == "redis://127.0.0.1:6379/15" and not settings.embedded
    assert settings.dtype == "bfloat16" and str(settings.version_store) == "/tmp/somewhere"
    for name in ("LOKID_REDIS_URL", "LOKID_DTYPE", "LOKID_VERSION_STORE"):
        monkeypatch.delenv(name)
    defaults = load_settings()
    assert defaults.embedded and defaults.is_sqlite
    assert defaults.database_url == "sqlite:///./var/lokid.db" and defaults.model == "bundled"
    assert str(defaults.version_store) == "var/versions"


def test_editor_options_are_json_for_the_editing_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOKID_EDITOR_OPTIONS", '{"trim_min_prob": 0.5, "target.lr": "1.5"}')
    assert load_settings().editor_options == {"trim_min_prob": "0.5", "target.lr": "1.5"}
    monkeypatch.setenv("LOKID_EDITOR_OPTIONS", "trim_min_prob=0.5")
    with pytest.raises(SettingsError, match="LOKID_EDITOR_OPTIONS: not valid JSON"):
        load_settings()
    monkeypatch.setenv("LOKID_EDITOR_OPTIONS", '{"l2": 1}')
    with pytest.raises(SettingsError, match="LOKID_EDITOR_OPTIONS: only the editing core"):
        load_settings(editor="tests.service.rank_one:RankOneEditor")


def test_cli_stops_on_a_bad_setting_with_its_name(tmp_path: Path) -> None:
    env = {**os.environ, "LOKID_DATABASE_URL": "oracle://db", "LOKID_DTYPE": "fp8"}
    result = subprocess.run(
        [str(ROOT / ".venv/bin/lokid"), "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "LOKID_DATABASE_URL" in result.stdout and "LOKID_DTYPE" in result.stdout


def _check_up_down(url: str) -> None:
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        assert migrate.pending(engine, url) is None
        with engine.connect() as conn:
            assert conn.execute(text("SELECT value FROM kv WHERE key = 'head'")).scalar() == "0"
            assert conn.execute(text("SELECT parent_id FROM versions WHERE id = 0")).one()
            # the models and the migrations describe the same schema
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diff == [], diff
        migrate.downgrade(url)
        assert set(inspect(engine).get_table_names()) == {"alembic_version"}
        assert "run `lokid db upgrade`" in (migrate.pending(engine, url) or "")
        migrate.upgrade(url)  # and up again on the same database
        assert migrate.pending(engine, url) is None
    finally:
        engine.dispose()


def test_migrations_up_and_down_on_postgres(pg_url: str) -> None:
    _check_up_down(pg_url)


def test_migrations_up_and_down_on_sqlite(tmp_path: Path) -> None:
    _check_up_down(f"sqlite:///{tmp_path}/m.db")


def test_cli_db_upgrade(pg_url: str, tmp_path: Path) -> None:
    env = {**os.environ, "LOKID_DATABASE_URL": pg_url}
    result = subprocess.run(
        [str(ROOT / ".venv/bin/lokid"), "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    engine = make_engine(pg_url)
    try:
        assert migrate.pending(engine, pg_url) is None
    finally:
        engine.dispose()
