"""Target-token log-probabilities at only the positions that predict them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.batch import PromptBatch, build_batch
from workers.editing.hooks import logits_at


@dataclass
class TargetIndex:
    """Where each target token is predicted, as (row, column into ``positions``, token id)."""

    rows: torch.Tensor
    columns: torch.Tensor
    ids: torch.Tensor
    positions: torch.Tensor  # sorted unique sequence positions whose logits are needed
    n_rows: int

    @classmethod
    def of(cls, batch: PromptBatch, extra: torch.Tensor | None = None) -> TargetIndex:
        rows, pos, ids = batch.flat_target_index()
        wanted = pos if extra is None else torch.cat([pos, extra.to(pos.device)])
        positions = torch.unique(wanted)
        return cls(rows, torch.searchsorted(positions, pos), ids, positions, len(batch.prompt_len))

    def column_of(self, pos: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.positions, pos.to(self.positions.device))

    def token_logprobs(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of every target token and whether it is the argmax there."""
        picked = logits[self.rows, self.columns].float()
        logp = torch.log_softmax(picked, dim=-1)
        token_lp = logp.gather(1, self.ids[:, None]).squeeze(1)
        top1 = picked.argmax(dim=-1) == self.ids
        return token_lp, top1

    def row_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row mean over that row's target tokens (rows without targets get 0)."""
        sums = values.new_zeros(self.n_rows).index_add(0, self.rows, values)
        counts = values.new_zeros(self.n_rows).index_add(0, self.rows, torch.ones_like(values))
        return sums / counts.clamp_min(1)

    def row_all(self, flags: torch.Tensor) -> torch.Tensor:
        misses = torch.zeros(self.n_rows, device=flags.device).index_add(
            0, self.rows, (~flags).float()
        )
        return misses == 0


@dataclass
class TargetReadout:
    """Per prompt: every target token the argmax (teacher-forced), P(target) per token, and how
    far the target's mean token log-probability leads a rival token's at the first position."""

    hits: list[bool]
    probs: list[float]
    leads: list[float] | None = None


class TargetProbe:
    """One batch of prompts and targets, read again under whatever change is applied."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        targets: Sequence[str],
    ) -> None:
        self.model = model
        self.batch = build_batch(tokenizer, prompts, targets).to(next(model.parameters()).device)
        self.index = TargetIndex.of(self.batch)
        self.first = self.index.column_of(self.batch.last_prompt_pos())

    @torch.no_grad()
    def read(self, rivals: torch.Tensor | None = None) -> TargetReadout:
        """``rivals``: a token id per prompt (-1: none) whose log-probability at the first
        target position the target's mean token log-probability is compared with."""
        logits = logits_at(self.model, self.batch, self.index.positions)
        token_lp, top1 = self.index.token_logprobs(logits)
        mean_lp = self.index.row_mean(token_lp)
        out = TargetReadout(self.index.row_all(top1).tolist(), mean_lp.exp().tolist())
        if rivals is not None:
            rows = torch.arange(len(self.first), device=self.first.device)
            first_lp = torch.log_softmax(logits[rows, self.first].float(), dim=-1)
            rival_lp = first_lp.gather(1, rivals.clamp_min(0)[:, None]).squeeze(1)
            lead = torch.where(rivals >= 0, mean_lp - rival_lp, torch.full_like(mean_lp, math.inf))
            out.leads = lead.tolist()
        return out

    @torch.no_grad()
    def top_tokens(self) -> torch.Tensor:
        """The model's most likely token at each prompt's first target position."""
        logits = logits_at(self.model, self.batch, self.index.positions)
        rows = torch.arange(len(self.first), device=self.first.device)
        return logits[rows, self.first].argmax(dim=-1)


@torch.no_grad()
def targets_top1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
) -> tuple[list[bool], list[float]]:
    """Per prompt: is every target token the argmax (teacher-forced), and P(target) per token."""
    readout = TargetProbe(model, tokenizer, prompts, targets).read()
    return readout.hits, readout.probs


def first_token(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """The first token of ``text`` as a target after a prompt (no special tokens)."""
    return int(tokenizer(text, add_special_tokens=False)["input_ids"][0])
