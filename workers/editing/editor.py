"""The interface every editing method implements, and the apply/rollback logic they share.

An editor works in two phases so a failure never leaves the model half-edited:
``compute`` finds the weight changes without touching the weights; ``apply`` then adds them and
lets the method update its own bookkeeping. If anything raises, the weights are restored.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.requests import EditRequest
from workers.editing.result import EditResult


class Editor(ABC):
    """Edits a resident model in place; one instance per model, used by one writer."""

    method: str = "base"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.params = dict(model.named_parameters())

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @abstractmethod
    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        """Find the weight changes for ``requests``; must not modify the model."""

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:  # noqa: B027
        """Update the method's own state once the changes are in the weights (default: none)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Editor state (cached keys, projector bases, ...) as tensors; part of a version."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ValueError(f"{self.method}: this editor keeps no state, got {sorted(state)[:3]}")

    def apply(
        self,
        requests: Sequence[EditRequest | Mapping[str, Any]],
        *,
        require_success: bool = False,
    ) -> EditResult:
        """Compute and apply an edit. With ``require_success`` an edit whose target did not
        become top-1 everywhere is not applied (the service's policy, ``reject_unsuccessful``)."""
        reqs = [r if isinstance(r, EditRequest) else EditRequest.from_dict(r) for r in requests]
        if not reqs:
            raise ValueError("requests: at least one edit is required")
        started = time.perf_counter()
        result = self.compute(reqs)
        if require_success and not result.success:
            result.applied = False
            result.seconds = time.perf_counter() - started
            return result
        # exact copies, not W + d − d: fp32 rounding would leave the weights slightly off
        saved = {d.name: self.params[d.name].detach().clone() for d in result.deltas}
        try:
            for delta in result.deltas:
                delta.apply_to(self.params[delta.name].data)
            self.after_apply(reqs, result)
        except BaseException:
            with torch.no_grad():
                for name, value in saved.items():
                    self.params[name].copy_(value)
            raise
        result.seconds = time.perf_counter() - started
        return result

    def revert_weights(self, result: EditResult) -> None:
        """Subtract an applied result's changes (editor state is not rewound: load a saved one)."""
        for delta in reversed(result.deltas):
            delta.apply_to(self.params[delta.name].data, sign=-1.0)
