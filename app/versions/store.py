"""Content-addressed blob store for version data: safetensors files named by their sha256.

Writes go to a temp file in the target folder, are fsynced and then renamed, so a crash leaves
either the whole blob or nothing. Reads verify the checksum, so a damaged file is never served.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


class BlobCorrupted(RuntimeError):
    pass


class BlobStore:
    def __init__(self, root: Path | str, *, cache_bytes: int = 256 << 20) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Versions are immutable, so blobs cache without invalidation; bounded by size.
        self._cache: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._cache_sizes: dict[str, int] = {}
        self._cache_limit = cache_bytes
        self._lock = threading.Lock()

    def path(self, sha: str) -> Path:
        return self.root / sha[:2] / f"{sha}.safetensors"

    def put(self, tensors: dict[str, torch.Tensor]) -> tuple[str, int]:
        """Store the tensors; returns (sha256, size in bytes). Identical content is stored once."""
        data = st_save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())})
        sha = hashlib.sha256(data).hexdigest()
        target = self.path(sha)
        if not target.exists():
            _atomic_write(target, data)
        return sha, len(data)

    def get(self, sha: str) -> dict[str, torch.Tensor]:
        with self._lock:
            if sha in self._cache:
                self._cache.move_to_end(sha)
                return self._cache[sha]
        try:
            data = self.path(sha).read_bytes()
        except FileNotFoundError:
            raise BlobCorrupted(f"version store: blob {sha} is missing") from None
        if hashlib.sha256(data).hexdigest() != sha:
            raise BlobCorrupted(f"version store: blob {sha} fails its checksum")
        tensors = st_load(data)
        self._remember(sha, tensors, len(data))
        return tensors

    def has(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def _remember(self, sha: str, tensors: dict[str, torch.Tensor], size: int) -> None:
        with self._lock:
            self._cache[sha] = tensors
            self._cache_sizes[sha] = size
            total = sum(self._cache_sizes.values())
            while total > self._cache_limit and len(self._cache) > 1:
                old, _ = self._cache.popitem(last=False)
                total -= self._cache_sizes.pop(old)


def _atomic_write(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The rename is durable only once the directory entry itself is on disk.
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
