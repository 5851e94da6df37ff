"""Bad input anywhere is a 4xx with a message, never a 5xx: bytes that are not UTF-8, control
characters, huge numbers, the current head as a rollback target, a target the model already
answers; and a schemathesis fuzz of every operation in the OpenAPI schema."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable

from tests.service.conftest import RANK_ONE, Server, as_edit, counterfact, start_server
from workers.editing.model import LoadedModel

HUGE = 2**70
CHAT = {"model": "lokid", "messages": [{"role": "user", "content": "Hi"}]}


def _refused(response, status: int = 422) -> str:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail, response.text
    return str(detail)


def test_bytes_that_are_not_json_or_not_utf8(embedded: Server) -> None:
    json_type = {"content-type": "application/json"}
    with embedded.client() as client:
        for body in (b'{"prompt": "\xff\xfe caf\xe9"}', b"\x00\x01", b"[1, 2]", b'"text"', b""):
            for path in ("/v1/generate", "/v1/edits", "/v1/rollback"):
                response = client.post(path, content=body, headers=json_type)
                assert response.status_code in (400, 422), (path, body, response.text)
                assert response.json()["detail"]
        undecodable = client.post("/v1/edits", content=b'{"prompt": "caf\xe9"}', headers=json_type)
        assert "not valid JSON in UTF-8" in _refused(undecodable, 400)
        assert "valid dictionary" in _refused(client.post("/v1/edits", content=b"[1]"))


def test_control_characters_are_refused_everywhere(embedded: Server) -> None:
    edit = as_edit(counterfact()[0])
    with embedded.client() as client:
        for path, body in [
            ("/v1/generate", {"prompt": "Hello\x00world"}),
            ("/v1/generate", {"prompt": "Hi", "stop": ["\x1b"]}),
            ("/v1/completions", {"model": "lokid", "prompt": "a\x07b"}),
            ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "\x7f"}]}),
            ("/v1/edits", {**edit, "target_new": "Rome\x00"}),
            ("/v1/edits", {**edit, "prompt": edit["prompt"] + "\x08"}),
        ]:
            assert "control characters" in _refused(client.post(path, json=body)), body
        # tabs and newlines are text
        ok = client.post("/v1/generate", json={"prompt": "Hi\tthere\n", "max_new_tokens": 1})
        assert ok.status_code == 200


def test_huge_numbers_are_422_not_overflows(embedded: Server) -> None:
    with embedded.client() as client:
        for path in (
            f"/v1/edits/{HUGE}",
            f"/v1/edits?before={HUGE}",
            f"/v1/versions/{HUGE}",
            f"/v1/versions?before={HUGE}",
            f"/v1/edits/{HUGE}/events",
        ):
            _refused(client.get(path))
        _refused(client.post(f"/v1/edits/{HUGE}/requeue"))
        _refused(client.post("/v1/rollback", json={"version": HUGE}))
        _refused(client.post("/v1/generate", json={"prompt": "x", "seed": HUGE}))
        _refused(client.post("/v1/generate", json={"prompt": "x", "max_new_tokens": HUGE}))
        _refused(client.post("/v1/generate", json={"prompt": "x", "temperature": 1e308}))
        _refused(
            client.post(
                "/v1/completions", json={"model": "lokid", "prompt": "x", "max_tokens": 10**40}
            )
        )
        # just inside the bounds: not found, not a crash
        assert client.get(f"/v1/edits/{2**63 - 1}").status_code == 404


def test_rollback_to_the_head_is_409(embedded: Server) -> None:
    with embedded.client() as client:
        head = client.get("/v1/versions/head").json()["id"]
        assert "is the head already" in _refused(
            client.post("/v1/rollback", json={"version": head}), 409
        )


def test_a_target_the_model_already_answers_is_rejected(embedded: Server) -> None:
    prompt = "The Eiffel Tower is located in the city of"
    with embedded.client() as client:
        said = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 4}).json()
        answer = re.match(r"\s*(\w+)", said["text"]).group(1)  # type: ignore[union-attr]
        body = {"prompt": prompt, "subject": "Eiffel Tower", "target_new": answer}
        posted = client.post("/v1/edits", json=body).json()
        head = client.get("/v1/versions/head").json()["id"]
    done = embedded.wait_edit(posted["id"])
    assert done["status"] == "rejected" and done["version"] is None
    assert f"{answer!r} is already the model's greedy answer" in done["error"]
    with embedded.client() as client:
        assert client.get("/v1/versions/head").json()["id"] == head


# -- schemathesis: every operation of the OpenAPI schema, zero 5xx -------------------------


@pytest.fixture(scope="module")
def fuzzed(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[Server]:
    # Few new tokens so generation cases stay fast; no rate limit so every case is exercised.
    server, stop = start_server(
        tmp_path_factory.mktemp("fuzzed"),
        models,
        editor=RANK_ONE,
        max_new_tokens=4,
        rate_limit="off",
    )
    yield server
    stop()


def test_fuzz_openapi_no_server_errors(fuzzed: Server) -> None:
    """Valid and invalid cases for every operation; a 5xx anywhere fails with its case."""
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14, [op.label for op in operations]
    failures: list[str] = []
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in schemathesis.GenerationMode:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=8,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def exercise(case: schemathesis.Case) -> None:
                response = case.call(base_url=fuzzed.url, timeout=60)
                statuses[response.status_code] += 1
                if response.status_code >= 500:
                    failures.append(
                        f"{case.method} {case.formatted_path} {case.body!r:.200} "
                        f"-> {response.status_code} {response.text[:200]}"
                    )

            try:
                exercise()
            except Unsatisfiable:  # no way to make an invalid request (no parameters, no body)
                assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
    assert not failures, "\n".join(failures)
    # the fuzz reached the handlers, not only the validation in front of them
    assert sum(statuses.values()) >= 150 and statuses[200] + statuses[202] >= 30, statuses
    print("fuzz statuses:", dict(sorted(statuses.items())))
