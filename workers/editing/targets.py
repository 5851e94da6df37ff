"""Target-token log-probabilities at only the positions that predict them."""

from __future__ import annotations

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


@torch.no_grad()
def targets_top1(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
) -> tuple[list[bool], list[float]]:
    """Per prompt: is every target token the argmax (teacher-forced), and P(target) per token."""
    device = next(model.parameters()).device
    batch = build_batch(tokenizer, prompts, targets).to(device)
    index = TargetIndex.of(batch)
    token_lp, top1 = index.token_logprobs(logits_at(model, batch, index.positions))
    mean_lp = index.row_mean(token_lp)
    return index.row_all(top1).tolist(), mean_lp.exp().tolist()
