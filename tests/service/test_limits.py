"""Request limits (body bytes, tokens, batch size, new tokens) and per-key rate limits."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from app.core.config import SettingsError, load_settings
from app.services import keys
from tests.service.conftest import RANK_ONE, Server, start_server
from workers.editing.model import LoadedModel

EDIT = {"prompt": "Paris is the capital of", "subject": "Paris", "target_new": "Italy"}


@pytest.fixture(scope="module")
def limited(
    tmp_path_factory: pytest.TempPathFactory, models: tuple[LoadedModel, LoadedModel]
) -> Iterator[tuple[Server, dict[str, str]]]:
    server, stop = start_server(
        tmp_path_factory.mktemp("limited"),
        models,
        editor=RANK_ONE,
        auth="keys",
        max_body_bytes=4096,
        max_prompt_tokens=16,
        max_target_tokens=4,
        max_batch=2,
        max_new_tokens=8,
        rate_limit="8/30 seconds",
    )
    with server.runtime.infra.factory() as session:
        made = {
            name: keys.create_key(session, name, ["admin"])[1]
            for name in ("body", "tokens", "b", "c")
        }
    yield server, made
    stop()


def _as(raw: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {raw}"}


def _detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


def test_body_size_is_limited_before_reading_it(limited: tuple[Server, dict[str, str]]) -> None:
    server, made = limited
    huge = {**EDIT, "note": "x" * 5000}
    with server.client(_as(made["body"])) as client:
        response = client.post("/v1/edits", json=huge)
        assert response.status_code == 413 and "LOKID_MAX_BODY_BYTES" in _detail(response)

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams in
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        streamed = client.post(
            "/v1/generate", content=chunks(), headers={"content-type": "application/json"}
        )
        assert streamed.status_code == 413


def test_token_and_batch_limits_name_the_field(limited: tuple[Server, dict[str, str]]) -> None:
    server, made = limited
    long_prompt = "Paris " + "and more words " * 10 + "is in"
    with server.client(_as(made["tokens"])) as client:
        cases = [
            ("/v1/edits", {**EDIT, "prompt": long_prompt}, "prompt", "LOKID_MAX_PROMPT_TOKENS"),
            (
                "/v1/edits",
                {**EDIT, "target_new": "the Italian Republic of old"},
                "target_new",
                "LOKID_MAX_TARGET_TOKENS",
            ),
            ("/v1/edits/batch", {"edits": [EDIT] * 3}, "edits", "LOKID_MAX_BATCH"),
        ]
        for path, body, field, setting in cases:
            response = client.post(path, json=body)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"][0]
            assert detail["loc"][-1] == field and setting in detail["msg"], detail
        too_long = client.post("/v1/generate", json={"prompt": long_prompt})
        assert too_long.status_code == 422 and "LOKID_MAX_PROMPT_TOKENS" in _detail(too_long)
        many = client.post("/v1/generate", json={"prompt": "Hi", "max_new_tokens": 9})
        assert many.status_code == 422 and "LOKID_MAX_NEW_TOKENS" in _detail(many)
        defaulted = client.post("/v1/generate", json={"prompt": "Hi"})  # default 64 → 8
        assert defaulted.status_code == 200 and defaulted.json()["usage"]["completion_tokens"] <= 8
        chat = {"model": "lokid", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}
        chatted = client.post("/v1/chat/completions", json=chat)
        assert chatted.status_code == 422 and "LOKID_MAX_NEW_TOKENS" in _detail(chatted)


def test_rate_limit_is_per_key_with_retry_after(limited: tuple[Server, dict[str, str]]) -> None:
    server, made = limited
    with server.client() as client:
        codes = [client.get("/v1/versions", headers=_as(made["b"])).status_code for _ in range(9)]
        assert codes == [200] * 8 + [429]
        refused = client.get("/v1/versions", headers=_as(made["b"]))
        assert refused.status_code == 429 and "rate limit" in _detail(refused)
        assert 1 <= int(refused.headers["retry-after"]) <= 30
        # another key has a window of its own, and probes are never limited
        assert client.get("/v1/versions", headers=_as(made["c"])).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_limits_are_settings_that_refuse_bad_values() -> None:
    for field, value in [("rate_limit", "lots"), ("max_body_bytes", 10), ("max_batch", 0)]:
        with pytest.raises(SettingsError, match=f"LOKID_{field.upper()}"):
            load_settings(**{field: value})
    assert load_settings(rate_limit="OFF").rate_limit == "off"
