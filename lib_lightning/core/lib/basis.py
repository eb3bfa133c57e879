"""Bases of a node layer: PCA (step 1 of LIB), LIB (step 2, the "jacobian" formula), neuron, final layer.

Every basis acts on augmented row activations ``f_aug = (f, 1)`` of width ``d + 1``:
``f_hat = f_aug @ basis`` and ``f_aug ≈ f_hat @ basis_pinv``. Feature 0 is the constant direction
whenever ``has_constant`` is true.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from lib_lightning.core.lib.stats import ActivationStats, augment, centring_matrices
from lib_lightning.core.validation import check_thresholds

__all__ = [
    "LayerBasis", "Whitening", "whiten", "lib_basis", "pca_basis", "neuron_basis", "identity_basis", "NEGATIVE_RTOL",
]

# Eigenvalues of a Gram matrix or of M are >= 0 in exact arithmetic; float64 eigh returns them to within
# ~ d·ε·λ_max (≲ 1e-13 for d ≤ 1000). A value below −NEGATIVE_RTOL·λ_max is not rounding: the statistics
# themselves are wrong (e.g. a cancelling one-pass covariance), and |λ| would hide it.
NEGATIVE_RTOL = 1e-10
_warned: set[str] = set()  # layers already warned about: once per layer name and process


@dataclass(frozen=True)
class LayerBasis:
    """A basis of one node layer.

    Attributes:
        name: the node layer's name.
        kind: ``"lib"``, ``"pca"``, ``"neuron"`` or ``"identity"`` (an unrotated final layer).
        basis: ``(d + 1, d_lib)`` C, mapping augmented activations to features.
        basis_pinv: ``(d_lib, d + 1)`` C⁺, an explicit left inverse (C⁺C = I); its rows are the feature
            directions. Not the Moore–Penrose inverse when centring.
        lambdas: ``(d_lib,)`` importance of each feature: Λ for LIB, the variance for PCA, the second
            moment E[f̂²] for neuron and identity bases.
        pca_eigenvalues: ``(d + 1,)`` all eigenvalues of the (centred) Gram matrix, descending, the
            constant direction's first when centring (before truncation).
        has_constant: whether feature 0 is the constant direction.
    """

    name: str
    kind: str
    basis: torch.Tensor
    basis_pinv: torch.Tensor
    lambdas: torch.Tensor
    pca_eigenvalues: torch.Tensor
    has_constant: bool

    @property
    def d_lib(self) -> int:
        return self.basis.shape[1]

    @property
    def d(self) -> int:
        return self.basis.shape[0] - 1

    def transform(self, acts: torch.Tensor) -> torch.Tensor:
        """Activations ``(..., d)`` -> features ``(..., d_lib)``."""
        return augment(acts.to(self.basis.dtype)) @ self.basis

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Features ``(..., d_lib)`` -> activations ``(..., d)`` (the projection f C C⁺)."""
        return (feats @ self.basis_pinv)[..., :-1]

    def directions(self) -> torch.Tensor:
        """``(d_lib, d)`` feature directions in activation space (rows of C⁺, constant coordinate dropped)."""
        return self.basis_pinv[:, :-1]


@dataclass(frozen=True)
class Whitening:
    """Step 1 (spec §2): PCA of the centred augmented Gram matrix, truncated.

    Attributes:
        u: ``(d + 1, k1)`` kept eigenvectors U (constant first when centring).
        eigenvalues: ``(k1,)`` kept eigenvalues D.
        all_eigenvalues: ``(d + 1,)`` every |eigenvalue|, same order convention, before truncation.
        y, y_inv: ``(d + 1, d + 1)`` centring matrix Y and its inverse (identity when not centring).
        has_constant: centred, so U[:, 0] is the constant direction.
    """

    u: torch.Tensor
    eigenvalues: torch.Tensor
    all_eigenvalues: torch.Tensor
    y: torch.Tensor
    y_inv: torch.Tensor
    has_constant: bool

    @property
    def r(self) -> torch.Tensor:
        """``(d + 1, k1)`` whitening map R = Y U D^{-1/2}."""
        return self.y @ self.u / self.eigenvalues.sqrt()

    @property
    def r_pinv(self) -> torch.Tensor:
        """``(k1, d + 1)`` left inverse R⁺ = D^{1/2} Uᵀ Y⁻¹."""
        return self.eigenvalues.sqrt()[:, None] * (self.u.T @ self.y_inv)


def _keep(values: torch.Tensor, abs_threshold: float, rel_threshold: float) -> torch.Tensor:
    """Mask of values above both the absolute and the relative (× max) threshold."""
    if values.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=values.device)
    return (values > abs_threshold) & (values > rel_threshold * values.max())


def _warn_negative(evals: torch.Tensor, name: str, matrix: str, negative_rtol: float) -> None:
    """Warns once per layer name when an eigenvalue is negative beyond rounding relative to the largest."""
    if evals.numel() == 0 or name in _warned:
        return
    low, high = float(evals.min()), float(evals.abs().max())
    if low < -negative_rtol * high:
        _warned.add(name)
        warnings.warn(
            f"node layer {name!r}: the {matrix} has an eigenvalue {low:.3g}, {-low / high:.2g} of the largest "
            f"({high:.3g}); rounding stays below {negative_rtol:g} of it, so the statistics are inaccurate "
            "(|λ| is used from here on; warned once per layer)",
            RuntimeWarning,
            stacklevel=3,
        )


def _sorted_eigh(
    matrix: torch.Tensor, name: str = "", what: str = "matrix", negative_rtol: float = NEGATIVE_RTOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """|eigenvalues| descending and their eigenvectors (columns), in float64; warns on large negatives."""
    evals, evecs = torch.linalg.eigh(matrix.to(torch.float64))
    _warn_negative(evals, name, what, negative_rtol)
    evals = evals.abs()
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[:, order]


def whiten(
    stats: ActivationStats,
    center: bool = True,
    abs_threshold: float = 1e-12,
    rel_threshold: float = 0.0,
    name: str = "",
) -> Whitening:
    """Step 1: eigendecompose the Gram matrix and keep directions with variance above the thresholds.

    Centred, G = blockdiag(Cov, 1) by construction, so the covariance block is eigendecomposed on its
    own and the constant direction e_bias is exact (this avoids the mixing the spec warns of when a
    covariance eigenvalue is numerically 1). It is always kept; ``rel_threshold`` is relative to the
    largest non-constant eigenvalue. ``name`` (the node layer) labels the warning on eigenvalues negative
    beyond rounding.
    """
    check_thresholds(abs_threshold, rel_threshold)
    gram = stats.gram(center)
    d = stats.d
    if center:
        y, y_inv = centring_matrices(stats.mean)
        evals, evecs = _sorted_eigh(gram[:d, :d], name, "covariance")
        keep = _keep(evals, abs_threshold, rel_threshold)
        u = torch.zeros(d + 1, int(keep.sum()) + 1, dtype=torch.float64, device=gram.device)
        u[d, 0] = 1.0
        u[:d, 1:] = evecs[:, keep]
        one = gram[d : d + 1, d]
        return Whitening(u, torch.cat([one, evals[keep]]), torch.cat([one, evals]), y, y_inv, True)
    eye = torch.eye(d + 1, dtype=torch.float64, device=gram.device)
    evals, evecs = _sorted_eigh(gram, name, "Gram matrix")
    keep = _keep(evals, abs_threshold, rel_threshold)
    return Whitening(evecs[:, keep], evals[keep], evals, eye, eye.clone(), False)


def pca_basis(name: str, w: Whitening) -> LayerBasis:
    """The PCA baseline: C = W = Y U (not whitened), C⁺ = Uᵀ Y⁻¹; lambdas are the variances D."""
    return LayerBasis(name, "pca", w.y @ w.u, w.u.T @ w.y_inv, w.eigenvalues, w.all_eigenvalues, w.has_constant)


def lib_basis(
    name: str,
    w: Whitening,
    m_prime: torch.Tensor,
    abs_threshold: float = 1e-12,
    rel_threshold: float = 0.0,
    n_masked: int | None = None,
    max_features: int | None = None,
) -> LayerBasis:
    """Step 2, the "jacobian" LIB: C = R V Λ^{1/2}, C⁺ = Λ^{-1/2} Vᵀ R⁺ (spec §3).

    M = R⁺ M′ R⁺ᵀ; the masked block M[n_m:, n_m:] = V_s diag(λ) V_sᵀ (|λ|, descending); Λ = (diag(M)[:n_m], λ).
    Masked directions (the constant one) are never dropped; the others are kept above ``abs_threshold``
    and ``rel_threshold`` × the largest unmasked λ. A vanishing masked Λ (the mean direction does not
    matter downstream) keeps scale 1 so that C⁺ stays finite.

    Args:
        m_prime: ``(d + 1, d + 1)`` M′ = E[J̄ᵀ J̄] in augmented activation coordinates.
        n_masked: number of leading masked directions; default 1 if centred else 0.
        max_features: keep at most this many features (masked ones included).

    Raises:
        ValueError: if ``max_features`` exceeds the number of directions kept by the thresholds.
    """
    check_thresholds(abs_threshold, rel_threshold)
    n_m = (1 if w.has_constant else 0) if n_masked is None else n_masked
    r_pinv = w.r_pinv
    m = r_pinv @ m_prime.to(torch.float64) @ r_pinv.T  # (k1, k1)
    m = (m + m.T) / 2
    lam_s, v_s = _sorted_eigh(m[n_m:, n_m:], name, "whitened M")
    keep = _keep(lam_s, abs_threshold, rel_threshold)
    if max_features is not None:
        rank = n_m + int(keep.sum())
        if not n_m <= max_features <= rank:
            raise ValueError(
                f"node layer {name!r}: max_features={max_features} is outside [{n_m}, {rank}], the rank of the basis "
                f"at abs_threshold={abs_threshold}, rel_threshold={rel_threshold}"
            )
        keep &= torch.arange(keep.numel(), device=keep.device) < max_features - n_m
    k1, k = m.shape[0], n_m + int(keep.sum())
    v = torch.zeros(k1, k, dtype=torch.float64, device=m.device)
    v[:n_m, :n_m] = torch.eye(n_m, dtype=torch.float64)
    v[n_m:, n_m:] = v_s[:, keep]
    lambdas = torch.cat([m.diagonal()[:n_m], lam_s[keep]])
    scale = lambdas.clone()
    scale[:n_m] = torch.where(scale[:n_m] > abs_threshold, scale[:n_m], torch.ones_like(scale[:n_m]))
    basis = w.r @ v * scale.sqrt()
    basis_pinv = (v.T @ r_pinv) / scale.sqrt()[:, None]
    return LayerBasis(name, "lib", basis, basis_pinv, lambdas, w.all_eigenvalues, w.has_constant)


def neuron_basis(name: str, stats: ActivationStats) -> LayerBasis:
    """The neuron basis: the constant coordinate moved to index 0, every neuron kept as is."""
    d = stats.d
    perm = torch.cat([torch.tensor([d]), torch.arange(d)])
    basis = torch.eye(d + 1, dtype=torch.float64, device=stats.sum.device)[:, perm]
    second_moment = stats.second_moment().diagonal()[perm]
    evals = whiten(stats, True, 0.0, 0.0, name).all_eigenvalues  # constant first, as LayerBasis documents
    return LayerBasis(name, "neuron", basis, basis.T.clone(), second_moment, evals, True)


def identity_basis(name: str, stats: ActivationStats, pca_eigenvalues: torch.Tensor) -> LayerBasis:
    """An unrotated final layer (e.g. logits): f̂ = f, no constant direction."""
    d = stats.d
    eye = torch.eye(d + 1, d, dtype=torch.float64, device=stats.sum.device)
    second_moment = stats.second_moment().diagonal()[:d]
    return LayerBasis(name, "identity", eye, eye.T.clone(), second_moment, pca_eigenvalues, False)
