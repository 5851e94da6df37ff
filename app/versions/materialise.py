"""Computing a version's weights and editor state from the base model and the stored blobs.

Weights are always computed in fp32 on the CPU, in the same order everywhere (worker and every
API replica), so all processes hold bit-identical values for the same version.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from app.versions import state as state_codec
from app.versions.chain import DELTA, KEYFRAME, STATE, VersionInfo, touched
from app.versions.store import BlobStore
from workers.editing.delta import MatrixDelta


class BaseWeights:
    """fp32 copies of base-model matrices, read on demand from the model's safetensors files."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._index: dict[str, Path] | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _files(self) -> dict[str, Path]:
        if self._index is None:
            index_file = self.model_dir / "model.safetensors.index.json"
            if index_file.is_file():
                weight_map = json.loads(index_file.read_text())["weight_map"]
                self._index = {k: self.model_dir / v for k, v in weight_map.items()}
            else:
                self._index = {}
                for file in sorted(self.model_dir.glob("*.safetensors")):
                    with safe_open(str(file), framework="pt") as handle:
                        self._index.update({k: file for k in handle.keys()})  # noqa: SIM118
        return self._index

    def get(self, name: str) -> torch.Tensor:
        """The base value; callers must not modify it in place."""
        with self._lock:
            if name not in self._cache:
                file = self._files().get(name)
                if file is None:
                    raise KeyError(f"model: base weight {name!r} not found in {self.model_dir}")
                with safe_open(str(file), framework="pt") as handle:
                    self._cache[name] = handle.get_tensor(name).float().contiguous()
            return self._cache[name]


def add_delta(value: torch.Tensor, delta: MatrixDelta) -> torch.Tensor:
    """``value + delta`` in fp32 on the CPU, as a new tensor."""
    return value + delta.to_dense().detach().to("cpu", torch.float32)


class Materialiser:
    def __init__(self, store: BlobStore, base: BaseWeights) -> None:
        self.store = store
        self.base = base

    def deltas(self, info: VersionInfo) -> dict[str, MatrixDelta]:
        sha = info.blobs.get(DELTA)
        if sha is None:
            return {}
        return {d.name: d for d in MatrixDelta.from_tensors(self.store.get(sha))}

    def keyframe(self, info: VersionInfo, name: str) -> torch.Tensor:
        return self.store.get(info.blobs[KEYFRAME])[name]

    def weight(self, path: list[VersionInfo], name: str) -> torch.Tensor:
        """The value of matrix ``name`` at the last version of ``path``."""
        start = 0
        value = self.base.get(name)
        for i in range(len(path) - 1, -1, -1):
            if name in path[i].keyframes:
                value, start = self.keyframe(path[i], name), i + 1
                break
        for info in path[start:]:
            if name in info.matrices:
                value = add_delta(value, self.deltas(info)[name])
        return value

    def weights(self, path: list[VersionInfo]) -> dict[str, torch.Tensor]:
        return {name: self.weight(path, name) for name in sorted(touched(path))}

    def state(self, path: list[VersionInfo]) -> dict[str, torch.Tensor]:
        start = 0
        for i in range(len(path) - 1, -1, -1):
            if path[i].state_full:
                start = i
                break
        current: dict[str, torch.Tensor] | None = None
        for info in path[start:]:
            sha = info.blobs.get(STATE)
            current = {} if sha is None else state_codec.decode(self.store.get(sha), current)
        return current or {}
