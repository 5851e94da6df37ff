"""The subset of OpenAI's completions and chat completions requests that lokid honours.

Unknown fields are ignored, as OpenAI clients send many; fields whose meaning lokid cannot
honour (n > 1, logprobs, suffix, tools) are refused rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.schemas.generation import SEED, plain_text, stop_list


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = SEED

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return stop_list(value)


class CompletionCreate(_Common):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1, le=4096)
    echo: bool = False
    logprobs: None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError("lokid completes one prompt per request")
        plain_text(value)
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _text(cls, value: str) -> str:
        plain_text(value)
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    @field_validator("content")
    @classmethod
    def _content(cls, value: str | list[ContentPart]) -> str | list[ContentPart]:
        plain_text(value)
        return value

    def as_template_input(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content}


class ChatCompletionCreate(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: Literal[False] | None = None
    tools: None = None

    @property
    def limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256
