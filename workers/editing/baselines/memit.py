"""MEMIT (Meng et al., ICLR 2023): v* at the last edited layer, then a closed-form least-squares
update per layer that maps the subject keys K to their share R of the residual change while
disturbing the keys of ordinary text as little as possible:

    ΔW = R Kᵀ (λ·E[k kᵀ] + K Kᵀ)⁻¹

E[k kᵀ] comes from ``workers.editing.stats`` (shipped text). ΔW = R · Xᵀ with
X = (λC + KKᵀ)⁻¹ K, so the change is exactly rank ≤ number of requests and is stored as factors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.baselines.base import BaselineEditor
from workers.editing.contexts import context_templates
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.editing.spread import spread_over_layers
from workers.editing.stats import key_second_moments
from workers.editing.target_value import TargetValueConfig, optimise_target_values
from workers.editing.validation import check_layers, check_layers_fit, check_positive


@dataclass(frozen=True)
class MemitConfig:
    """layers: down_proj matrices to spread the change over; v* is read after the last one.
    mom2_update_weight: λ, how much ordinary-text keys weigh against the edit keys. Each layer
        writes about q/(1+q) of its share, q = kᵀ(λC)⁻¹k ≈ d_ff/λ for a typical key. MEMIT's
        15000 sits at d_ff/λ ≈ 1 for GPT-J (16384) and Llama3-8B (14336); on SmolLM2
        (d_ff 1536) it would write ~10% per layer: measured on 4 CounterFact edits whose v*
        had converged, 1 became top-1. 1500 keeps d_ff/λ ≈ 1: 4 of 4.
    target: how v* is optimised.
    """

    layers: tuple[int, ...] = (3, 4, 5, 6, 7)
    mom2_update_weight: float = 1500.0
    target: TargetValueConfig = field(default_factory=TargetValueConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers("layers", self.layers))
        check_positive("mom2_update_weight", self.mom2_update_weight)
        if not isinstance(self.target, TargetValueConfig):
            raise ValueError("target: must be a TargetValueConfig")


def memit_update(
    keys: torch.Tensor, share: torch.Tensor, mom2: torch.Tensor, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (a, b) of ΔW = R Kᵀ(λC + KKᵀ)⁻¹ for keys K (d_ff, n) and residual share R (d, n)."""
    cov = weight * mom2.to(keys)
    return share, torch.linalg.solve(cov + keys @ keys.T, keys).T


class MemitEditor(BaselineEditor):
    method = "memit"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: MemitConfig | None = None,
    ) -> None:
        self.config = config or MemitConfig()
        check_layers_fit("layers", self.config.layers, model)
        super().__init__(model, tokenizer, self.config.layers)
        self._mom2: dict[int, torch.Tensor] | None = None

    def second_moments(self) -> dict[int, torch.Tensor]:
        """E[k kᵀ] per edited layer; loaded (or computed and cached) on first use."""
        if self._mom2 is None:
            self._mom2 = key_second_moments(self.model, self.tokenizer, self.config.layers)
        return self._mom2

    def contexts(self) -> list[str]:
        t = self.config.target
        return context_templates(self.model, self.tokenizer, t.n_contexts, t.context_length)

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        cfg = self.config
        contexts = self.contexts()
        values = optimise_target_values(
            self.model, self.tokenizer, requests, cfg.layers[-1], contexts, cfg.target
        )
        mom2 = self.second_moments()

        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            return memit_update(keys, share, mom2[layer], cfg.mom2_update_weight)

        deltas = spread_over_layers(
            self.model, self.tokenizer, requests, contexts, cfg.layers, values.z, solve
        )
        return self._report(requests, deltas, steps=values.steps, loss=values.loss)
