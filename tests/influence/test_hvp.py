"""Curvature products and gradients against dense float64 ground truth."""

import pytest
import torch

from gifcli.influence import hvp
from gifcli.influence.hvp import (
    HVP_MODES,
    CurvatureOperator,
    flatten,
    flatten_params,
    loss_gradient,
    trainable_parameters,
    unflatten,
)


def _operator(problem, **kwargs):
    options = {"batch_size": 7, "hvp_mode": "forward-over-reverse"} | kwargs
    return CurvatureOperator(model=problem.model, x=problem.x, y=problem.y, **options)


@pytest.mark.parametrize("mode", HVP_MODES)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hessian_product_matches_dense_hessian(name, mode, request, reference):
    problem = request.getfixturevalue(name)
    problem.model.train()  # the operator must switch to eval(): BatchNorm, dropout
    dense = problem.hessian
    operator = _operator(problem, hvp_mode=mode, batch_size=12)
    torch.manual_seed(1)
    v = torch.randn(operator.dim, dtype=torch.float64)
    assert not problem.model.training
    assert reference.relative_error(operator.matvec(v), dense @ v) < 1e-10
    assert reference.relative_error(operator.matvec(2 * v), dense @ (2 * v)) < 1e-10
    assert operator.hvp_count == 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batch_size_does_not_change_the_product(dtype, reference):
    problem = reference.make_cnn()
    problem.model.to(dtype)
    torch.manual_seed(2)
    v = torch.randn(sum(p.numel() for p in problem.model.parameters()), dtype=dtype)
    products = [_operator(problem, batch_size=size).matvec(v) for size in (1, 7, len(problem.x))]
    for product in products[1:]:
        assert (product - products[0]).norm() <= 1e-6 * products[0].norm()


def test_ggn_product_matches_dense_gauss_newton_and_is_psd(cnn, reference):
    dense = reference.ggn(cnn.model, cnn.x, cnn.y)
    assert torch.linalg.eigvalsh(dense).min() > -1e-12  # positive semi-definite
    hessian_eigs = torch.linalg.eigvalsh(cnn.hessian)
    assert hessian_eigs.min() < -1e-3  # ... where the Hessian is not
    operator = _operator(cnn, curvature="ggn")
    v = torch.randn(operator.dim, dtype=torch.float64)
    assert reference.relative_error(operator.matvec(v), dense @ v) < 1e-10


def test_buffers_stay_fixed_and_float32_data_meets_float64_model(cnn):
    buffers = {name: b.clone() for name, b in cnn.model.named_buffers()}
    operator = _operator(cnn)
    assert cnn.x.dtype == torch.float32
    out = operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == (operator.dim,)
    for name, b in cnn.model.named_buffers():
        assert torch.equal(b, buffers[name]), name


def test_operator_keeps_the_parameters_it_was_built_at(mlp, reference):
    problem = reference.make_mlp(seed=3)
    operator = _operator(problem)
    v = torch.randn(operator.dim, dtype=torch.float64)
    before = operator.matvec(v)
    with torch.no_grad():
        for p in problem.model.parameters():
            p.add_(1.0)
    assert torch.allclose(operator.matvec(v), before, rtol=0, atol=1e-14)


def test_loss_gradient_matches_autograd_for_any_batch_size(cnn, reference):
    expected = reference.gradient(cnn.model, cnn.x, cnn.y)
    for size in (1, 5, len(cnn.x)):
        actual = loss_gradient(cnn.model, cnn.x, cnn.y, batch_size=size)
        assert reference.relative_error(actual, expected) < 1e-12


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_cache_respects_its_budget(curvature, mlp, reference):
    """The linearised Hessian batches and the kept Gauss-Newton graphs: the same products
    cached, partly cached and uncached, the first product and the replayed second."""
    dense = mlp.hessian if curvature == "hessian" else reference.ggn(mlp.model, mlp.x, mlp.y)
    v = torch.randn(dense.shape[0], dtype=torch.float64)

    def operator(**kwargs):  # two batches of 20
        return _operator(mlp, hvp_mode="linearize", batch_size=20, curvature=curvature, **kwargs)

    full = operator()
    full.matvec(v)
    per_batch = full.cached_bytes // 2
    assert full.cached_batches == 2 and per_batch > 0
    partial = operator(cache_bytes=3 * per_batch // 2)
    uncached = operator(cache_bytes=0)
    for each in (full, partial, uncached):
        for _ in range(2):  # built (or not) on the first product, replayed on the second
            assert reference.relative_error(each.matvec(v), dense @ v) < 1e-10
    assert partial.cached_batches == 1 and uncached.cached_batches == 0
    assert partial.cached_bytes == per_batch and uncached.cached_bytes == 0


def test_every_accumulation_goes_through_reduce_sum(monkeypatch, mlp):
    calls = []

    def counting(tensor):
        calls.append(tensor.numel())
        return tensor

    monkeypatch.setattr(hvp, "reduce_sum", counting)
    operator = _operator(mlp)
    operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    loss_gradient(mlp.model, mlp.x, mlp.y, batch_size=8)
    # (sum of products, sample count) then (sum of gradients, sample count)
    assert calls == [operator.dim, 1, operator.dim, 1]


def test_uneven_shards_reduced_by_sum_give_the_full_sample_product(monkeypatch, mlp):
    """Two simulated ranks holding 11 and 29 points: reduce sums and counts, then divide."""
    v = torch.randn(sum(p.numel() for p in mlp.model.parameters()), dtype=torch.float64)
    full = _operator(mlp).matvec(v)
    recorded = []
    monkeypatch.setattr(hvp, "reduce_sum", lambda t: recorded.append(t.clone()) or t)
    fast = {"hvp_mode": "forward-over-reverse"}
    CurvatureOperator(model=mlp.model, x=mlp.x[11:], y=mlp.y[11:], batch_size=4, **fast).matvec(v)
    other_rank = iter(recorded)
    monkeypatch.setattr(hvp, "reduce_sum", lambda t: t + next(other_rank))
    sharded = CurvatureOperator(model=mlp.model, x=mlp.x[:11], y=mlp.y[:11], batch_size=3, **fast)
    assert torch.allclose(sharded.matvec(v), full, rtol=1e-12, atol=0)


def test_flat_vectors_follow_named_parameters_order(cnn):
    params = trainable_parameters(cnn.model)
    assert list(params) == [name for name, _ in cnn.model.named_parameters()]
    flat = flatten_params(cnn.model)
    assert torch.equal(flat, flatten(p.detach() for p in params.values()))
    for name, view in unflatten(flat, params).items():
        assert torch.equal(view, params[name])
    with pytest.raises(ValueError, match="expected"):
        unflatten(flat[:-1], params)


def test_frozen_parameters_are_left_out_of_the_flat_vector(reference):
    problem = reference.make_mlp(seed=4)
    problem.model.net[0].bias.requires_grad_(False)
    operator = _operator(problem)
    assert operator.dim == sum(p.numel() for p in problem.model.parameters()) - 10
