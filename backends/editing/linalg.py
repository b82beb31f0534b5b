"""Update solvers for locate-and-edit methods and AlphaEdit's null-space projector.

Notation: ``W`` is an MLP output projection as ``(d_out, d_in)``; keys ``K``
are ``(d_in, n)`` columns; ``R`` are the wanted output changes ``(d_out, n)``;
``C`` is the uncentred second moment ``E[k k^T]`` of keys over a corpus
(:mod:`backends.stats`).  All solves run in float64 for stability and return
float32, on the device of the keys ``K`` (the edited layer's device): CPU and
CUDA solve there; MPS has no float64, so its solves run on the CPU
(:func:`solve_device`) and the result comes back to the keys' device.  Every
operand is moved to that device first (a no-op when it is already there).

* ROME (rank one):  ``dW = r u^T / (u . k)`` with ``u = C^-1 k`` (or ``u = k``
  without the covariance adjustment), so ``dW k = r`` exactly.
* MEMIT (least squares with a covariance prior):
  ``dW = R K^T (lambda C + K K^T)^-1``.
* AlphaEdit: ``P = U U^T`` with ``U`` the eigenvectors of ``C`` whose
  eigenvalues are below a threshold (the approximate null space of the
  preserved keys), ``X = (P (K K^T + K_p K_p^T) + l2 I)^-1 P K R^T``,
  ``dW = X^T``.  ``X`` lies in the range of ``P`` (``l2 X = P(...)``), so
  ``dW K0 = X^T K0 = Y^T P K0 ~ 0`` for preserved keys ``K0``.

  We never form ``P`` or ``K K^T`` (``d_in x d_in`` each): writing ``X = U Z``
  and multiplying by ``U^T`` (``U^T U = I``) gives the same solution from an
  ``r x r`` system, ``Z = (A A^T + l2 I)^-1 U^T K R^T`` with
  ``A = U^T [K_p, K]``, so memory is ``O(d_in (r + n))`` instead of several
  ``d_in^2`` float64 matrices, and earlier edits are kept as their keys
  ``K_p`` rather than as ``K_p K_p^T``.
"""

from __future__ import annotations

import torch


def solve_device(device: torch.device | str) -> torch.device:
    """Where a float64 solve for tensors on ``device`` runs: that device, or the CPU for MPS (no float64)."""
    d = torch.device(device)
    return torch.device("cpu") if d.type == "mps" else d


def _f64(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    return t.to(device=dev, dtype=torch.float64)


def rome_update(k: torch.Tensor, r: torch.Tensor, cov: torch.Tensor | None = None,
                cov_weight: float = 1.0) -> torch.Tensor:
    """Rank-one ``dW`` with ``dW k = r``; ``cov`` (if given) shapes the left vector."""
    dev = solve_device(k.device)
    k64 = _f64(k, dev).flatten()
    if cov is not None:
        a = _f64(cov, dev) * cov_weight
        a = a + 1e-6 * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype,
                                                                          device=a.device)
        u = torch.linalg.solve(a, k64)
    else:
        u = k64.clone()
    u = u / u.norm()
    denom = torch.dot(u, k64)
    return (torch.outer(_f64(r, dev).flatten(), u) / denom).to(device=k.device, dtype=torch.float32)


def multi_key_update(K: torch.Tensor, R: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
    """ROME with ``m`` keys: the smallest ``dW`` (in the ``C``-norm) with ``dW K = R`` exactly.

    ROME's rank-one update solves ``min ||dW||_C  s.t.  dW k = r``, whose
    solution is ``r u^T / (u . k)`` with ``u = C^-1 k``.  With ``m`` keys (the
    questions of a merged group, each keyed at its own subject) the
    constraints are ``dW K = R`` (``K``: ``d_in x m``, ``R``: ``d_out x m``)
    and the solution is ``dW = R (U^T K)^-1 U^T`` with ``U = C^-1 K`` (or ``K``
    without the covariance: the minimum Frobenius norm solution).  For ``m = 1``
    this is exactly :func:`rome_update`.  ``U^T K`` is ``m x m``; a tiny ridge
    (1e-6 of its mean diagonal) keeps it invertible when two keys coincide.
    """
    dev = solve_device(K.device)
    K64, R64 = _f64(K, dev), _f64(R, dev)
    if cov is not None:
        a = _f64(cov, dev)
        a = a + 1e-6 * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype,
                                                                          device=a.device)
        U = torch.linalg.solve(a, K64)
    else:
        U = K64
    g = U.T @ K64
    g = g + 1e-6 * g.diagonal().abs().mean().clamp_min(1e-12) * torch.eye(g.shape[0], dtype=g.dtype,
                                                                            device=g.device)
    return (R64 @ torch.linalg.solve(g, U.T)).to(device=K.device, dtype=torch.float32)


def memit_update(K: torch.Tensor, R: torch.Tensor, cov: torch.Tensor, lam: float) -> torch.Tensor:
    """``R K^T (lam C + K K^T)^-1`` as ``(d_out, d_in)``."""
    dev = solve_device(K.device)
    K64, R64 = _f64(K, dev), _f64(R, dev)
    a = _f64(cov, dev)
    a = a.clone() if a is cov else a
    a.mul_(lam).addmm_(K64, K64.T)                        # in place: one d_in^2 float64 matrix, not three
    # (lam C + K K^T) is symmetric: solve A X = K R^T, dW = X^T
    x = torch.linalg.solve(a, K64 @ R64.T)
    return x.T.to(device=K.device, dtype=torch.float32)


def nullspace_basis(cov: torch.Tensor, threshold: float, relative: bool = False) -> tuple[torch.Tensor, int]:
    """(``U``: orthonormal eigenvectors of ``cov`` with eigenvalue < threshold as ``(d, r)`` float32, ``r``)."""
    evals, evecs = torch.linalg.eigh(_f64(cov, solve_device(cov.device)))
    cut = threshold * float(evals.max()) if relative else threshold
    u = evecs[:, evals < cut].to(device=cov.device, dtype=torch.float32).contiguous()
    return u, int(u.shape[1])


def nullspace_projector(cov: torch.Tensor, threshold: float, relative: bool = False) -> tuple[torch.Tensor, int]:
    """(dense projector ``U U^T``, ``r``); for tests and inspection — the update uses the basis."""
    u, r = nullspace_basis(cov, threshold, relative)
    u64 = u.double()
    return (u64 @ u64.T).float(), r


def alphaedit_update(K: torch.Tensor, R: torch.Tensor, U: torch.Tensor, prev_keys: torch.Tensor | None,
                     l2: float) -> torch.Tensor:
    """AlphaEdit's projected update ``(d_out, d_in)``.

    ``U``: null-space basis ``(d_in, r)``; ``prev_keys``: the earlier edits' keys ``(d_in, n_p)`` or None.
    """
    dev = solve_device(K.device)
    K64, R64, U64 = _f64(K, dev), _f64(R, dev), _f64(U, dev)
    if U64.shape[1] == 0:
        return torch.zeros((R.shape[0], K.shape[0]), dtype=torch.float32, device=K.device)
    allk = K64 if prev_keys is None or prev_keys.shape[1] == 0 else torch.cat([_f64(prev_keys, dev), K64], 1)
    A = U64.T @ allk                                        # (r, n_p + n)
    lhs = A @ A.T
    lhs.diagonal().add_(l2)
    Z = torch.linalg.solve(lhs, (U64.T @ K64) @ R64.T)      # (r, d_out)
    return (U64 @ Z).T.to(device=K.device, dtype=torch.float32)
