"""Spreading the residual change over several layers (MEMIT's layer loop, also AlphaEdit's).

Layer by layer, lowest first: read the keys and the residual at the last layer on the model with
the updates so far, give this layer a share of what is still missing (MEMIT: an equal share,
1/layers left), and solve for a matrix change that maps the keys to that share. Methods differ
only in the solve, and LOKI in how the share is split (``decay``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.arch import down_proj_name
from workers.editing.delta import MatrixDelta
from workers.editing.hooks import applied
from workers.editing.keys import read_at_subject
from workers.editing.requests import EditRequest
from workers.editing.validation import check_unit_fraction

# (layer, keys (d_ff, n), residual share (d_model, n)) -> (a (d_model, n), b (n, d_ff))
Solve = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def spread_over_layers(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[EditRequest],
    contexts: Sequence[str],
    layers: Sequence[int],
    z: torch.Tensor,
    solve: Solve,
    decay: float = 1.0,
) -> dict[int, MatrixDelta]:
    """``z`` (n, d_model): the wanted block output of ``layers[-1]`` (v*, one row per request).

    ``decay``: the i-th layer (lowest first) weighs decayⁱ, and takes its weight's part of the
    weight still to come: 1 gives MEMIT's equal shares, below 1 asks more of the lower layers.
    """
    check_unit_fraction("decay", decay)
    weights = [decay**i for i in range(len(layers))]
    z_layer = layers[-1]
    deltas: dict[int, MatrixDelta] = {}
    for i, layer in enumerate(layers):
        with applied(model, deltas):
            # MEMIT reads the residual on the bare prompt and the keys over all contexts
            readout = read_at_subject(model, tokenizer, requests, contexts, [layer], z_layer)
        assert readout.residual is not None
        keys = readout.keys[layer].double().T
        # a division, as before decay existed: with decay 1 it divides by the layers left, so
        # MEMIT's, AlphaEdit's and LOKI's default changes stay bit-identical to earlier runs
        share = (z.to(readout.residual) - readout.residual).double().T / (
            sum(weights[i:]) / weights[i]
        )
        a, b = solve(layer, keys, share)
        deltas[layer] = MatrixDelta(
            name=down_proj_name(model, layer), a=a.float().cpu(), b=b.float().cpu()
        )
    return deltas
