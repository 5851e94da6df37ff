"""Storing an editor's state (cached keys, projector bases) per version without repeating it.

Lifelong editors grow their state by appending (keys of each new edit as rows, or new basis
vectors as columns), so a tensor that extends its parent's along one dimension is stored as
just the new slice. Every so often the whole state is written again, which bounds the chain a
restore has to walk.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

FULL, APPEND = "full::", "append"  # append keys look like "append<dim>::name"


def _extension_dim(old: torch.Tensor, new: torch.Tensor) -> int | None:
    """The dimension along which ``new`` is ``old`` with more entries appended, if any."""
    if old.dim() == 0 or old.dim() != new.dim() or old.dtype != new.dtype:
        return None
    for dim in range(old.dim()):
        same_elsewhere = all(old.shape[d] == new.shape[d] for d in range(old.dim()) if d != dim)
        if (
            same_elsewhere
            and new.shape[dim] >= old.shape[dim]
            and torch.equal(new.narrow(dim, 0, old.shape[dim]), old)
        ):
            return dim
    return None


def encode(
    state: Mapping[str, torch.Tensor], parent: Mapping[str, torch.Tensor] | None
) -> tuple[dict[str, torch.Tensor], bool]:
    """Tensors for the state blob, and whether they stand alone (no parent needed)."""
    out: dict[str, torch.Tensor] = {}
    full = True
    for key, value in state.items():
        value = value.detach().cpu()
        old = parent.get(key) if parent is not None else None
        dim = _extension_dim(old.cpu(), value) if old is not None else None
        if dim is None:
            out[FULL + key] = value.contiguous()
        else:
            start = old.shape[dim]  # type: ignore[union-attr]
            tail = value.narrow(dim, start, value.shape[dim] - start)
            out[f"{APPEND}{dim}::{key}"] = tail.contiguous()
            full = False
    return out, full


def decode(
    blob: Mapping[str, torch.Tensor], parent: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for key, value in blob.items():
        prefix, _, name = key.partition("::")
        if prefix + "::" == FULL:
            state[name] = value.clone()
        elif prefix.startswith(APPEND) and prefix[len(APPEND) :].isdigit():
            if parent is None or name not in parent:
                raise ValueError(f"editor state: {name!r} appends to a parent that lacks it")
            state[name] = torch.cat([parent[name], value], dim=int(prefix[len(APPEND) :]))
        else:
            raise ValueError(f"editor state: unexpected tensor key {key!r}")
    return state
