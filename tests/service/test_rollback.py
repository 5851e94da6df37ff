"""Versions as a tree: rollback, building on an old version, rolling forward, and switching
versions without any generation seeing mixed weights."""

from __future__ import annotations

import json
import threading
import time

import torch

from app.services.versions import get_head
from tests.service.conftest import Server, as_edit, counterfact

RECORDS = counterfact()


def _generate(server: Server, prompt: str, n: int = 6) -> dict[str, object]:
    with server.client() as client:
        return client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": n}).json()


def _served_weights(server: Server) -> dict[str, torch.Tensor]:
    live = server.runtime.serving.live
    names = live.touched() | set(live.masters)
    return {n: live.params[n].detach().clone() for n in names}


def _fresh_weights(server: Server, version: int) -> dict[str, torch.Tensor]:
    """What a newly started replica would load for ``version``, straight from the store."""
    with server.runtime.infra.factory() as session:
        path = server.runtime.serving.catalog.path(session, version)
    return server.runtime.serving.live.materialiser.weights(path)


def test_rollback_tree(embedded: Server) -> None:
    a, b, c = RECORDS[20], RECORDS[21], RECORDS[22]
    with embedded.client() as client:
        start = client.get("/v1/versions/head").json()["id"]

        edit_a = embedded.wait_edit(client.post("/v1/edits", json=as_edit(a)).json()["id"])
        wait_serving(embedded, edit_a["version"])
        base_b = _generate(embedded, b["prompt"])  # b's prompt as version a answers it
        edit_b = embedded.wait_edit(client.post("/v1/edits", json=as_edit(b)).json()["id"])
        va, vb = edit_a["version"], edit_b["version"]
        assert (edit_a["status"], edit_b["status"]) == ("applied", "applied")
        assert client.get(f"/v1/versions/{vb}").json()["parent"] == va
        wait_serving(embedded, vb)
        at_b = _generate(embedded, b["prompt"])
        assert at_b["version"] == vb and b["target_new"] in at_b["text"]

        # rollback: served right after the call returns; later edits are reverted
        started = time.perf_counter()
        rolled = client.post("/v1/rollback", json={"version": va}).json()
        after = _generate(embedded, b["prompt"])
        assert time.perf_counter() - started < 5
        assert rolled["head"] == rolled["serving"] == va and rolled["previous"] == vb
        assert rolled["reverted"] == [edit_b["id"]]
        assert after["version"] == va and after["text"] == base_b["text"]
        assert client.get(f"/v1/edits/{edit_b['id']}").json()["status"] == "reverted"
        assert client.get("/v1/versions/head").json()["id"] == va

        # the next edit builds on the rolled-back head: a new branch, a new id
        edit_c = embedded.wait_edit(client.post("/v1/edits", json=as_edit(c)).json()["id"])
        vc = edit_c["version"]
        assert vc > vb
        assert client.get(f"/v1/versions/{vc}").json()["parent"] == va
        wait_serving(embedded, vc)
        assert _generate(embedded, b["prompt"])["text"] == base_b["text"]  # b stays undone

        # forward to the other branch: b applies again, c is reverted
        rolled = client.post("/v1/rollback", json={"version": vb}).json()
        assert rolled["restored"] == [edit_b["id"]] and rolled["reverted"] == [edit_c["id"]]
        assert _generate(embedded, b["prompt"])["text"] == at_b["text"]
        served = _served_weights(embedded)
        fresh = _fresh_weights(embedded, vb)
        assert served.keys() >= fresh.keys()
        for name, value in fresh.items():
            assert torch.equal(served[name], value), name

        # back to where the module started
        client.post("/v1/rollback", json={"version": start})
        statuses = {
            client.get(f"/v1/edits/{e['id']}").json()["status"] for e in (edit_a, edit_b, edit_c)
        }
        assert statuses == {"reverted"}


def wait_serving(server: Server, version: int, timeout: float = 10) -> float:
    started = time.perf_counter()
    while server.runtime.serving.version != version:
        assert time.perf_counter() - started < timeout, "serving model did not follow the head"
        time.sleep(0.01)
    return time.perf_counter() - started


def test_switch_waits_for_running_generation(embedded: Server) -> None:
    """A rollback during a streamed generation: the stream finishes on its version's weights."""
    record = RECORDS[23]
    with embedded.client() as client:
        start = client.get("/v1/versions/head").json()["id"]
        edit = embedded.wait_edit(client.post("/v1/edits", json=as_edit(record)).json()["id"])
        version = edit["version"]
        wait_serving(embedded, version)
        body = {"prompt": record["prompt"], "max_new_tokens": 40}
        expected = client.post("/v1/generate", json=body).json()

        texts: list[str] = []
        versions: set[int] = set()
        first_token = threading.Event()

        def consume() -> None:
            with (
                embedded.client() as streamer,
                streamer.stream("POST", "/v1/generate", json=body | {"stream": True}) as response,
            ):
                for line in response.iter_lines():
                    if line.startswith("data:"):
                        data = json.loads(line[5:])
                        versions.add(data["version"])
                        if "usage" not in data:
                            texts.append(data["text"])
                            first_token.set()

        thread = threading.Thread(target=consume)
        thread.start()
        assert first_token.wait(60)
        rolled = client.post("/v1/rollback", json={"version": start}).json()
        thread.join(120)
        assert versions == {version}
        assert "".join(texts) == expected["text"]  # no token came from the other weights
        assert rolled["serving"] == start
        assert client.post("/v1/generate", json=body).json()["version"] == start


def test_worker_follows_rollbacks(embedded: Server) -> None:
    """After a rollback the worker rebuilds weights and editor state from the new head."""
    worker = embedded.runtime.worker
    with embedded.client() as client:
        start = client.get("/v1/versions/head").json()["id"]
        posted = client.post("/v1/edits", json=as_edit(RECORDS[24])).json()
        first = embedded.wait_edit(posted["id"])
        keys_after_first = worker.editor.state_dict()["keys"].shape[0]  # type: ignore[union-attr]
        client.post("/v1/rollback", json={"version": start})
        posted = client.post("/v1/edits", json=as_edit(RECORDS[25])).json()
        second = embedded.wait_edit(posted["id"])
    assert second["status"] == "applied"
    with embedded.runtime.infra.factory() as session:
        assert get_head(session) == second["version"]
    # editor state went back to the start version's before growing by one edit again
    assert worker.editor.state_dict()["keys"].shape[0] == keys_after_first  # type: ignore[union-attr]
    assert worker.live.version == second["version"]
    wait_serving(embedded, second["version"])
    for name, value in _fresh_weights(embedded, second["version"]).items():
        assert torch.equal(worker.live.params[name].detach(), value), name
    assert first["version"] != second["version"]
