"""Validation the baseline configs share: every bad value names its field."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedModel

from workers.editing.arch import num_layers


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be {bound}, got {value}")


def check_count(name: str, value: int, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def check_layers(name: str, layers: Sequence[int]) -> tuple[int, ...]:
    """Non-empty, strictly increasing, non-negative layer indices."""
    values = tuple(layers)
    if not values:
        raise ValueError(f"{name}: at least one layer is required")
    for layer in values:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"{name}: layer indices must be integers, got {layer!r}")
        if layer < 0:
            raise ValueError(f"{name}: layer index {layer} is negative")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"{name}: must be strictly increasing, got {list(values)}")
    return values


def check_layers_fit(name: str, layers: Sequence[int], model: PreTrainedModel) -> None:
    """The part of layer validation that needs the model: every index must exist."""
    total = num_layers(model)
    bad = [layer for layer in layers if layer >= total]
    if bad:
        raise ValueError(f"{name}: layer index {bad[0]} outside 0..{total - 1}")


@dataclass(frozen=True)
class TargetValueConfig:
    """How v* is found (MEMIT's ``compute_z``); defaults are MEMIT's/AlphaEdit's except ``lr``.

    steps: Adam steps on the residual delta at the last edited layer.
    lr: Adam learning rate for that delta. Adam moves every coordinate by about ``lr`` per
        step, so what matters is lr relative to ‖h‖; SmolLM2's residual at layer 7 is large
        (‖h‖ ≈ 150). Measured on two CounterFact edits, target NLL after 10 steps: 8.1 at
        lr 0.1 (AlphaEdit's Llama3 value), 1.35 at 0.5 (MEMIT's GPT-J value), 0.16 at 1.0.
    weight_decay: weight of ‖δ‖/‖h‖² in the loss, which keeps v* near the original value.
    kl_factor: weight of KL(new ‖ old) on the prediction after "{subject} is a", so the
        subject's other properties survive.
    clamp_norm_factor: ‖δ‖ is projected back to at most this fraction of ‖h‖.
    loss_stop: stop as soon as every request's loss is below this.
    n_contexts: prompts per request: the bare prompt plus ``n_contexts - 1`` generated prefixes
        (MEMIT: 1 + 5), so the new value works beyond the exact edit prompt.
    context_length: tokens per generated prefix (MEMIT: 10).
    """

    steps: int = 25
    lr: float = 1.0
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 0.75
    loss_stop: float = 5e-2
    n_contexts: int = 6
    context_length: int = 10

    def __post_init__(self) -> None:
        check_count("steps", self.steps)
        check_positive("lr", self.lr)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("kl_factor", self.kl_factor, allow_zero=True)
        check_positive("clamp_norm_factor", self.clamp_norm_factor)
        check_positive("loss_stop", self.loss_stop, allow_zero=True)
        check_count("n_contexts", self.n_contexts)
        check_count("context_length", self.context_length)
