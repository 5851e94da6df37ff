"""What the three baselines share: a snapshot of the original weights and honest reporting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import down_proj_name
from workers.editing.delta import MatrixDelta
from workers.editing.editor import Editor
from workers.editing.hooks import applied
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult, LayerScore
from workers.editing.targets import targets_top1


class BaselineEditor(Editor):
    """An editor of fixed down_proj layers that reports like LOKI does, for a fair comparison."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layers: Sequence[int],
    ) -> None:
        super().__init__(model, tokenizer)
        self.edit_layers = tuple(layers)
        # W₀ as it was when the editor was created: ‖W − W₀‖/‖W₀‖ tracks the cumulative drift
        # of lifelong editing, which a per-edit ‖ΔW‖ cannot show. fp32 on the CPU: a few MB each.
        self._w0 = {
            layer: self.params[down_proj_name(model, layer)].detach().float().cpu().clone()
            for layer in self.edit_layers
        }

    def _report(
        self,
        requests: Sequence[EditRequest],
        deltas: Mapping[int, MatrixDelta],
        *,
        steps: int,
        loss: float | None,
        key_ratio: Mapping[str, float] | None = None,
    ) -> EditResult:
        # success is measured, not inferred from the optimisation: MEMIT's closed-form spread
        # only approximates v*, so the target can still miss after a converged v*
        with applied(self.model, deltas):
            hits, _ = targets_top1(
                self.model, self.tokenizer, [r.text for r in requests], [r.target for r in requests]
            )
        delta_norm: dict[str, float] = {}
        relative: dict[str, float] = {}
        for layer, delta in deltas.items():
            current = self.params[delta.name].detach().float().cpu()
            drift = current - self._w0[layer] + delta.to_dense().float()
            delta_norm[delta.name] = delta.norm()
            relative[delta.name] = float(drift.norm() / self._w0[layer].norm())
        return EditResult(
            method=self.method,
            deltas=list(deltas.values()),
            layers=[LayerScore(layer=layer, score=0.0, selected=True) for layer in deltas],
            key_ratio=dict(key_ratio or {}),
            delta_norm=delta_norm,
            relative_change=relative,
            steps=steps,
            success=all(hits),
            per_request_success=hits,
            loss=loss,
        )
