"""lokid's own generation endpoint."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


def stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if len(values) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in values):
        raise ValueError("stop sequences must not be empty")
    return values


class GenerateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32_000)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    seed: int | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        return stop_list(value)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class GeneratePublic(BaseModel):
    text: str
    version: int
    finish_reason: str
    usage: Usage
