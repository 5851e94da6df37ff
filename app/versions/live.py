"""The weights a resident model holds for one version, and moving it to another version.

``masters`` keeps an fp32 value of every matrix that differs from the base: a model served in
bf16/fp16 would otherwise lose small edits to rounding, and successive edits would drift.
Moving is split into ``prepare`` (slow: read blobs, add deltas; no effect on the model) and
``install`` (fast: copy a few matrices) so a server can prepare while it keeps serving.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from app.versions.chain import VersionInfo, touched
from app.versions.materialise import Materialiser, add_delta
from workers.editing.delta import MatrixDelta


@dataclass
class Prepared:
    version: int
    path: list[VersionInfo]
    masters: dict[str, torch.Tensor]


class LiveWeights:
    def __init__(self, model: nn.Module, materialiser: Materialiser) -> None:
        self.params = dict(model.named_parameters())
        self.materialiser = materialiser
        self.version = 0
        self.path: list[VersionInfo] = []
        self.masters: dict[str, torch.Tensor] = {}

    def prepare(self, path: list[VersionInfo]) -> Prepared:
        target = path[-1].id
        ids = [info.id for info in path]
        if self.path and self.version in ids:
            # Moving forward along the same branch: only the newer deltas need adding.
            masters = dict(self.masters)
            for info in path[ids.index(self.version) + 1 :]:
                for name, delta in self.materialiser.deltas(info).items():
                    masters[name] = add_delta(self._value(masters, name), delta)
        else:
            masters = self.materialiser.weights(path)
        return Prepared(target, path, masters)

    def prepare_edit(self, info: VersionInfo, deltas: Iterable[MatrixDelta]) -> Prepared:
        """The state after a new version ``info`` that adds ``deltas`` to the current one."""
        masters = dict(self.masters)
        for delta in deltas:
            masters[delta.name] = add_delta(self._value(masters, delta.name), delta)
        return Prepared(info.id, [*self.path, info], masters)

    @torch.no_grad()
    def install(self, prepared: Prepared) -> None:
        self.preview(prepared)
        self.adopt(prepared)

    @torch.no_grad()
    def preview(self, prepared: Prepared) -> list[str]:
        """Put ``prepared``'s values into the model but keep the current version's books, so
        ``restore`` can still undo it exactly; returns the names it changed."""
        changed = [
            name
            for name in sorted(set(self.masters) | set(prepared.masters))
            if self.masters.get(name) is not prepared.masters.get(name)
        ]
        for name in changed:
            self._copy_in(name, prepared.masters.get(name))
        return changed

    def adopt(self, prepared: Prepared) -> None:
        """Make ``prepared`` the current version (its values are already in the model)."""
        self.masters, self.path, self.version = prepared.masters, prepared.path, prepared.version

    @torch.no_grad()
    def restore(self, names: Iterable[str]) -> None:
        """Put the current version's values back into ``names`` after an aborted edit."""
        for name in names:
            self._copy_in(name, self.masters.get(name))

    @torch.no_grad()
    def reset(self) -> None:
        """Back to the base weights (version 0)."""
        for name in list(self.masters):
            self._copy_in(name, None)
        self.masters, self.path, self.version = {}, [], 0

    def touched(self) -> set[str]:
        return touched(self.path)

    def _value(self, masters: dict[str, torch.Tensor], name: str) -> torch.Tensor:
        return masters[name] if name in masters else self.materialiser.base.get(name)

    def _copy_in(self, name: str, master: torch.Tensor | None) -> None:
        value = master if master is not None else self.materialiser.base.get(name)
        param = self.params[name]
        param.data.copy_(value.to(device=param.device, dtype=param.dtype))
