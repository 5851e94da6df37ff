"""Edit requests: the one input format every editor accepts.

Shape follows ROME's request schema: ``{"prompt": "{} is located in", "subject": "Eiffel Tower",
"target_new": "Rome"}``; ``prompt`` may also contain the subject literally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

PLACEHOLDER = "{}"
_KNOWN_FIELDS = {
    "prompt",
    "subject",
    "target_new",
    "ground_truth",
    "rephrase_prompts",
    "locality_prompts",
}


def _text(value: Any, name: str, *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{name}: must not be empty")
    if any(ord(c) < 32 and c not in "\t\n" for c in value):
        raise ValueError(f"{name}: contains control characters")
    return value


def _text_list(value: Any, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise ValueError(f"{name}: must be a list of strings")
    return tuple(_text(v, f"{name}[{i}]") or "" for i, v in enumerate(value))


def as_answer(text: str) -> str:
    """An answer as the model should produce it after a prompt: one leading space."""
    return " " + text.strip()


@dataclass(frozen=True)
class EditRequest:
    """One fact correction: after it, ``prompt`` about ``subject`` continues with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    ground_truth: str | None = None
    rephrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    locality_prompts: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        _text(self.prompt, "prompt")
        _text(self.subject, "subject")
        _text(self.target_new, "target_new")
        _text(self.ground_truth, "ground_truth", allow_none=True)
        if self.subject.strip() != self.subject:
            raise ValueError("subject: must not start or end with whitespace")
        if PLACEHOLDER not in self.prompt and self.subject not in self.prompt:
            raise ValueError(
                f"prompt: must contain the subject {self.subject!r} or a '{{}}' placeholder for it"
            )
        if self.prompt.count(PLACEHOLDER) > 1:
            raise ValueError("prompt: has more than one '{}' placeholder")
        if self.ground_truth is not None and self.ground_truth.strip() == self.target_new.strip():
            raise ValueError("target_new: equals ground_truth, so there is nothing to change")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EditRequest:
        if not isinstance(data, Mapping):
            raise ValueError("request: must be an object")
        unknown = sorted(set(data) - _KNOWN_FIELDS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown field")
        for name in ("prompt", "subject", "target_new"):
            if name not in data:
                raise ValueError(f"{name}: is required")
        return cls(
            prompt=data["prompt"],
            subject=data["subject"],
            target_new=data["target_new"],
            ground_truth=data.get("ground_truth"),
            rephrase_prompts=_text_list(data.get("rephrase_prompts"), "rephrase_prompts"),
            locality_prompts=_text_list(data.get("locality_prompts"), "locality_prompts"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "subject": self.subject,
            "target_new": self.target_new,
            "ground_truth": self.ground_truth,
            "rephrase_prompts": list(self.rephrase_prompts),
            "locality_prompts": list(self.locality_prompts),
        }

    @property
    def template(self) -> str:
        """The prompt with ``{}`` where the subject goes."""
        if PLACEHOLDER in self.prompt:
            return self.prompt
        return self.prompt.replace(self.subject, PLACEHOLDER, 1)

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.template.replace(PLACEHOLDER, self.subject)

    @property
    def target(self) -> str:
        """The target as the model should produce it after the prompt: one leading space."""
        return as_answer(self.target_new)

    @property
    def truth(self) -> str | None:
        """The ground truth presented like ``target``, or None when not given."""
        return None if self.ground_truth is None else as_answer(self.ground_truth)
