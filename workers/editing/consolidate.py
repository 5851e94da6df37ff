"""Consolidation: the accumulated change of one matrix, re-solved as if all edits came at once.

Each sequential edit spends the least energy *it* needs, with the earlier edits' keys as a soft
constraint and no knowledge of the later ones; the sum of those changes is not the least-energy
change that does what they do together. Given the drift D = W − W₀ and the keys K of every edit
so far, the consolidated drift is

    D* = argmin α‖D'‖² + tr(D' C D'ᵀ)   subject to   D' K = D K,   D' P = D',

C the (projected) prior on ordinary text and P the weight null space every edit is confined to:
every edit key still gets exactly the output it gets now, and what the drift does to any other
input is as small as the edits allow. It is the update rule of one edit
(``Projector.ridge_update`` with ``exact=True``) applied to all edits at once.
"""

from __future__ import annotations

import torch

from workers.editing.nullspace import Projector


def least_energy_drift(
    drift: torch.Tensor,
    keys: torch.Tensor,
    projector: Projector,
    l2: float,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """D* for drift D (d_out × d) and edit keys (n × d), with ``prior`` already P·C·P (d × d).

    Solved in float64; returned in the drift's dtype."""
    if keys.ndim != 2 or keys.shape[1] != drift.shape[1]:
        raise ValueError(f"keys: must be (n, {drift.shape[1]}), got {tuple(keys.shape)}")
    if not len(keys):
        return torch.zeros_like(drift)
    d = drift.double()
    k = keys.to(d).T  # (d, n)
    past = torch.zeros(0, k.shape[0], dtype=d.dtype, device=d.device)
    prior = None if prior is None else prior.to(d)
    share, inputs = projector.ridge_update(
        k, d @ k, past, l2, prior, exact=True, prior_is_projected=True
    )
    return (share @ inputs).to(drift.dtype)
