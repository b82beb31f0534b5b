"""Update solvers for locate-and-edit methods and AlphaEdit's null-space projector.

Notation: ``W`` is an MLP output projection as ``(d_out, d_in)``; keys ``K``
are ``(d_in, n)`` columns; ``R`` are the wanted output changes ``(d_out, n)``;
``C`` is the uncentred second moment ``E[k k^T]`` of keys over a corpus
(:mod:`backends.stats`).  All solves run in float64 for stability and return
float32.

* ROME (rank one):  ``dW = r u^T / (u . k)`` with ``u = C^-1 k`` (or ``u = k``
  without the covariance adjustment), so ``dW k = r`` exactly.
* MEMIT (least squares with a covariance prior):
  ``dW = R K^T (lambda C + K K^T)^-1``.
* AlphaEdit: ``P = U U^T`` with ``U`` the eigenvectors of ``C`` whose
  eigenvalues are below a threshold (the approximate null space of the
  preserved keys), ``X = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K R^T``,
  ``dW = X^T``.  ``X`` lies in the range of ``P`` (``l2 X = P(...)``), so
  ``dW K0 = X^T K0 = Y^T P K0 ~ 0`` for preserved keys ``K0``.
"""

from __future__ import annotations

import torch


def rome_update(k: torch.Tensor, r: torch.Tensor, cov: torch.Tensor | None = None,
                cov_weight: float = 1.0) -> torch.Tensor:
    """Rank-one ``dW`` with ``dW k = r``; ``cov`` (if given) shapes the left vector."""
    k64 = k.double().flatten()
    if cov is not None:
        a = cov.double() * cov_weight
        a = a + 1e-6 * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype,
                                                                          device=a.device)
        u = torch.linalg.solve(a, k64)
    else:
        u = k64.clone()
    u = u / u.norm()
    denom = torch.dot(u, k64)
    return (torch.outer(r.double().flatten(), u) / denom).float()


def memit_update(K: torch.Tensor, R: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """``R K^T (lam C + K K^T)^-1`` as ``(d_out, d_in)``."""
    K64, R64 = K.double(), R.double()
    a = lam * cov.double() + K64 @ K64.T
    # (lam C + K K^T) is symmetric: solve A X = K R^T, dW = X^T
    x = torch.linalg.solve(a, K64 @ R64.T)
    return x.T.float()


def nullspace_projector(cov: torch.Tensor, threshold: float, relative: bool = False) -> tuple[torch.Tensor, int]:
    """(projector ``U U^T`` onto eigenvectors with eigenvalue < threshold, their count)."""
    evals, evecs = torch.linalg.eigh(cov.double())
    cut = threshold * float(evals.max()) if relative else threshold
    u = evecs[:, evals < cut]
    return (u @ u.T).float(), int(u.shape[1])


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, P: torch.Tensor, prev_kk: torch.Tensor | None,
                     l2: float) -> torch.Tensor:
    """AlphaEdit's projected update ``(d_out, d_in)``; ``prev_kk`` = sum of earlier edits' ``K K^T``."""
    K64, R64, P64 = K.double(), R.double(), P.double()
    kk = K64 @ K64.T
    if prev_kk is not None:
        kk = kk + prev_kk.double()
    a = P64 @ kk + l2 * torch.eye(kk.shape[0], dtype=kk.dtype, device=kk.device)
    x = torch.linalg.solve(a, P64 @ K64 @ R64.T)
    return x.T.float()
