"""Validation the editor configs share: every bad value names its field."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from transformers import PreTrainedModel

from workers.editing.arch import num_layers


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: must be a number, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero) or value != value:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: must be {bound}, got {value}")


def check_unit_fraction(name: str, value: float) -> None:
    """A weight in (0, 1]; NaN fails too."""
    if not 0 < value <= 1:
        raise ValueError(f"{name}: must be in (0, 1], got {value}")


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
