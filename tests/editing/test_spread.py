"""How spread_over_layers splits v* over the chosen layers."""

from __future__ import annotations

import pytest
import torch

from workers.editing.model import LoadedModel
from workers.editing.requests import EditRequest
from workers.editing.spread import spread_over_layers

REQUEST = EditRequest(
    prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"
)


def shares_asked(loaded_model: LoadedModel, decay: float) -> list[float]:
    """Each layer's share as a part of what is missing, with a solve that changes nothing (so
    what is missing stays the same from layer to layer)."""
    model, tokenizer = loaded_model.model, loaded_model.tokenizer
    norms: list[float] = []

    def solve(_layer: int, keys: torch.Tensor, share: torch.Tensor) -> tuple[torch.Tensor, ...]:
        norms.append(float(share.norm()))
        return torch.zeros(share.shape, dtype=share.dtype), torch.zeros(
            (share.shape[1], keys.shape[0]), dtype=keys.dtype
        )

    torch.manual_seed(0)
    z = torch.randn(1, model.config.hidden_size) * 10
    spread_over_layers(model, tokenizer, [REQUEST], ["{}"], [3, 4, 5], z, solve, decay=decay)
    return [n / norms[-1] for n in norms]  # the last layer is asked for all that is missing


def test_equal_shares_by_default_as_memit(loaded_model: LoadedModel) -> None:
    assert shares_asked(loaded_model, 1.0) == pytest.approx([1 / 3, 1 / 2, 1], rel=1e-6)


def test_decay_asks_more_of_the_lower_layers(loaded_model: LoadedModel) -> None:
    assert shares_asked(loaded_model, 0.5) == pytest.approx([1 / 1.75, 0.5 / 0.75, 1], rel=1e-6)
