"""What an editor reports for one applied edit (or batch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from workers.editing.delta import MatrixDelta


@dataclass
class LayerScore:
    layer: int
    score: float
    selected: bool


@dataclass
class EditResult:
    method: str
    deltas: list[MatrixDelta]
    layers: list[LayerScore] = field(default_factory=list)
    key_ratio: dict[str, float] = field(default_factory=dict)  # ‖Pk‖/‖k‖ per matrix
    delta_norm: dict[str, float] = field(default_factory=dict)  # ‖ΔW‖ per matrix
    relative_change: dict[str, float] = field(default_factory=dict)  # ‖W − W₀‖/‖W₀‖ per matrix
    steps: int = 0
    seconds: float = 0.0
    success: bool = False  # target top-1 on every observation
    per_request_success: list[bool] = field(default_factory=list)
    loss: float | None = None
    trim_scale: float | None = None  # LOKI's trim: the share of the computed change kept
    # False when Editor.apply(require_success=True) left the weights alone because success was
    # False; relative_change is then what the change would have made of them
    applied: bool = True
    attempts: int = 1  # LOKI's retry: 2 when the first attempt did not take
    # LOKI's consolidation: the deltas also re-solve every layer's accumulated change
    consolidated: bool = False

    @property
    def selected_layers(self) -> list[int]:
        return [s.layer for s in self.layers if s.selected]

    def summary(self) -> dict[str, Any]:
        """JSON-able metrics, without the tensors."""
        return {
            "method": self.method,
            "layers": [vars(s) for s in self.layers],
            "selected_layers": self.selected_layers,
            "key_ratio": self.key_ratio,
            "delta_norm": self.delta_norm,
            "relative_change": self.relative_change,
            "ranks": {d.name: d.rank for d in self.deltas},
            "steps": self.steps,
            "seconds": round(self.seconds, 4),
            "success": self.success,
            "per_request_success": self.per_request_success,
            "loss": self.loss,
            "trim_scale": self.trim_scale,
            "applied": self.applied,
            "attempts": self.attempts,
            "consolidated": self.consolidated,
        }
