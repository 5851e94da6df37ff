"""/v1/admin/* and /admin: refused without an admin key or session (even with LOKID_AUTH=open),
the JSON views after a real edit, login with CSRF, metrics and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.responses import Response

from app.api.admin_auth import set_cookie
from app.core.config import load_settings
from app.core.logs import JsonFormatter
from app.services import keys
from app.services.admin_sessions import SessionCodec, new_session
from tests.service.conftest import GUARDED, RANK_ONE, Server, as_edit, counterfact, start_server
from workers.editing.model import LoadedModel

RECORD = counterfact()[50]


@pytest.fixture(scope="module")
def admin_server(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[tuple[Server, dict[str, str]]]:
    tmp = tmp_path_factory.mktemp("admin")
    server, stop = start_server(tmp, models, editor=RANK_ONE, heartbeat_interval=0.5, **GUARDED)
    made = {}
    with server.runtime.infra.factory() as session:
        made["admin"] = keys.create_key(session, "root", ["admin"])[1]
        made["edit"] = keys.create_key(session, "editor", ["edit"])[1]
    yield server, made
    stop()


def bearer(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


ADMIN_JSON = [
    "/v1/admin/overview",
    "/v1/admin/edits",
    "/v1/admin/edits/1",
    "/v1/admin/versions",
    "/v1/admin/versions/diff?a=0&b=0",
    "/v1/admin/health",
]
ADMIN_PAGES = ["/admin", "/admin/edits", "/admin/versions", "/admin/playground", "/admin/health"]


def test_unauthenticated_requests_are_refused(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, made = admin_server
    assert server.settings.auth == "open"  # the rest of the API is open; the admin side is not
    with server.client() as client:
        for path in ADMIN_JSON:
            response = client.get(path)
            assert response.status_code == 401, path
            assert "admin authentication required" in response.json()["detail"]
            wrong = client.get(path, headers=bearer(made["edit"]))
            assert wrong.status_code == 403 and "lacks the admin scope" in wrong.json()["detail"]
        posted = client.post("/v1/admin/playground", json={"prompt": "x", "version": 0})
        assert posted.status_code == 401
        for path in ADMIN_PAGES:
            page = client.get(path)
            assert page.status_code == 303, path
            assert page.headers["location"] == f"/admin/login?next={path}"
        # htmx polling from a page whose session ended: told to go to the login page
        fragment = client.get("/admin/fragments/overview", headers={"HX-Request": "true"})
        assert fragment.status_code == 401 and fragment.headers["HX-Redirect"].startswith(
            "/admin/login"
        )
    with server.client() as client:
        client.cookies.set("lokid_admin", "forged.value.sig")
        assert client.get("/admin").status_code == 303


def _wait_applied(server: Server, client: httpx.Client, record: dict[str, Any]) -> dict[str, Any]:
    posted = client.post("/v1/edits", json=as_edit(record))
    assert posted.status_code == 202, posted.text
    edit = server.wait_edit(posted.json()["id"])
    assert edit["status"] == "applied", edit
    return edit


def test_admin_json_after_an_edit(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, made = admin_server
    with server.client(bearer(made["admin"])) as client:
        edit = _wait_applied(server, client, RECORD)
        version = edit["version"]

        overview = client.get("/v1/admin/overview").json()
        assert overview["head"] == version and overview["queue_depth"] == 0
        assert overview["base_model"] and overview["worker"]["alive"] is True
        assert overview["worker"]["state"] == "idle"
        assert overview["edits"]["hour"]["applied"] >= 1
        assert overview["median_edit_seconds"] > 0
        assert overview["head_health"]["canary_accuracy"] > 0.5
        client.post("/v1/generate", json={"prompt": RECORD["prompt"], "max_new_tokens": 4})
        generation = client.get("/v1/admin/overview").json()["generation"]["last_5m"]
        assert generation["requests"] >= 1 and generation["tokens_per_second"] > 0

        found = client.get("/v1/admin/edits", params={"q": RECORD["subject"].upper()}).json()
        assert [e["id"] for e in found["data"]] == [edit["id"]]
        by_target = client.get("/v1/admin/edits", params={"q": RECORD["target_new"]}).json()
        assert edit["id"] in [e["id"] for e in by_target["data"]]
        none = client.get("/v1/admin/edits", params={"status": "failed"}).json()
        assert none["data"] == [] and none["next_before"] is None
        assert client.get("/v1/admin/edits", params={"q": "50%_"}).json()["data"] == []

        detail = client.get(f"/v1/admin/edits/{edit['id']}").json()
        assert [h["status"] for h in detail["history"]] == ["queued", "running", "applied"]
        assert detail["layer_scores"][0]["layer"] == 4 and detail["delta_norm"]
        assert detail["steps"] >= 1 and detail["seconds"] > 0
        assert detail["probe"]["after"]["efficacy"] is True
        assert detail["probe"]["before"]["generation"] != detail["probe"]["after"]["generation"]

        tree = client.get("/v1/admin/versions").json()
        assert tree["head"] == version and tree["head_path"] == [0, version]
        diff = client.get("/v1/admin/versions/diff", params={"a": 0, "b": version}).json()
        assert diff["common_ancestor"] == 0 and diff["only_in_a"] == []
        assert diff["only_in_b"] == [{"version": version, "edit_ids": [edit["id"]]}]
        assert [m["name"] for m in diff["matrices"]] == ["model.layers.4.mlp.down_proj.weight"]
        assert diff["matrices"][0]["norm"] > 0

        points = client.get("/v1/admin/health").json()["points"]
        assert [p["version"] for p in points] == [0, version]
        assert all(p["on_head_path"] for p in points)

        compared = client.post(
            "/v1/admin/playground",
            json={"prompt": RECORD["prompt"], "version": 0, "max_new_tokens": 4},
        ).json()
        assert compared["head"]["version"] == version and compared["other"]["version"] == 0
        assert compared["head"]["text"].strip().startswith(RECORD["target_new"])
        assert not compared["other"]["text"].strip().startswith(RECORD["target_new"])
        # borrowing v0 for the comparison left the served head as it was
        again = client.post("/v1/generate", json={"prompt": RECORD["prompt"], "max_new_tokens": 4})
        assert again.json()["text"] == compared["head"]["text"]


def test_bad_admin_input_is_4xx_json(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, made = admin_server
    with server.client(bearer(made["admin"])) as client:
        missing = client.get("/v1/admin/versions/diff", params={"a": 0, "b": 999})
        assert missing.status_code == 404 and "version 999" in missing.json()["detail"]
        assert client.get("/v1/admin/edits/999999").status_code == 404
        for path in (f"/v1/admin/edits/{2**70}", f"/v1/admin/versions/diff?a=0&b={2**70}"):
            assert client.get(path).status_code == 422, path  # not a 64-bit overflow (500)
        bad = client.get("/v1/admin/edits", params={"status": "done"})
        assert bad.status_code == 422
        for body in (
            {"prompt": "", "version": 0},
            {"prompt": "x", "version": 0, "max_new_tokens": 999},
        ):
            refused = client.post("/v1/admin/playground", json=body)
            assert refused.status_code == 422, body
        nowhere = client.post("/v1/admin/playground", json={"prompt": "x", "version": 999})
        assert nowhere.status_code == 404


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', html)
    assert found, html[:500]
    return found.group(1)


def test_login_session_and_csrf(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, made = admin_server
    with server.client() as client:
        page = client.get("/admin/login")
        assert page.status_code == 200
        cookie = page.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "secure" not in cookie
        token = _csrf(page.text)
        no_csrf = client.post("/admin/login", data={"key": made["admin"]})
        assert no_csrf.status_code == 403 and "CSRF" in no_csrf.json()["detail"]
        wrong = client.post("/admin/login", data={"key": "lokid_nope", "csrf_token": token})
        assert wrong.status_code == 401 and "not recognised" in wrong.text
        weak = client.post("/admin/login", data={"key": made["edit"], "csrf_token": token})
        assert weak.status_code == 403 and "lacks the admin scope" in weak.text
        before = client.cookies["lokid_admin"]
        good = client.post(
            "/admin/login", data={"key": made["admin"], "csrf_token": token, "next": "/admin/edits"}
        )
        assert good.status_code == 303 and good.headers["location"] == "/admin/edits"
        assert client.cookies["lokid_admin"] != before  # a new session id after login
        evil = client.post(
            "/admin/login", data={"key": made["admin"], "csrf_token": token, "next": "https://x"}
        )
        assert evil.status_code == 403  # the old token belonged to the old session

        page = client.get("/admin/edits")
        assert page.status_code == 200 and "Submit an edit" in page.text
        token = _csrf(page.text)
        form = {"prompt": RECORD["prompt"], "subject": RECORD["subject"], "target_new": "Oslo"}
        assert client.post("/admin/edits", data=form).status_code == 403
        assert client.post("/admin/edits", data={**form, "csrf_token": "0" * 64}).status_code == 403
        sent = client.post("/admin/edits", data=form, headers={"X-CSRF-Token": token})
        assert sent.status_code == 202 and 'data-status="queued"' in sent.text
        bad = client.post(
            "/admin/edits", data={**form, "subject": "Nobody"}, headers={"X-CSRF-Token": token}
        )
        assert bad.status_code == 422 and "prompt: must contain the subject" in bad.text
        head = client.get("/v1/versions/head").json()["id"]
        assert client.post(f"/admin/versions/{head}/rollback").status_code == 403  # no CSRF
        refused = client.post(f"/admin/versions/{head}/rollback", data={"csrf_token": token})
        assert refused.status_code == 409 and "is the head already" in refused.text
        # the session also opens /v1/admin/* (reads freely, writes with the CSRF header)
        assert client.get("/v1/admin/overview").status_code == 200
        body = {"prompt": "x", "version": 0, "max_new_tokens": 1}
        assert client.post("/v1/admin/playground", json=body).status_code == 403
        ok = client.post("/v1/admin/playground", json=body, headers={"X-CSRF-Token": token})
        assert ok.status_code == 200

        lines = "\n".join(json.dumps(as_edit(r)) for r in counterfact()[60:62])
        upload = client.post(
            "/admin/edits/batch",
            files={"file": ("edits.jsonl", io.BytesIO(lines.encode()), "application/x-ndjson")},
            headers={"X-CSRF-Token": token},
        )
        assert upload.status_code == 202 and upload.text.count('data-status="queued"') == 2
        junk = client.post(
            "/admin/edits/batch",
            files={"file": ("x.json", io.BytesIO(b'[{"prompt": 1}]'), "application/json")},
            headers={"X-CSRF-Token": token},
        )
        assert junk.status_code == 422 and "edits.0.prompt" in junk.text

        out = client.post("/admin/logout", data={"csrf_token": token})
        assert out.status_code == 303
        assert client.get("/admin").status_code == 303


def test_revoking_the_key_ends_its_sessions(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, _ = admin_server
    with server.runtime.infra.factory() as session:
        raw = keys.create_key(session, "leaving", ["admin"])[1]
    with server.client() as client:
        token = _csrf(client.get("/admin/login").text)
        assert (
            client.post("/admin/login", data={"key": raw, "csrf_token": token}).status_code == 303
        )
        assert client.get("/admin").status_code == 200
        with server.runtime.infra.factory() as session:
            keys.revoke_key(session, "leaving")
        assert client.get("/admin").status_code == 303
        assert client.get("/v1/admin/overview").status_code == 401


def test_secure_cookie_setting() -> None:
    def cookie(secure: bool) -> str:
        settings = load_settings(cookie_secure=secure)
        state = SimpleNamespace(
            admin_sessions=SessionCodec(b"s" * 32, 3600), runtime=SimpleNamespace(settings=settings)
        )
        response = Response()
        set_cookie(SimpleNamespace(app=SimpleNamespace(state=state)), response, new_session(1))  # type: ignore[arg-type]
        return response.headers["set-cookie"].lower()

    assert "; secure" in cookie(True) and "; secure" not in cookie(False)
    assert "httponly" in cookie(True) and "samesite=strict" in cookie(True)


def test_metrics_and_json_logs(admin_server: tuple[Server, dict[str, str]]) -> None:
    server, _ = admin_server
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("workers.worker")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with server.client() as client:
            posted = client.post("/v1/edits", json=as_edit(counterfact()[51]))
            edit = server.wait_edit(posted.json()["id"])
            head = client.get("/v1/versions/head").json()["id"]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    about = [json.loads(line) for line in lines if f"edit job {edit['id']} " in line]
    assert len(about) >= 2, lines
    for line in about:
        assert line["edit_id"] == edit["id"] and isinstance(line["version"], int), line
    # the last line names the version the edit made, or (rejected) the one it was based on
    assert about[-1]["version"] == (edit["version"] if edit["status"] == "applied" else head)

    with server.client() as client:
        text = client.get("/metrics").text
    for name in (
        "lokid_queue_depth 0",
        f"lokid_head_version {head}",
        "lokid_model_canary_accuracy ",
        "lokid_model_perplexity ",
        'lokid_edits_finished_total{status="applied"}',
        "lokid_edit_seconds_bucket",
        "lokid_generation_seconds_bucket",
        "lokid_generation_tokens_per_second_bucket",
        "lokid_worker_heartbeat_age_seconds ",
    ):
        assert name in text, name
