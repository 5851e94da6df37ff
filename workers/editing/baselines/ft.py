"""FT-L: constrained fine-tuning of one down_proj matrix (the ROME paper's FT+L baseline).

Adam on the target's NLL after the edit prompt, with every entry of the change clipped to
[−ε, ε] after each step (ROME's ``norm_constraint``: an L∞ ball around the weights as they were
before this edit). No contexts, no locality term: this is the "just fine-tune it" reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import down_proj, down_proj_name
from workers.editing.baselines.base import BaselineEditor
from workers.editing.batch import build_batch
from workers.editing.delta import MatrixDelta
from workers.editing.hooks import logits_at, output_hooks
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.editing.targets import TargetIndex
from workers.editing.validation import (
    check_count,
    check_layers,
    check_layers_fit,
    check_positive,
)


@dataclass(frozen=True)
class FTConfig:
    """layer: the down_proj to tune (4: early layers carry facts on SmolLM2, see DESIGN §3).
    steps: most Adam steps; stops early once every target token is top-1.
    norm_constraint: L∞ bound on each entry of ΔW, as a fraction of the matrix's mean |w|.
        ROME's 5e-4 is absolute for GPT-2 XL; SmolLM2's down_proj entries are much larger
        (mean |w| ≈ 0.144), so the bound is scaled by the matrix to mean the same on any model.
    lr: Adam learning rate as a fraction of the same mean |w|; ROME uses lr = ε, so one step
        can reach the bound.
    """

    layer: int = 4
    steps: int = 25
    norm_constraint: float = 0.02
    lr: float = 0.02

    def __post_init__(self) -> None:
        check_layers("layer", [self.layer])
        check_count("steps", self.steps)
        check_positive("norm_constraint", self.norm_constraint)
        check_positive("lr", self.lr)


class FTEditor(BaselineEditor):
    method = "ft"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: FTConfig | None = None,
    ) -> None:
        self.config = config or FTConfig()
        check_layers_fit("layer", [self.config.layer], model)
        super().__init__(model, tokenizer, [self.config.layer])

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        cfg = self.config
        weight = down_proj(self.model, cfg.layer).weight
        scale = float(weight.detach().float().abs().mean())
        bound = cfg.norm_constraint * scale
        change = torch.zeros(weight.shape, device=weight.device, requires_grad=True)

        def add_change(x: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
            assert x is not None
            return out + x @ change.to(x.dtype).T

        batch = build_batch(
            self.tokenizer, [r.text for r in requests], [r.target for r in requests]
        ).to(self.device)
        index = TargetIndex.of(batch)
        opt = torch.optim.Adam([change], lr=cfg.lr * scale)
        steps, loss_value = 0, float("nan")
        with output_hooks({down_proj(self.model, cfg.layer): add_change}):
            for _ in range(cfg.steps + 1):
                token_lp, top1 = index.token_logprobs(logits_at(self.model, batch, index.positions))
                loss = -index.row_mean(token_lp).mean()
                loss_value = float(loss.detach())
                if bool(top1.all()) or steps == cfg.steps:
                    break
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
                with torch.no_grad():
                    change.clamp_(-bound, bound)
        name = down_proj_name(self.model, cfg.layer)
        delta = MatrixDelta.from_dense(name, change.detach())
        return self._report(requests, {cfg.layer: delta}, steps=steps, loss=loss_value)
