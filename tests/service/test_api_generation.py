"""Generation, streaming, the OpenAI-compatible endpoints (with the official client), health."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.service.conftest import Server

PROMPT = "The capital of France is"


def _sse(response: httpx.Response) -> list[tuple[str, str]]:
    events, name = [], "message"
    for line in response.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:"):
            events.append((name, line.split(":", 1)[1].strip()))
            name = "message"
    return events


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_generate_and_its_stream_agree(embedded: Server) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 12}
    with embedded.client() as client:
        whole = client.post("/v1/generate", json=body).json()
        assert whole["usage"]["completion_tokens"] == 12
        assert whole["finish_reason"] == "length"
        assert whole["version"] == embedded.runtime.serving.version
        with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = _sse(response)
    tokens = [json.loads(data) for name, data in events if name == "token"]
    done = [json.loads(data) for name, data in events if name == "done"]
    assert len(tokens) >= 3  # token by token, not one lump
    assert "".join(t["text"] for t in tokens) == whole["text"]
    assert done == [whole]
    assert {t["version"] for t in tokens} == {whole["version"]}


def test_stop_sequences_end_the_text(embedded: Server) -> None:
    with embedded.client() as client:
        free = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 16}).json()
        stop = free["text"].strip().split()[1]
        body = {"prompt": PROMPT, "max_new_tokens": 16, "stop": [stop]}
        cut = client.post("/v1/generate", json=body).json()
        assert cut["text"] == free["text"][: free["text"].index(stop)]
        assert cut["finish_reason"] == "stop"
        with client.stream("POST", "/v1/generate", json=body | {"stream": True}) as response:
            events = _sse(response)
        streamed = "".join(json.loads(d)["text"] for n, d in events if n == "token")
        assert streamed == cut["text"]


def test_generation_bad_inputs(embedded: Server) -> None:
    with embedded.client() as client:
        for body in (
            {"prompt": ""},
            {"prompt": "x", "max_new_tokens": 0},
            {"prompt": "x", "temperature": -1},
            {"prompt": "x", "top_p": 0},
            {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]},
            {"prompt": "x", "bogus": 1},
        ):
            response = client.post("/v1/generate", json=body)
            assert response.status_code == 422, body
            assert "detail" in response.json()
        long_prompt = {"prompt": "word " * 6000, "max_new_tokens": 4000}
        response = client.post("/v1/generate", json=long_prompt)
        assert response.status_code == 422 and "context" in response.json()["detail"]


def test_openai_client_completions(embedded: Server) -> None:
    client = _client(embedded)
    models = client.models.list().data
    assert [m.id for m in models] == [embedded.runtime.serving.name]
    model = models[0].id
    head = f"v{embedded.runtime.serving.version}"

    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    assert out.system_fingerprint == head
    assert out.usage is not None and out.usage.completion_tokens == 8
    text = out.choices[0].text
    assert text and out.choices[0].finish_reason == "length"

    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert {c.system_fingerprint for c in chunks} == {head}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8

    sampled = client.completions.create(
        model="lokid", prompt=PROMPT, max_tokens=4, temperature=0.8, top_p=0.9, seed=1
    )
    assert sampled.choices[0].text

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2, n=2)


def test_openai_client_chat(embedded: Server) -> None:
    client = _client(embedded)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    answer = out.choices[0].message.content
    assert out.choices[0].message.role == "assistant" and answer
    assert out.system_fingerprint == f"v{embedded.runtime.serving.version}"
    # the model's own chat template was applied: the reply is an answer, not template text
    assert "<|im_start|>" not in answer and "user" not in answer[:5]

    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_health_readiness_and_metrics(embedded: Server) -> None:
    with embedded.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"] == {"model": "ok", "database": "ok", "queue": "ok"}
        client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 2})
        metrics = client.get("/metrics").text
    assert 'lokid_generated_tokens_total{endpoint="generate"}' in metrics
    assert "lokid_head_version " in metrics
    assert "lokid_serving_version " in metrics
