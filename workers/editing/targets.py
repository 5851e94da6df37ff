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

    def top_gaps(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row, the smallest lead of a target token's logit over the best other token's
        there (> 0 exactly where every target token is the argmax)."""
        picked = logits[self.rows, self.columns].float()
        own = picked.gather(1, self.ids[:, None]).squeeze(1)
        rival = picked.scatter(1, self.ids[:, None], -math.inf).amax(dim=-1)
        gap = own - rival
        worst = torch.full((self.n_rows,), math.inf, device=gap.device)
        return worst.scatter_reduce(0, self.rows, gap, reduce="amin")

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
    """Per prompt: every target token the argmax (teacher-forced), P(target) per token, the
    model's top token at the first target position, (when rivals are given) how far the
    target's mean token log-probability leads its rival token's log-probability, and the
    smallest logit lead of a target token over any other token."""

    hits: list[bool]
    probs: list[float]
    said: list[int]
    leads: list[float] | None = None
    top_gaps: list[float] | None = None


@dataclass
class Rivals:
    """Per prompt: a token to compare the target with, and at which target position (0 = the
    first); token -1 = no rival (the lead is +inf)."""

    offsets: torch.Tensor
    tokens: torch.Tensor


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
        self.rows = torch.arange(len(prompts), device=self.batch.input_ids.device)
        self.first = self.batch.last_prompt_pos()

    @torch.no_grad()
    def read(self, rivals: Rivals | None = None) -> TargetReadout:
        logits = logits_at(self.model, self.batch, self.index.positions)
        token_lp, top1 = self.index.token_logprobs(logits)
        mean_lp = self.index.row_mean(token_lp)
        said = logits[self.rows, self.index.column_of(self.first)].argmax(dim=-1)
        out = TargetReadout(
            self.index.row_all(top1).tolist(),
            mean_lp.exp().tolist(),
            said.tolist(),
            top_gaps=self.index.top_gaps(logits).tolist(),
        )
        if rivals is not None:
            column = self.index.column_of(self.first + rivals.offsets.clamp_min(0))
            rival_lp = torch.log_softmax(logits[self.rows, column].float(), dim=-1)
            rival_lp = rival_lp.gather(1, rivals.tokens.clamp_min(0)[:, None]).squeeze(1)
            lead = mean_lp - rival_lp
            out.leads = torch.where(rivals.tokens >= 0, lead, math.inf).tolist()
        return out


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
