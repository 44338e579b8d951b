"""Curvature operators composed from others: sums, shifts, restrictions, and the removal set's
``H_U``.

Nothing here computes a product itself: every operator forwards to ``CurvatureOperator``
products (``gifcli.influence.hvp``), so composition needs no new HVP machinery. Each operator
knows how many underlying curvature products one of its ``matvec`` costs (``products``), which
is what the solve records count as HVPs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from gifcli.influence.hvp import curvature_kind


class LinearOperator(Protocol):
    """What the estimators need from a curvature operator (``CurvatureOperator`` has it)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


def products(operator: LinearOperator) -> int:
    """Curvature products (HVPs) one ``operator.matvec`` costs: 1 for a ``CurvatureOperator``."""
    return getattr(operator, "products", 1)


class Zero:
    """The zero operator on ``[dim]`` vectors; costs no product."""

    products = 0

    def __init__(self, *, dim: int, dtype: torch.dtype, device: torch.device) -> None:
        self.dim, self.dtype, self.device = dim, dtype, device

    def matvec(self, v: Tensor) -> Tensor:
        return torch.zeros(self.dim, dtype=self.dtype, device=self.device)


class Combination:
    """``Σ_k c_k A_k`` for operators ``A_k`` on the same flat vectors, ``c_k`` numbers.

    Terms whose coefficient is 0 or whose operator is ``Zero`` are dropped, so they cost no
    product; with no term left the combination is the zero operator.
    """

    def __init__(self, terms: Sequence[tuple[float, LinearOperator]]) -> None:
        if not terms:
            raise ValueError("a combination needs at least one term (for its dimension)")
        first = terms[0][1]
        if any(op.dim != first.dim for _, op in terms):
            raise ValueError("every term of a combination must act on vectors of one dimension")
        self.dim, self.dtype, self.device = first.dim, first.dtype, first.device
        self.terms = [(float(c), op) for c, op in terms if c != 0 and not isinstance(op, Zero)]
        self.products = sum(products(op) for _, op in self.terms)

    def matvec(self, v: Tensor) -> Tensor:
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for coefficient, op in self.terms:
            total += coefficient * op.matvec(v)
        return total


class Shifted:
    """``A + c·I`` on the same flat vectors: the weight decay of the trained objective in its
    curvature, and a Levenberg-Marquardt damping (docs/design.md, "Damping"). The shift costs
    no product."""

    def __init__(self, operator: LinearOperator, shift: float) -> None:
        self.operator, self.shift = operator, float(shift)
        self.dim, self.dtype, self.device = operator.dim, operator.dtype, operator.device
        self.products = products(operator)

    def matvec(self, v: Tensor) -> Tensor:
        return self.operator.matvec(v) + self.shift * v


def shifted(operator: LinearOperator, shift: float) -> LinearOperator:
    """``operator + shift·I``; the operator itself when ``shift`` is 0."""
    return operator if shift == 0 else Shifted(operator, shift)


class Restricted:
    """``A[s, s]`` on ``[|s|]`` vectors: the coordinates outside ``s`` held at zero.

    ``x ↦ (A x̃)_s`` with ``x̃`` the full-size vector that is ``x`` on ``s`` and 0 elsewhere:
    one product of ``A`` followed by a gather. ``index``: int64 ``[|s|]`` coordinates of ``s``.
    For a symmetric ``A`` the restriction is symmetric too (its own transpose).
    """

    def __init__(self, operator: LinearOperator, index: Tensor) -> None:
        self.operator, self.index = operator, index.to(operator.device)
        self.dim, self.dtype, self.device = len(index), operator.dtype, operator.device
        self.products = products(operator)

    def matvec(self, x: Tensor) -> Tensor:
        return self.operator.matvec(scatter(x, self.index, self.operator.dim))[self.index]


def scatter(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """``x`` (``[|s|]``) placed at ``index`` in a zero vector of ``[dim]`` (``x``'s dtype)."""
    full = torch.zeros(dim, dtype=x.dtype, device=x.device)
    full[index] = x
    return full


def removal_curvature(
    curvature_of: Callable[[Tensor, Tensor], LinearOperator],
    x: Tensor,
    y: Tensor,
    *,
    true_labels: Tensor | None = None,
    curvature: str = "hessian",
) -> LinearOperator:
    """The removal set's curvature ``H_U`` that ``sif`` needs, both in ``H_S = (1 − p) H + p
    H_U`` and in its second-order term ``H_S⁻¹ H_U Δ₁``: the curvature of the loss the edit
    takes out (docs/design.md, "Estimators"). ``(x, y)``: the removal set's inputs ``[m, ...]``
    and the labels it was trained on ``[m]``; ``curvature_of(x, y)`` builds the curvature
    operator of the mean loss over ``(x, y)``.

    Class removal: ``curvature_of(x, y)``. Backdoor relabelling (``true_labels`` given): the
    points are removed with their poisoned labels ``y`` and re-added with their true labels,
    so it is the difference of the two operators on the same inputs. For a curvature the
    labels do not enter (``Curvature.label_free``: the Gauss-Newton matrix ``Jᵀ H_out J`` of the
    cross-entropy, ``H_out = diag(p) − p pᵀ`` the softmax's) that difference is exactly zero,
    so it is ``Zero`` and costs nothing.
    """
    removed = curvature_of(x, y)
    if true_labels is None:
        return removed
    if curvature_kind(curvature).label_free:
        return Zero(dim=removed.dim, dtype=removed.dtype, device=removed.device)
    return Combination([(1.0, removed), (-1.0, curvature_of(x, true_labels))])
