"""lokid's own generation endpoint."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

# Tab, line feed and carriage return are text; other C0 controls, DEL and NUL are not.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
SEED = Field(default=None, ge=0, le=2**63 - 1)


def plain_text(value: object) -> object:
    """Refuse control characters in a string (or in each string of a list)."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        if isinstance(text, str) and _CONTROL.search(text):
            raise ValueError("contains control characters")
    return value


def stop_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if len(values) > 4:
        raise ValueError("at most 4 stop sequences")
    if any(not s for s in values):
        raise ValueError("stop sequences must not be empty")
    plain_text(values)
    return values


class GenerateCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=32_000)
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    seed: int | None = SEED

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        plain_text(value)
        return value

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
