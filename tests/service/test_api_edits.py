"""The edits API on an embedded server: bad inputs, idempotency, pagination, batches, SSE."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.service.conftest import Server, as_edit, counterfact

RECORDS = counterfact()


def _edit(i: int) -> dict[str, object]:
    return as_edit(RECORDS[i])


@pytest.mark.parametrize(
    ("body", "field", "message"),
    [
        ({"subject": "Paris", "target_new": "Rome"}, "prompt", "Field required"),
        (
            {"prompt": "The capital is", "subject": "Paris", "target_new": "Rome"},
            "prompt",
            "must contain the subject",
        ),
        (
            {"prompt": "Paris is in", "subject": "Paris", "target_new": ""},
            "target_new",
            "at least 1 character",
        ),
        (
            {
                "prompt": "Paris is in",
                "subject": "Paris",
                "target_new": "France",
                "ground_truth": "France",
            },
            "target_new",
            "nothing to change",
        ),
        (
            {"prompt": "Paris is in", "subject": " Paris", "target_new": "Italy"},
            "subject",
            "whitespace",
        ),
        (
            {"prompt": "Paris is in", "subject": "Paris", "target_new": "Italy", "colour": "red"},
            "colour",
            "Extra inputs are not permitted",
        ),
        (
            {"prompt": "{} and {} are in", "subject": "Paris", "target_new": "Italy"},
            "prompt",
            "more than one",
        ),
        (
            {"prompt": "Paris is in", "subject": "Paris", "target_new": 7},
            "target_new",
            "valid string",
        ),
    ],
)
def test_bad_edits_are_refused_naming_the_field(
    embedded: Server, body: dict[str, object], field: str, message: str
) -> None:
    with embedded.client() as client:
        response = client.post("/v1/edits", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert any(d["loc"][-1] == field and message in d["msg"] for d in detail), detail


def test_malformed_requests(embedded: Server) -> None:
    with embedded.client() as client:
        bad_json = client.post(
            "/v1/edits", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert bad_json.status_code == 422 and "detail" in bad_json.json()
        assert client.get("/v1/edits/999999").status_code == 404
        assert client.get("/v1/edits/999999").json() == {"detail": "edit 999999 does not exist"}
        assert client.get("/v1/edits?limit=0").status_code == 422
        assert client.get("/v1/edits?status=done").status_code == 422
        assert client.get("/v1/versions/424242").status_code == 404
        assert client.post("/v1/rollback", json={"version": 424242}).status_code == 404
        assert client.post("/v1/rollback", json={"version": -1}).status_code == 422
        too_many = {"edits": [_edit(0)] * 101}
        response = client.post("/v1/edits/batch", json=too_many)
        assert response.status_code == 422
        assert "at most 100" in json.dumps(response.json()["detail"])
        bad_item = {"edits": [_edit(0), {**_edit(1), "subject": "Nobody"}]}
        response = client.post("/v1/edits/batch", json=bad_item)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["body", "edits", 1, "prompt"]
        assert client.post("/v1/edits/batch", json={"edits": []}).status_code == 422


def test_idempotency_key_returns_the_same_edit(embedded: Server) -> None:
    key = str(uuid.uuid4())
    with embedded.client() as client:
        first = client.post("/v1/edits", json=_edit(1), headers={"Idempotency-Key": key})
        again = client.post("/v1/edits", json=_edit(1), headers={"Idempotency-Key": key})
        other = client.post("/v1/edits", json=_edit(2), headers={"Idempotency-Key": key})
        fresh = client.post("/v1/edits", json=_edit(1), headers={"Idempotency-Key": key + "x"})
        assert first.status_code == again.status_code == 202
        assert again.json()["id"] == first.json()["id"]
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert other.status_code == 409 and "different request" in other.json()["detail"]
        assert fresh.json()["id"] != first.json()["id"]

        batch_key = str(uuid.uuid4())
        body = {"edits": [_edit(3), _edit(4)]}
        b1 = client.post("/v1/edits/batch", json=body, headers={"Idempotency-Key": batch_key})
        b2 = client.post("/v1/edits/batch", json=body, headers={"Idempotency-Key": batch_key})
        assert b1.status_code == b2.status_code == 202
        assert [e["id"] for e in b1.json()["edits"]] == [e["id"] for e in b2.json()["edits"]]
        # the same key on another endpoint is another request
        cross = client.post("/v1/edits", json=_edit(3), headers={"Idempotency-Key": batch_key})
        assert cross.status_code == 409
    for edit in [first.json(), fresh.json(), *b1.json()["edits"]]:
        embedded.wait_edit(edit["id"])


def test_batch_is_one_job_and_one_version(embedded: Server) -> None:
    with embedded.client() as client:
        response = client.post("/v1/edits/batch", json={"edits": [_edit(5), _edit(6)]})
        assert response.status_code == 202
        body = response.json()
        ids = [e["id"] for e in body["edits"]]
        assert body["batch_id"] == ids[0] and body["status"] == "queued"
        finished = [embedded.wait_edit(i) for i in ids]
        assert {e["status"] for e in finished} == {"applied"}, finished
        version = finished[0]["version"]
        assert {e["version"] for e in finished} == {version}
        detail = client.get(f"/v1/versions/{version}").json()
        assert detail["edit_ids"] == ids
        assert detail["bytes_stored"] == sum(b["bytes"] for b in detail["blobs"])
        assert {b["kind"] for b in detail["blobs"]} >= {"delta", "state"}
        assert all(len(b["sha256"]) == 64 for b in detail["blobs"])


def test_list_is_newest_first_and_paginates(embedded: Server) -> None:
    with embedded.client() as client:
        created = [client.post("/v1/edits", json=_edit(7 + i)).json()["id"] for i in range(3)]
        seen: list[int] = []
        before = None
        while True:
            params = {"limit": 2} | ({"before": before} if before else {})
            page = client.get("/v1/edits", params=params).json()
            seen += [e["id"] for e in page["data"]]
            assert len(page["data"]) <= 2
            before = page["next_before"]
            if before is None:
                break
        assert seen == sorted(seen, reverse=True)
        assert len(seen) == len(set(seen))
        assert set(created) <= set(seen)
        for edit_id in created:
            embedded.wait_edit(edit_id)
        applied = client.get("/v1/edits", params={"status": "applied", "limit": 500}).json()
        assert set(created) <= {e["id"] for e in applied["data"]}
        assert {e["status"] for e in applied["data"]} == {"applied"}
        queued = client.get("/v1/edits", params={"status": "queued"}).json()["data"]
        assert not set(created) & {e["id"] for e in queued}


def _sse_events(response: httpx.Response) -> list[tuple[str, dict[str, object]]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, json.loads(line.split(":", 1)[1])))
            name = "message"
    return events


def test_edit_events_stream_status_changes_until_terminal(embedded: Server) -> None:
    with embedded.client() as client:
        edit = client.post("/v1/edits", json=_edit(10)).json()
        with client.stream("GET", f"/v1/edits/{edit['id']}/events") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _sse_events(response)
        statuses = [data["status"] for _, data in events]
        assert {name for name, _ in events} == {"status"}
        assert statuses[-1] == "applied", statuses
        assert statuses == list(dict.fromkeys(statuses))  # one event per change
        assert set(statuses) <= {"queued", "running", "applied"}
        assert events[-1][1]["version"] is not None
        # on a finished edit: one event, then the stream ends
        with client.stream("GET", f"/v1/edits/{edit['id']}/events") as response:
            assert [d["status"] for _, d in _sse_events(response)] == ["applied"]
        assert client.get("/v1/edits/424242/events").status_code == 404


def test_requeue_of_a_reverted_edit(embedded: Server) -> None:
    with embedded.client() as client:
        head = client.get("/v1/versions/head").json()["id"]
        edit = embedded.wait_edit(client.post("/v1/edits", json=_edit(11)).json()["id"])
        assert edit["status"] == "applied"
        assert client.post(f"/v1/edits/{edit['id']}/requeue").status_code == 409
        rolled = client.post("/v1/rollback", json={"version": head}).json()
        assert edit["id"] in rolled["reverted"]
        again = client.post(f"/v1/edits/{edit['id']}/requeue")
        assert again.status_code == 202
        redone = embedded.wait_edit(again.json()["id"])
        assert redone["status"] == "applied" and redone["request"] == edit["request"]
        assert client.get(f"/v1/versions/{redone['version']}").json()["parent"] == head
