"""API keys: stored as hashes, 401 without a valid key, 403 without the scope, the CLI, and
open mode refusing to listen beyond loopback."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from app.db import migrate
from app.db.models import ApiKey
from app.db.session import make_engine, make_session_factory
from app.services import keys
from app.services.edits import Conflict, NotFound
from tests.service.conftest import RANK_ONE, ROOT, Server, start_server
from workers.editing.model import LoadedModel

EDIT = {
    "prompt": "The Eiffel Tower is in the city of",
    "subject": "Eiffel Tower",
    "target_new": "Rome",
}


@pytest.fixture
def session(tmp_path: Path) -> Iterator[object]:
    url = f"sqlite:///{tmp_path}/keys.db"
    migrate.upgrade(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        yield s
    engine.dispose()


def test_only_the_hash_is_stored_and_revoked_keys_stop_working(session) -> None:  # type: ignore[no-untyped-def]
    row, raw = keys.create_key(session, "ci", ["edit", "edit"])
    assert raw.startswith("lokid_") and len(raw) > 40 and row.scopes == ["edit"]
    stored = session.execute(select(ApiKey.__table__)).one()
    assert all(raw not in str(value) for value in stored)  # no column holds the key
    assert row.key_hash == keys.hash_key(raw) and raw.startswith(row.prefix)
    assert keys.authenticate(session, raw).name == "ci"
    assert keys.authenticate(session, raw + "x") is None
    assert keys.authenticate(session, "nonsense") is None
    assert keys.authenticate(session, raw).last_used_at is not None
    keys.revoke_key(session, "ci")
    assert keys.authenticate(session, raw) is None
    with pytest.raises(Conflict):
        keys.create_key(session, "ci", ["edit"])  # a revoked name is not reused
    with pytest.raises(NotFound):
        keys.revoke_key(session, "nobody")
    with pytest.raises(keys.BadKeyRequest, match="unknown scope 'root'"):
        keys.create_key(session, "x", ["root"])
    with pytest.raises(keys.BadKeyRequest, match="at least one scope"):
        keys.create_key(session, "x", [])
    with pytest.raises(keys.BadKeyRequest, match="key name"):
        keys.create_key(session, "a b", ["edit"])


@pytest.fixture(scope="module")
def guarded(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[tuple[Server, dict[str, str]]]:
    server, stop = start_server(
        tmp_path_factory.mktemp("guarded"), models, editor=RANK_ONE, auth="keys"
    )
    made = {}
    with server.runtime.infra.factory() as s:
        for name, scopes in [("gen", ["generate"]), ("ed", ["edit"]), ("root", ["admin"])]:
            made[name] = keys.create_key(s, name, scopes)[1]
        made["revoked"] = keys.create_key(s, "revoked", ["admin"])[1]
        keys.revoke_key(s, "revoked")
    yield server, made
    stop()


def _bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def test_missing_or_wrong_key_is_401_json(guarded: tuple[Server, dict[str, str]]) -> None:
    server, made = guarded
    with server.client() as client:
        for headers in [{}, _bearer("lokid_wrong"), _bearer(made["revoked"]), {"X-API-Key": "x"}]:
            response = client.post("/v1/generate", json={"prompt": "Hi"}, headers=headers)
            assert response.status_code == 401, headers
            assert response.headers["www-authenticate"] == "Bearer"
            assert "API key" in response.json()["detail"]
        # liveness, readiness and metrics stay open for probes and scrapers
        for path in ("/healthz", "/readyz", "/metrics"):
            assert client.get(path).status_code == 200, path


def test_wrong_scope_is_403_json(guarded: tuple[Server, dict[str, str]]) -> None:
    server, made = guarded
    with server.client() as client:
        refused = client.post("/v1/edits", json=EDIT, headers=_bearer(made["gen"]))
        assert refused.status_code == 403
        assert "lacks the edit scope" in refused.json()["detail"]
        assert client.get("/v1/edits", headers=_bearer(made["gen"])).status_code == 403
        assert (
            client.post(
                "/v1/rollback", json={"version": 0}, headers=_bearer(made["gen"])
            ).status_code
            == 403
        )
        chat = {"model": "lokid", "messages": [{"role": "user", "content": "Hi"}]}
        assert (
            client.post("/v1/chat/completions", json=chat, headers=_bearer(made["ed"])).status_code
            == 403
        )


def test_the_right_scope_passes(guarded: tuple[Server, dict[str, str]]) -> None:
    server, made = guarded
    body = {"prompt": "Hi", "max_new_tokens": 2}
    with server.client() as client:
        assert client.post("/v1/generate", json=body, headers=_bearer(made["gen"])).is_success
        assert client.get("/v1/models", headers={"X-API-Key": made["gen"]}).is_success
        assert client.get("/v1/versions", headers=_bearer(made["gen"])).is_success
        assert client.get("/v1/versions/head", headers=_bearer(made["ed"])).is_success
        posted = client.post("/v1/edits", json=EDIT, headers={"X-API-Key": made["ed"]})
        assert posted.status_code == 202
        edit_id = posted.json()["id"]
        assert client.get(f"/v1/edits/{edit_id}", headers=_bearer(made["ed"])).is_success
        # admin holds every scope
        assert client.post("/v1/generate", json=body, headers=_bearer(made["root"])).is_success
        assert client.get("/v1/edits", headers=_bearer(made["root"])).is_success
    assert server.wait_edit(edit_id, headers=_bearer(made["ed"]))["status"] == "applied"


def _lokid(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ROOT / ".venv/bin/lokid"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_cli_creates_a_key_once_lists_and_revokes_it(tmp_path: Path) -> None:
    env = {"LOKID_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    made = _lokid(
        "keys",
        "create",
        "--scope",
        "edit",
        "--scope",
        "generate",
        "--name",
        "ci",
        env=env,
        cwd=tmp_path,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    raw = made.stdout.strip()
    assert raw.startswith("lokid_") and "\n" not in raw
    listed = _lokid("keys", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0 and "ci" in listed.stdout and "edit,generate" in listed.stdout
    assert raw not in listed.stdout and raw[:12] in listed.stdout
    again = _lokid("keys", "create", "--scope", "edit", "--name", "ci", env=env, cwd=tmp_path)
    assert again.returncode == 2 and "exists already" in again.stdout
    bad = _lokid("keys", "create", "--scope", "sudo", "--name", "x", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "unknown scope 'sudo'" in bad.stdout
    revoked = _lokid("keys", "revoke", "ci", env=env, cwd=tmp_path)
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    engine = make_engine(env["LOKID_DATABASE_URL"])
    with make_session_factory(engine)() as s:
        assert keys.authenticate(s, raw) is None
    engine.dispose()


def test_open_mode_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    env = {"LOKID_AUTH": "open", "LOKID_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    result = _lokid("serve", "--host", "0.0.0.0", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "LOKID_AUTH=open" in result.stdout and "0.0.0.0" in result.stdout
