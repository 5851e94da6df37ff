"""The user's walk in the embedded mode (SQLite, in-process queue and worker) with LOKI:
POST a CounterFact edit, wait for it, ask /v1/completions, roll back, ask again."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.service.conftest import Server, as_edit, counterfact, start_server, wait_for
from workers.editing.model import LoadedModel

RECORD = counterfact()[0]  # "Toko Yasuda, the" guitar → piano


@pytest.fixture(scope="module")
def loki_server(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[Server]:
    server, stop = start_server(tmp_path_factory.mktemp("e2e"), models, editor="loki")
    yield server
    stop()


def test_edit_serve_rollback_walk_embedded(loki_server: Server) -> None:
    ai = openai.OpenAI(base_url=f"{loki_server.url}/v1", api_key="unused", max_retries=0)
    model = ai.models.list().data[0].id

    def ask() -> tuple[str, str | None]:
        out = ai.completions.create(
            model=model, prompt=RECORD["prompt"], max_tokens=8, temperature=0
        )
        return out.choices[0].text, out.system_fingerprint

    before, fingerprint = ask()
    assert fingerprint == "v0" and RECORD["target_new"] not in before

    with loki_server.client() as client:
        posted = client.post("/v1/edits", json=as_edit(RECORD))
        assert posted.status_code == 202 and posted.json()["status"] == "queued"
        edit = loki_server.wait_edit(posted.json()["id"])
        assert edit["status"] == "applied", edit
        assert edit["metrics"]["method"] == "loki" and edit["layers"]
        version = edit["version"]
        stored = client.get(f"/v1/versions/{version}").json()
        assert stored["parent"] == 0 and stored["edit_ids"] == [edit["id"]]

    # the worker announces the head after its commit; the server follows within moments
    def served() -> str | None:
        text, fingerprint = ask()
        return text if fingerprint == f"v{version}" else None

    after = wait_for(served, 10, f"v{version} to be served", every=0.05)
    assert after.strip().startswith(RECORD["target_new"]), after

    with loki_server.client() as client:
        rolled = client.post("/v1/rollback", json={"version": 0}).json()
        assert rolled["serving"] == 0 and rolled["reverted"] == [edit["id"]]
    again, fingerprint = ask()
    assert fingerprint == "v0" and again == before
