"""Admin requests: the playground comparison and the dashboard login."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from app.schemas.ids import MAX_ID

PLAYGROUND_MAX_TOKENS = 128  # the playground borrows the serving model: keep it short


class PlaygroundCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=4000)
    version: int = Field(ge=0, le=MAX_ID, description="the version to answer beside the head")
    max_new_tokens: int = Field(default=24, ge=1, le=PLAYGROUND_MAX_TOKENS)
