"""Turning (prompt, target) pairs into one right-padded batch with the positions editors need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows as (ids, mask), padded on the left so every row ends at the last column:
    what ``generate`` needs for all rows to continue together."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(list(r))
            mask[i, width - len(r) :] = 1
    return ids, mask


@dataclass
class PromptBatch:
    """``prompt + target`` token rows; the logits before each target token predict it."""

    input_ids: torch.Tensor  # (n, T)
    attention_mask: torch.Tensor  # (n, T)
    prompt_len: list[int]
    target_ids: list[list[int]]
    subject_last: list[int]  # position of the subject's last token, -1 if no subject given

    def to(self, device: torch.device) -> PromptBatch:
        self.input_ids = self.input_ids.to(device)
        self.attention_mask = self.attention_mask.to(device)
        return self

    def flat_target_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, position, token id) of every target token, for gathering log-probs in one go."""
        rows, pos, ids = [], [], []
        for i, (start, targets) in enumerate(zip(self.prompt_len, self.target_ids, strict=True)):
            for j, tok in enumerate(targets):
                rows.append(i)
                pos.append(start - 1 + j)
                ids.append(tok)
        dev = self.input_ids.device
        return (
            torch.tensor(rows, device=dev),
            torch.tensor(pos, device=dev),
            torch.tensor(ids, device=dev),
        )

    def last_prompt_pos(self) -> torch.Tensor:
        return torch.tensor(self.prompt_len, device=self.input_ids.device) - 1


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    subjects: Sequence[str | None] | None = None,
) -> PromptBatch:
    """Tokenise prompt and target separately so target tokens never merge with the prompt's."""
    if len(prompts) != len(targets):
        raise ValueError("prompts and targets differ in length")
    subjects = subjects if subjects is not None else [None] * len(prompts)
    rows: list[list[int]] = []
    prompt_len: list[int] = []
    target_ids: list[list[int]] = []
    subject_last: list[int] = []
    for prompt, target, subject in zip(prompts, targets, subjects, strict=True):
        p_ids = encode(tokenizer, prompt)
        t_ids = encode(tokenizer, target) if target else []
        if not p_ids:
            raise ValueError("prompt: tokenises to nothing")
        rows.append(p_ids + t_ids)
        prompt_len.append(len(p_ids))
        target_ids.append(t_ids)
        subject_last.append(_subject_last_token(tokenizer, prompt, subject, len(p_ids)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return PromptBatch(input_ids, mask, prompt_len, target_ids, subject_last)


def _subject_last_token(
    tokenizer: PreTrainedTokenizerBase, prompt: str, subject: str | None, n_prompt: int
) -> int:
    """Index of the last token covering the subject's last occurrence in ``prompt``."""
    if not subject:
        return -1
    at = prompt.rfind(subject)
    if at < 0:
        raise ValueError(f"subject: {subject!r} does not occur in prompt {prompt!r}")
    # tokens of the text up to the subject's end; the last of them is the subject's last token
    upto = encode(tokenizer, prompt[: at + len(subject)])
    return min(len(upto), n_prompt) - 1
