"""Per-request limits counted in the serving model's tokens: prompt and target lengths, batch
size and new tokens. Each check returns the field at fault and a message, or None."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from app.core.config import Settings
from workers.editing.requests import as_answer


class _Tokenizer(Protocol):
    def __call__(self, text: str, *, add_special_tokens: bool) -> Any: ...


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_target_tokens: int
    max_batch: int
    max_new_tokens: int

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            max_prompt_tokens=settings.max_prompt_tokens,
            max_target_tokens=settings.max_target_tokens,
            max_batch=settings.max_batch,
            max_new_tokens=settings.max_new_tokens,
        )

    def batch_problem(self, size: int) -> str | None:
        if size > self.max_batch:
            return f"at most {self.max_batch} edits per batch (LOKID_MAX_BATCH), got {size}"
        return None

    def new_tokens(self, requested: int, *, explicit: bool) -> int:
        """A request that leaves the count to its default gets at most the server's limit."""
        return requested if explicit else min(requested, self.max_new_tokens)

    def new_tokens_problem(self, requested: int) -> str | None:
        if requested > self.max_new_tokens:
            return (
                f"at most {self.max_new_tokens} new tokens per request (LOKID_MAX_NEW_TOKENS), "
                f"got {requested}"
            )
        return None

    def prompt_problem(self, tokens: int) -> str | None:
        if tokens > self.max_prompt_tokens:
            return (
                f"{tokens} tokens; at most {self.max_prompt_tokens} are allowed "
                "(LOKID_MAX_PROMPT_TOKENS)"
            )
        return None

    def edit_problem(self, tokenizer: _Tokenizer, fields: dict[str, Any]) -> tuple[str, str] | None:
        """The first edit field that is too long in tokens, as (field, message)."""
        for name in ("prompt", "subject", "ground_truth", "rephrase_prompts", "locality_prompts"):
            for text in _texts(fields.get(name)):
                problem = self.prompt_problem(_count(tokenizer, text))
                if problem:
                    return name, problem
        target = _count(tokenizer, as_answer(str(fields["target_new"])))
        if target > self.max_target_tokens:
            return "target_new", (
                f"{target} tokens; at most {self.max_target_tokens} are allowed "
                "(LOKID_MAX_TARGET_TOKENS)"
            )
        return None


def _texts(value: Any) -> Sequence[str]:
    if value is None:
        return ()
    return [value] if isinstance(value, str) else list(value)


def _count(tokenizer: _Tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
