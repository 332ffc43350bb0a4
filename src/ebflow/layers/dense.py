"""Dense layers ``y = W x + b`` on vectors, in four parameterisations of ``W``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .base import (
    Example,
    LinearFlowLayer,
    Shape,
    check_pivots,
    checked_lu_factor,
    example_inputs,
    lu_solve,
    perturbed,
    singularity_checked,
)

__all__ = ["Dense", "random_orthogonal"]

Parameterization = Literal["full", "tril", "triu", "lu"]
PARAMETERIZATIONS: tuple[Parameterization, ...] = get_args(Parameterization)
#: Initialisations of a Dense weight (``init``).
DenseInit = Literal["orthogonal", "identity", "negative_identity"]


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A Haar-random ``n x n`` orthogonal matrix in the default dtype.

    ``torch.nn.init.orthogonal_`` on a float64 matrix (QR of a Gaussian matrix, signs fixed):
    PyTorch's own routine, the same draws as before for the same RNG state."""
    q = torch.empty(n, n, dtype=torch.float64)
    torch.nn.init.orthogonal_(q, generator=generator)
    return q.to(torch.get_default_dtype()).contiguous()


def _permutation_index(permutation: Tensor) -> Tensor:
    """The index ``s`` of a permutation matrix ``P``: ``(P v)_i = v[s[i]]`` (the column of row
    ``i``'s one), so that ``P`` acts on a batch of row vectors as ``v.index_select(1, s)``."""
    return permutation.argmax(dim=1)


def _is_permutation_matrix(matrix: Tensor) -> bool:
    """True when ``matrix`` is square, made of zeros and ones, with one 1 per row and column
    (one device read)."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        return False
    binary = ((matrix == 0) | (matrix == 1)).all()
    rows, cols = matrix.sum(dim=1), matrix.sum(dim=0)
    return bool(binary & (rows == 1).all() & (cols == 1).all())


class Dense(LinearFlowLayer):
    r"""Dense layer :math:`y = W x + b` on inputs of shape ``(batch, features)``.

    ``parameterization`` chooses how :math:`W` is stored:

    * ``"full"`` -- unconstrained :math:`W` (orthogonal initialisation);
      :math:`\log|\det W|` by LU.
    * ``"tril"`` / ``"triu"`` -- lower / upper triangular :math:`W` (identity initialisation);
      :math:`\log|\det W| = \sum_i \log|W_{ii}|`.
    * ``"lu"`` -- :math:`W = P L U` with a fixed permutation :math:`P`, unit lower-triangular
      :math:`L` and upper-triangular :math:`U`; :math:`\log|\det W| = \sum_i \log|U_{ii}|`.

    ``init``: ``"orthogonal"`` (default for full and LU), ``"identity"`` (default for triangular),
    or ``"negative_identity"`` (:math:`W = -I` and bias :math:`b = \mathbf{1}`: the reference code's
    FC recipe, so the first layer starts at :math:`y = 1 - x`).

    Cost (batch ``B``, multiply-adds): ``transform`` :math:`B D^2` for ``"full"``,
    ``"tril"`` and ``"triu"`` (one product with the weight, masked in :math:`O(D^2)`);
    :math:`2 B D^2` for ``"lu"``, which never forms :math:`W`: it applies the masked factors to
    the batch, :math:`y = P(L(Ux)) + b`, and :math:`P` as an index (a gather of the columns,
    :math:`O(B D)`). ``log|det|``: ``"full"`` an LU, :math:`O(D^3)` -- once per parameter state
    without gradients (cached, shared with the inverse), at every call with gradients (maximum
    likelihood) -- and :math:`O(D)` (the diagonal) for the triangular and LU forms. Inverse:
    ``"full"`` :math:`O(D^3)` once (cached LU) plus :math:`O(B D^2)` per call; the triangular
    and LU forms :math:`O(D^2)` once (the masked factors, cached) plus :math:`O(B D^2)`
    triangular solves per call (``"lu"``: :math:`P^\top` as an index, no factorisation).
    :meth:`matrix` forms :math:`W` (``"lu"``: :math:`O(D^3)`); no computation of the layer
    calls it, it is a reference for checks.
    """

    # buffers of the LU parameterization (the triangles are masked by torch.tril / torch.triu,
    # not by D x D mask buffers: three of them were 0.6 GB per layer at D = 7,056)
    permutation: Tensor
    permutation_index: Tensor

    def __init__(
        self,
        features: int,
        out_features: int | None = None,
        *,
        parameterization: Parameterization = "full",
        bias: bool = True,
        init: DenseInit | None = None,
    ) -> None:
        super().__init__()
        if out_features is not None and out_features != features:
            raise ConfigError(
                f"Dense layer must be square to be invertible: got {features} inputs and "
                f"{out_features} outputs"
            )
        if not isinstance(features, int) or features < 1:
            raise ConfigError(f"Dense layer needs a positive number of features, got {features!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(
                f"unknown dense parameterization {parameterization!r}; "
                f"choose one of {', '.join(PARAMETERIZATIONS)}"
            )
        self.features = features
        self.parameterization = parameterization
        # an unconstrained weight's determinant comes from the LU that the inverse uses
        self.logdet_from_factors = parameterization == "full"
        # triangular and LU: log|det| is a diagonal, the factors masked triangles -- cheaper than a cache key
        self.caches_derived_values = parameterization == "full"
        d = features
        if init is None:
            init = "identity" if parameterization in ("tril", "triu") else "orthogonal"
        if init not in ("orthogonal", "identity", "negative_identity"):
            raise ConfigError(
                f"unknown dense initialisation {init!r}; choose orthogonal, identity or negative_identity"
            )
        starts: dict[str, Callable[[int], Tensor]] = {
            "orthogonal": random_orthogonal,
            "identity": torch.eye,
            "negative_identity": lambda n: -torch.eye(n),
        }
        start = starts[init](d)

        if parameterization == "full":
            self.weight = nn.Parameter(start.clone())
        elif parameterization in ("tril", "triu"):
            self.weight = nn.Parameter(self._triangle(start))
        else:  # lu
            p, l, u = torch.linalg.lu(start.double())
            self.register_buffer("permutation", p.to(start.dtype))
            # P as an index, (P v)_i = v[permutation_index[i]]: derived from ``permutation`` (the
            # saved buffer), so not saved itself; re-derived whenever a state dict is loaded
            self.register_buffer("permutation_index", _permutation_index(self.permutation), persistent=False)
            self.lower = nn.Parameter(torch.tril(l, -1).to(start.dtype))
            self.upper = nn.Parameter(torch.triu(u).to(start.dtype))
        # the reference's FC recipe: W = -I with every bias at +1 (not negated with the weight)
        start_bias = torch.ones(d) if init == "negative_identity" else torch.zeros(d)
        self.bias = nn.Parameter(start_bias) if bias else None

    @classmethod
    def examples(cls) -> list[Example]:
        return [
            (
                perturbed(cls(4, parameterization=p, init="identity" if p != "full" else None)),
                example_inputs(5, 4),
            )
            for p in PARAMETERIZATIONS
        ]

    def extra_repr(self) -> str:
        return f"features={self.features}, parameterization={self.parameterization}, bias={self.bias is not None}"

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.parameterization != "lu" or self.permutation.is_meta:
            return
        # the saved P matrix is the truth; its index (not saved) follows it
        if not _is_permutation_matrix(self.permutation):
            error_msgs.append(
                f"{prefix}permutation: Dense({self.features}, lu) needs a permutation matrix "
                "(zeros and ones, one 1 per row and column)"
            )
            return
        with torch.no_grad():  # on the loaded buffer's device (``assign=True`` may move it)
            self.permutation_index = _permutation_index(self.permutation)

    # -- the matrix -----------------------------------------------------------------------
    def _triangle(self, weight: Tensor) -> Tensor:
        """``"tril"`` / ``"triu"``: the weight's lower / upper triangle (the rest is zero, and
        gets no gradient)."""
        return torch.tril(weight) if self.parameterization == "tril" else torch.triu(weight)

    def _lu_factors(self) -> tuple[Tensor, Tensor]:
        lower = torch.tril(self.lower, -1)
        lower.diagonal().add_(1.0)  # unit diagonal, in place on the fresh copy (O(D))
        return lower, torch.triu(self.upper)

    def matrix(self) -> Tensor:
        """The weight matrix ``W`` (``features x features``), for checks: no computation of the
        layer forms it (``"lu"``: two :math:`D^3` products)."""
        if self.parameterization == "full":
            return self.weight
        if self.parameterization in ("tril", "triu"):
            return self._triangle(self.weight)
        lower, upper = self._lu_factors()
        return self.permutation @ lower @ upper

    # -- LinearFlowLayer -----------------------------------------------------------------
    def output_shape(self, event_shape: Shape) -> Shape:
        if tuple(event_shape) != (self.features,):
            raise InputError(
                f"Dense({self.features}) expects inputs of shape (batch, {self.features}), "
                f"got event shape {tuple(event_shape)}"
            )
        return (self.features,)

    def transform(self, x: Tensor) -> Tensor:
        self._check_event_shape(x, (self.features,), "inputs")
        if self.parameterization != "lu":
            return F.linear(x, self.matrix(), self.bias)  # a masked triangle is O(D^2)
        # y = P (L (U x)) + b on the batch, without W = PLU: two B x D x D products and a gather
        lower, upper = self._lu_factors()
        h = F.linear(F.linear(x, upper), lower).index_select(1, self.permutation_index)
        return h if self.bias is None else h + self.bias

    def _log_abs_det(self, event_shape: Shape) -> Tensor:
        if self.parameterization == "full":
            # differentiable LU in the weight's dtype; its pivots reveal a singular weight (not
            # checked inside unchecked_singularity(): maximum-likelihood training, no host sync)
            lu, _, _ = torch.linalg.lu_factor_ex(self.weight)
            if singularity_checked():
                check_pivots(lu.diagonal(), f"Dense({self.features}, full)")
            return torch.log(lu.diagonal().abs()).sum()
        if self.parameterization in ("tril", "triu"):
            return torch.log(torch.diagonal(self.weight).abs()).sum()
        return torch.log(torch.diagonal(self.upper).abs()).sum()

    def _factorize(self, event_shape: Shape) -> tuple[Tensor, ...]:
        name = f"Dense({self.features}, {self.parameterization})"
        if self.parameterization == "full":
            return checked_lu_factor(self.weight.double(), name)
        if self.parameterization in ("tril", "triu"):
            w = self.matrix().double()
            check_pivots(w.diagonal(), name)
            return (w,)
        lower, upper = (t.double() for t in self._lu_factors())
        check_pivots(upper.diagonal(), name)
        # P^T as an index: (P^T v)_j = v[inverse[j]], the inverse permutation of P's index
        return (torch.argsort(self.permutation_index), lower, upper)

    def _inverse_with(self, factors: tuple[Tensor, ...], y: Tensor) -> Tensor:
        self._check_event_shape(y, (self.features,), "outputs")
        rhs = y if self.bias is None else y - self.bias
        rhs = rhs.double().T  # (features, batch)
        if self.parameterization == "full":
            lu, pivots = factors
            x = lu_solve(lu, pivots, rhs)
        elif self.parameterization in ("tril", "triu"):
            (w,) = factors
            x = torch.linalg.solve_triangular(w, rhs, upper=self.parameterization == "triu")
        else:
            inverse, lower, upper = factors
            x = rhs.index_select(0, inverse)  # P^T rhs
            x = torch.linalg.solve_triangular(lower, x, upper=False, unitriangular=True)
            x = torch.linalg.solve_triangular(upper, x, upper=True)
        return x.T.to(y.dtype)
