"""The solvers on explicit float64 matrices, against dense least-squares solutions."""

import json

import pytest
import torch

from gifcli.errors import GifError
from gifcli.influence import solvers
from gifcli.influence.solvers import SOLVERS, SolveResult

TOLERANCE = {"exact": 1e-8, "lsqr": 1e-4, "cg": 1e-4, "neumann": 1e-3}


def _system(seed=0, rows=30, cols=12, rank=8):
    """A rank-deficient ``A`` (singular values in [0.5, 2]) and an inconsistent ``b``."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=torch.float64, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=generator))
    sigma = torch.linspace(0.5, 2.0, rank, dtype=torch.float64)
    a = u[:, :rank] @ torch.diag(sigma) @ v[:, :rank].T
    return a, torch.randn(rows, dtype=torch.float64, generator=generator)


def _solve(name, a, b, **kwargs):
    options = {"damping": 0.0, "max_iter": 500, "tol": 1e-10} | kwargs
    return SOLVERS[name](lambda x: a @ x, lambda y: a.T @ y, b, **options)


@pytest.mark.parametrize("damping", [0.0, 0.3])
@pytest.mark.parametrize("name", list(SOLVERS))
def test_solvers_match_the_damped_least_squares_solution(name, damping, reference):
    a, b = _system()
    x, result = _solve(name, a, b, damping=damping)
    assert result.converged, result.message
    expected = reference.damped_lstsq(a, b, damping)
    assert reference.relative_error(x, expected) < TOLERANCE[name]
    assert result.relative_residual == pytest.approx(float((a @ x - b).norm() / b.norm()))
    assert result.normal_residual < 1e-6


@pytest.mark.parametrize("name", ["lsqr", "cg", "neumann"])
def test_iterative_solvers_count_two_products_per_iteration(name):
    a, b = _system()
    calls = []

    def matvec(x):
        calls.append("A")
        return a @ x

    def rmatvec(y):
        calls.append("At")
        return a.T @ y

    _, result = SOLVERS[name](matvec, rmatvec, b, damping=0.1, max_iter=5, tol=0.0)
    assert result.hvps == len(calls) == 1 + 2 * result.iterations + 2  # start, iterations, check
    assert len(result.residual_history) == len(result.normal_history) == result.iterations


def test_non_convergence_is_reported_not_raised():
    a, b = _system()
    x, result = _solve("lsqr", a, b, max_iter=2)
    assert not result.converged
    assert "max_iter" in result.message
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_nan_products_stop_the_solve_with_advice(name):
    a, b = _system()
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        return a @ x if calls["n"] < 3 else torch.full((a.shape[0],), float("nan"))

    x, result = SOLVERS[name](poisoned, lambda y: a.T @ y, b, damping=0.1, max_iter=50, tol=1e-8)
    assert not result.converged
    assert "NaN" in result.message and "damping" in result.message
    assert json.dumps(result.to_dict(), allow_nan=False)


def test_zero_right_hand_side_gives_zero():
    a, b = _system()
    for name in SOLVERS:
        x, result = _solve(name, a, torch.zeros_like(b))
        assert result.converged and not x.any()


def test_invalid_inputs_raise_gif_errors():
    a, b = _system()
    with pytest.raises(GifError, match="NaN"):
        _solve("lsqr", a, torch.full_like(b, float("nan")))
    with pytest.raises(GifError, match="influence.damping"):
        _solve("cg", a, b, damping=-1.0)
    with pytest.raises(GifError, match="influence.max_iter"):
        _solve("neumann", a, b, max_iter=0)


def test_neumann_restarts_until_the_scale_is_large_enough_and_the_result_ignores_it(reference):
    a, b = _system()
    a = 10 * a  # σ_max = 20: the series at c = 1 diverges
    x_small, small = _solve("neumann", a, b, max_iter=3000, damping=1.0)
    x_large, large = _solve("neumann", a, b, max_iter=3000, damping=1.0, scale=20.0)
    assert small.converged and large.converged
    assert "c=14.5, 27 restarts" in small.message  # the first c with 2c² > σ_max² + λ²
    assert "0 restarts" in large.message
    assert reference.relative_error(x_small, x_large) < 1e-6
    assert reference.relative_error(x_small, reference.damped_lstsq(a, b, 1.0)) < 1e-6


def test_exact_refuses_matrices_too_large_to_build(monkeypatch):
    a, b = _system()
    monkeypatch.setattr(solvers, "MAX_DENSE_ENTRIES", 100)
    with pytest.raises(GifError, match="lsqr"):
        _solve("exact", a, b)


def test_progress_is_called_once_per_iteration():
    a, b = _system()
    seen = []
    _, result = _solve("lsqr", a, b, max_iter=4, tol=0.0, progress=lambda i, r: seen.append(i))
    assert seen == [1, 2, 3, 4] == list(range(1, result.iterations + 1))


def test_solve_result_serialises_to_strict_json():
    result = SolveResult(
        solver="none",
        iterations=0,
        hvps=0,
        relative_residual=float("nan"),
        normal_residual=1.0,
        converged=True,
        seconds=0.0,
    )
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["relative_residual"] is None and data["residual_history"] == []


def test_neumann_progress_counts_iterations_across_restarts():
    a, b = _system()
    seen = []
    _, result = _solve(
        "neumann",
        10 * a,
        b,
        damping=1.0,
        max_iter=50,
        tol=0.0,
        progress=lambda i, r: seen.append(i),
    )
    assert "restarts" in result.message and not result.converged
    assert seen == list(range(1, result.iterations + 1))


def test_neumann_absolute_tolerance_stops_on_the_iterate_difference(reference):
    """The paper's rule: stop once ‖x_{k+1} − x_k‖ ≤ absolute_tol · √len(x)."""
    a, b = _system()
    options = {"damping": 0.3, "max_iter": 3000, "tol": 1e-12, "scale": 2.0}  # 2c² > σ_max²
    x_full, full = _solve("neumann", a, b, **options)
    bound = 1e-4 * len(x_full) ** 0.5

    def next_difference(x):
        return float((a.T @ (b - a @ x) - 0.3**2 * x).norm()) / 2.0**2

    x, result = _solve("neumann", a, b, **options, absolute_tol=1e-4)
    assert result.converged, result.message
    assert "0 restarts" in result.message and result.iterations < full.iterations
    assert next_difference(x) <= bound
    # Stopped at the first iterate below: the one before it (one step fewer; the stopping
    # iteration returns its iterate unstepped) was still above the bound.
    x_before, _ = _solve("neumann", a, b, **options | {"max_iter": result.iterations - 2})
    assert next_difference(x_before) > bound
    assert reference.relative_error(x, x_full) < 1e-2  # an early stop, near the solution


@pytest.mark.parametrize(
    "options,key",
    [
        ({"scale": 0.0}, "scale"),
        ({"scale_step": float("inf")}, "scale_step"),
        ({"max_restarts": -1}, "max_restarts"),
        ({"absolute_tol": 0.0}, "absolute_tol"),
    ],
)
def test_neumann_rejects_invalid_options_naming_the_key(options, key):
    a, b = _system()
    with pytest.raises(GifError, match=f"influence.neumann.*{key}"):
        _solve("neumann", a, b, **options)
