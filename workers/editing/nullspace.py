"""Null-space projectors built from a weight matrix and the keys of past edits.

A change ΔW applied as ΔW·P, with P = I − QQᵀ, leaves W·k untouched for every k in span(Q). Q spans
(a) W's dominant input directions — what the layer already responds to, read off the weights,
no corpus needed — and (b) the cached keys of earlier edits, so a new edit cannot overwrite them.
"""

from __future__ import annotations

import torch


def weight_input_basis(weight: torch.Tensor, rel_threshold: float) -> torch.Tensor:
    """Right singular vectors of W (d_out × d_in) whose singular value ≥ rel_threshold · σ_max."""
    _, s, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    keep = s >= rel_threshold * s[0]
    return vh[keep].T.contiguous()  # (d_in, r)


def energy_basis(moment: torch.Tensor, share: float) -> torch.Tensor:
    """Top eigenvectors of a second moment E[kkᵀ] (d × d) holding ``share`` of its trace (d × r)."""
    eigvals, eigvecs = torch.linalg.eigh(moment.double())
    eigvals, eigvecs = eigvals.flip(0).clamp_min(0), eigvecs.flip(1)
    cumulative = torch.cumsum(eigvals, 0) / eigvals.sum().clamp_min(1e-30)
    rank = int((cumulative < share).sum()) + 1
    return eigvecs[:, :rank].float().contiguous()


def orthonormal_extend(
    basis: torch.Tensor | None, vectors: torch.Tensor, rel_tol: float
) -> torch.Tensor:
    """Add to ``basis`` (d × r, orthonormal columns) the directions of ``vectors`` (m × d) it lacks.

    A residual direction is kept when its singular value is at least ``rel_tol`` times the largest
    singular value of ``vectors``: small residues are numerical noise or already protected.
    """
    vectors = vectors.detach().float()
    residual = (
        vectors if basis is None or basis.numel() == 0 else vectors - (vectors @ basis) @ basis.T
    )
    _, s, vh = torch.linalg.svd(residual, full_matrices=False)
    scale = torch.linalg.matrix_norm(vectors, ord=2).clamp_min(1e-30)
    new = vh[s >= rel_tol * scale].T
    if basis is None or basis.numel() == 0:
        return new.contiguous()
    # re-orthonormalise against the old basis once more: SVD residues drift by ~1e-7
    new = new - basis @ (basis.T @ new)
    new = torch.linalg.qr(new).Q if new.shape[1] else new
    return torch.cat([basis, new], dim=1).contiguous()


class Projector:
    """P = I − QQᵀ for an orthonormal Q (d × r); applied to row vectors without forming P."""

    def __init__(self, q: torch.Tensor) -> None:
        self.q = q

    @property
    def dim(self) -> int:
        return int(self.q.shape[0])

    @property
    def protected_rank(self) -> int:
        return int(self.q.shape[1])

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x·P for rows x (… × d)."""
        q = self.q.to(x.dtype)
        return x - (x @ q) @ q.T

    def matrix(self) -> torch.Tensor:
        return torch.eye(self.dim, dtype=self.q.dtype, device=self.q.device) - self.q @ self.q.T

    def ridge_update(
        self,
        keys: torch.Tensor,
        share: torch.Tensor,
        past_keys: torch.Tensor,
        l2: float,
        prior: torch.Tensor | None = None,
        exact: bool = False,
        prior_is_projected: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors (a, b) of AlphaEdit's change under this P: ΔW = R Xᵀ with
        X = (P G P + αI)⁻¹ P K, G = KKᵀ + K_pK_pᵀ (equal to AlphaEdit's (P G + αI)⁻¹ P K: X
        lies in P's range, where PG acts as PGP).

        keys K (d, n), share R (d_out, n), past_keys K_pᵀ (n_past, d). With M = [K, K_p] and
        A = PM, PGP = AAᵀ and PK = A[:, :n], so by the push-through identity
        X = A (AᵀA + αI)⁻¹ [I_n; 0]: a solve of size n + n_past instead of d, never forming a
        d × d matrix (0.9 → 0.3 s per edit over three SmolLM2 layers). Once there are more keys
        than dimensions, or with a ``prior`` (d × d, symmetric PSD, added to G), the d × d system
        is solved by Cholesky instead.

        ``prior_is_projected``: ``prior`` is already P·prior·P (``sandwich``), as an editor that
        solves many times under the same weight basis can keep it.

        ``exact``: rescale R to R (XᵀK)⁺ so that ΔW K = R exactly: the ridge then chooses only
        the change's input directions, not how much of R it delivers.
        """
        n = keys.shape[1]
        m = torch.cat([keys, past_keys.T.to(keys)], dim=1)
        a = self.apply(m.T).T  # (d, n + n_past)
        if prior is None and a.shape[1] <= a.shape[0]:
            inner = a.T @ a
            inner.diagonal().add_(l2)
            x = a @ torch.linalg.solve(
                inner, torch.eye(a.shape[1], n, dtype=a.dtype, device=a.device)
            )
        else:
            gram = a @ a.T
            if prior is not None:
                prior = prior.to(keys)
                gram = gram + (prior if prior_is_projected else self.apply(self.apply(prior).T))
            gram.diagonal().add_(l2)
            x = torch.cholesky_solve(a[:, :n], torch.linalg.cholesky(gram))
        if exact:
            # R (XᵀK)⁺, so ΔW K = R. XᵀK = Kᵀ P (PGP + αI)⁻¹ P K is symmetric; the pseudo-inverse
            # keeps a batch with two requests on the same key (one value for both) solvable.
            fit = torch.linalg.pinv(x.T @ keys, hermitian=True, rtol=1e-8)
            share = share @ fit
        return share, x.T

    def sandwich(self, inner: torch.Tensor, inner_rank: int) -> torch.Tensor:
        """P C P from B = P₀ C P₀, P₀ the projector of Q's first ``inner_rank`` columns (the later
        ones, Q_c, are orthogonal to them, so P = P₀ − Q_cQ_cᵀ and P₀Q_c = Q_c). With M = B Q_c:
        P C P = B − Q_cMᵀ − MQ_cᵀ + Q_c(Q_cᵀM)Q_cᵀ — thin products only, where projecting C
        anew costs two d × d × r products per solve (3× the time of a whole edit on SmolLM2)."""
        qc = self.q[:, inner_rank:].to(inner)
        if not qc.shape[1]:
            return inner
        m = inner @ qc
        return inner - qc @ m.T - m @ qc.T + qc @ (qc.T @ m) @ qc.T

    def ratio(self, keys: torch.Tensor) -> float:
        """‖Pk‖/‖k‖ over the rows of ``keys``: the share of the keys an edit may still act on."""
        return float(self.apply(keys).norm() / keys.norm().clamp_min(1e-30))
