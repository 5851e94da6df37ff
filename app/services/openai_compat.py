"""Shaping generations as OpenAI API objects; ``system_fingerprint`` names the version."""

from __future__ import annotations

import time
import uuid
from typing import Any

from app.serving.generation import GenOutput


def fingerprint(version: int) -> str:
    return f"v{version}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _envelope(cid: str, kind: str, model: str, version: int) -> dict[str, Any]:
    """The fields every OpenAI response and chunk shares."""
    return {
        "id": cid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint(version),
    }


def completion(out: GenOutput, model: str, text: str) -> dict[str, Any]:
    return {
        **_envelope(new_id("cmpl"), "text_completion", model, out.version),
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": out.finish_reason}
        ],
        "usage": out.usage,
    }


def completion_chunk(
    cid: str, model: str, version: int, text: str, finish_reason: str | None
) -> dict[str, Any]:
    return {
        **_envelope(cid, "text_completion", model, version),
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
    }


def chat_completion(out: GenOutput, model: str) -> dict[str, Any]:
    return {
        **_envelope(new_id("chatcmpl"), "chat.completion", model, out.version),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": out.text, "refusal": None},
                "logprobs": None,
                "finish_reason": out.finish_reason,
            }
        ],
        "usage": out.usage,
    }


def chat_chunk(
    cid: str, model: str, version: int, delta: dict[str, Any], finish_reason: str | None
) -> dict[str, Any]:
    return {
        **_envelope(cid, "chat.completion.chunk", model, version),
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
    }


def usage_chunk(base: dict[str, Any], out: GenOutput) -> dict[str, Any]:
    return {**base, "choices": [], "usage": out.usage}


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "lokid"}
