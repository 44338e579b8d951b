"""Composed curvature operators against dense matrices."""

import pytest
import torch

from gifcli.influence import CurvatureOperator
from gifcli.influence.operators import (
    Combination,
    Restricted,
    Zero,
    products,
    removal_curvature,
    scatter,
    shifted,
)


class Dense:
    """A dense matrix behind the operator interface, counting its products."""

    def __init__(self, matrix):
        self.matrix, self.calls = matrix, 0
        self.dim, self.dtype, self.device = matrix.shape[0], matrix.dtype, matrix.device

    def matvec(self, v):
        self.calls += 1
        return self.matrix @ v


def _symmetric(dim, seed):
    a = torch.randn(dim, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return a + a.T


def test_combination_is_the_weighted_sum_and_drops_zero_terms():
    a, b = Dense(_symmetric(7, 0)), Dense(_symmetric(7, 1))
    zero = Zero(dim=7, dtype=torch.float64, device=torch.device("cpu"))
    combined = Combination([(0.75, a), (0.25, b), (3.0, zero), (0.0, b)])
    v = torch.randn(7, dtype=torch.float64)
    expected = (0.75 * a.matrix + 0.25 * b.matrix) @ v
    assert torch.allclose(combined.matvec(v), expected, rtol=1e-14, atol=1e-14)
    assert (a.calls, b.calls, products(combined)) == (1, 1, 2)
    only_zero = Combination([(1.0, zero)])
    assert products(only_zero) == 0 and not only_zero.matvec(v).any()


def test_combination_refuses_mismatched_dimensions():
    with pytest.raises(ValueError, match="one dimension"):
        Combination([(1.0, Dense(_symmetric(3, 0))), (1.0, Dense(_symmetric(4, 0)))])


def test_a_shift_adds_a_multiple_of_the_identity_at_no_product():
    a = Dense(_symmetric(6, 3))
    v = torch.randn(6, dtype=torch.float64)
    shift = shifted(a, 0.125)
    expected = (a.matrix + 0.125 * torch.eye(6, dtype=torch.float64)) @ v
    assert torch.allclose(shift.matvec(v), expected, rtol=1e-14, atol=1e-14)
    assert products(shift) == 1 and a.calls == 1
    assert shifted(a, 0.0) is a


def test_restriction_is_the_principal_submatrix():
    a = Dense(_symmetric(9, 2))
    index = torch.tensor([0, 3, 4, 8])
    x = torch.randn(4, dtype=torch.float64)
    restricted = Restricted(a, index)
    assert restricted.dim == 4 and products(restricted) == 1
    expected = a.matrix[index][:, index] @ x
    assert torch.allclose(restricted.matvec(x), expected, rtol=1e-14, atol=1e-14)
    assert torch.equal(scatter(x, index, 9)[index], x) and scatter(x, index, 9).count_nonzero() == 4


def test_removal_curvature_of_a_class_and_of_a_backdoor(mlp, reference):
    def curvature_of(x, y, curvature="hessian"):
        return CurvatureOperator(model=mlp.model, x=x, y=y, batch_size=4, curvature=curvature)

    x, y = mlp.removal_x, mlp.removal_y
    true = (y + 1) % 4
    v = torch.randn(len(mlp.theta), dtype=torch.float64)
    plain = removal_curvature(curvature_of, x, y)
    assert isinstance(plain, CurvatureOperator)
    relabelled = removal_curvature(curvature_of, x, y, true_labels=true)
    h_u = reference.hessian(mlp.model, x, y)
    expected = (h_u - reference.hessian(mlp.model, x, true)) @ v
    assert reference.relative_error(relabelled.matvec(v), expected) < 1e-12
    assert products(relabelled) == 2
    ggn = removal_curvature(
        lambda a, b: curvature_of(a, b, "ggn"), x, y, true_labels=true, curvature="ggn"
    )
    assert isinstance(ggn, Zero) and products(ggn) == 0
