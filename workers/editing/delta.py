"""A change to one weight matrix, stored as exact low-rank factors where the math allows."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MatrixDelta:
    """``W_new = W + A @ B`` (low-rank) or ``W + dense``; exactly one form is set."""

    name: str
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.dense is None) == (self.a is None or self.b is None):
            raise ValueError("delta: give either factors a and b, or dense")

    @classmethod
    def from_dense(cls, name: str, dense: torch.Tensor, *, rtol: float = 1e-6) -> MatrixDelta:
        """Factor a dense change if it is low-rank enough for the factors to be smaller."""
        dense = dense.detach().float()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        rank = int((s > s.max().clamp_min(1e-30) * rtol).sum()) if s.numel() else 0
        rows, cols = dense.shape
        if rank * (rows + cols) >= rows * cols:
            return cls(name=name, dense=dense.cpu())
        return cls(name=name, a=(u[:, :rank] * s[:rank]).cpu(), b=vh[:rank].cpu())

    @property
    def rank(self) -> int | None:
        return None if self.a is None else int(self.a.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        if self.dense is not None:
            return tuple(self.dense.shape)  # type: ignore[return-value]
        assert self.a is not None and self.b is not None
        return int(self.a.shape[0]), int(self.b.shape[1])

    def to_dense(self) -> torch.Tensor:
        if self.dense is not None:
            return self.dense
        assert self.a is not None and self.b is not None
        return self.a @ self.b

    def norm(self) -> float:
        """Frobenius norm, computed from the factors without forming the matrix."""
        if self.dense is not None:
            return float(self.dense.norm())
        assert self.a is not None and self.b is not None
        gram = (self.a.T @ self.a) * (self.b @ self.b.T)
        return float(gram.sum().clamp_min(0).sqrt())

    def numel(self) -> int:
        if self.dense is not None:
            return self.dense.numel()
        assert self.a is not None and self.b is not None
        return self.a.numel() + self.b.numel()

    def tensors(self) -> dict[str, torch.Tensor]:
        """Flat name → tensor mapping, for safetensors."""
        if self.dense is not None:
            return {f"{self.name}::dense": self.dense.contiguous()}
        assert self.a is not None and self.b is not None
        return {f"{self.name}::a": self.a.contiguous(), f"{self.name}::b": self.b.contiguous()}

    @staticmethod
    def from_tensors(tensors: dict[str, torch.Tensor]) -> list[MatrixDelta]:
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, _, part = key.rpartition("::")
            if part not in ("a", "b", "dense") or not name:
                raise ValueError(f"delta: unexpected tensor key {key!r}")
            grouped.setdefault(name, {})[part] = value
        return [MatrixDelta(name=n, **parts) for n, parts in grouped.items()]

    @torch.no_grad()
    def apply_to(self, weight: torch.Tensor, sign: float = 1.0) -> None:
        """Add (or with sign=-1 subtract) the change to ``weight`` in place, in fp32."""
        change = self.to_dense().to(device=weight.device, dtype=torch.float32)
        weight.copy_((weight.float() + sign * change).to(weight.dtype))
