"""The solvers on explicit float64 matrices, against dense least-squares solutions."""

import json

import pytest
import torch

from gifcli.errors import GifError
from gifcli.influence import solvers
from gifcli.influence.solvers import SOLVERS, SolveResult, SolverSettings

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
    """``SOLVERS[name]`` on the matrix ``a``: the shared settings from ``kwargs``, the rest as
    the solver's own options."""
    shared = {"max_iter": 500, "tol": 1e-10} | {
        key: kwargs.pop(key) for key in ("damping", "max_iter", "tol", "progress") if key in kwargs
    }
    return SOLVERS[name](lambda x: a @ x, lambda y: a.T @ y, b, SolverSettings(**shared), **kwargs)


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

    settings = SolverSettings(damping=0.1, max_iter=5, tol=0.0)
    _, result = SOLVERS[name](matvec, rmatvec, b, settings)
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

    settings = SolverSettings(damping=0.1, max_iter=50, tol=1e-8)
    x, result = SOLVERS[name](poisoned, lambda y: a.T @ y, b, settings)
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
    with pytest.raises(GifError, match="^damping: "):
        _solve("cg", a, b, damping=-1.0)
    with pytest.raises(GifError, match="^max_iter: "):
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


# --------------------------------------------------------------------------- the LSQR path


def _matrix(kind, seed=0):
    """Test systems ``(A, b)`` in float64: tall rank-deficient, square, symmetric indefinite,
    singular symmetric, wide."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    if kind == "tall":
        return _system(seed)
    if kind == "square":
        return randn(12, 12), randn(12)
    if kind in ("indefinite", "singular"):
        q, _ = torch.linalg.qr(randn(14, 14))
        eigenvalues = torch.linspace(-1.5, 3.0, 14, dtype=torch.float64)
        if kind == "singular":
            eigenvalues[::3] = 0.0
        return q @ torch.diag(eigenvalues) @ q.T, randn(14)
    return randn(8, 20), randn(8)  # wide


KINDS = ("tall", "square", "indefinite", "singular", "wide")


def _path(a, b, **kwargs):
    return solvers.lsqr_path(lambda x: a @ x, lambda y: a.T @ y, b, **({"tol": 0.0} | kwargs))


@pytest.mark.parametrize("kind", KINDS)
def test_path_equals_a_separate_lsqr_run_at_every_damping_of_the_grid(kind, reference):
    a, b = _matrix(kind)
    path = _path(a, b, max_iter=6)
    assert path.iterations == 6 and len(path) == 8
    assert path.relative == pytest.approx(solvers.damping_grid(8, 1e-4, 1.0))
    for i, damping in enumerate(path.lambdas):
        x, run = _solve("lsqr", a, b, damping=damping, max_iter=path.iterations, tol=0.0)
        record = path.records[i]
        assert reference.relative_error(path.solution(i), x) < 1e-10
        assert record.residual_history == pytest.approx(run.residual_history, rel=1e-8)
        assert record.normal_history == pytest.approx(run.normal_history, rel=1e-6, abs=1e-12)
        # the diagnostics from the small problem are the true ones of the returned x
        residual = a @ path.solution(i) - b
        normal = a.T @ residual + damping**2 * path.solution(i)
        assert record.relative_residual == pytest.approx(float(residual.norm() / b.norm()))
        assert record.normal_residual == pytest.approx(float(normal.norm()), rel=1e-6, abs=1e-12)
        assert record.damping == damping and record.sigma_max == path.sigma_max


@pytest.mark.parametrize("kind", KINDS)
def test_path_over_the_whole_krylov_space_is_the_exact_damped_solution(kind, reference):
    a, b = _matrix(kind)
    path = _path(a, b, max_iter=min(a.shape))
    assert path.sigma_max == pytest.approx(float(torch.linalg.matrix_norm(a, 2)), rel=1e-8)
    history = path.sigma_history  # σ_max(B_j) grows with j (interlacing) up to σ_max(A)
    assert len(history) == path.iterations and history[-1] == path.sigma_max
    assert all(b >= a - 1e-12 for a, b in zip(history, history[1:], strict=False))
    for i, damping in enumerate(path.lambdas):
        expected = reference.damped_lstsq(a, b, damping)
        assert reference.relative_error(path.solution(i), expected) < 1e-5
    # Past n steps the lost orthogonality (1e-6 here) is made good, as in lsqr: run to tol.
    path = _path(a, b, max_iter=3 * min(a.shape), tol=1e-12)
    for i, damping in enumerate(path.lambdas):
        expected = reference.damped_lstsq(a, b, damping)
        assert reference.relative_error(path.solution(i), expected) < 1e-8
        assert path.records[i].converged, path.records[i].message


def test_path_with_an_absolute_grid_matches_lsqr_and_the_undamped_solution(reference):
    a, b = _matrix("tall")
    path = _path(a, b, grid=[0.0, 0.3], relative=False, max_iter=12, tol=1e-12)
    assert path.lambdas == [0.0, 0.3]
    assert path.relative == pytest.approx([0.0, 0.3 / path.sigma_max])
    for i, damping in enumerate(path.lambdas):
        expected = reference.damped_lstsq(a, b, damping)
        assert reference.relative_error(path.solution(i), expected) < 1e-8


def test_path_costs_the_products_of_one_run_and_verify_adds_two_per_damping():
    a, b = _matrix("square")
    path = _path(a, b, max_iter=5)
    assert path.hvps == 1 + 2 * 5 and all(r.hvps == path.hvps for r in path.records)
    checked = _path(a, b, grid=[0.01, 0.1], max_iter=5, verify=True)
    assert checked.hvps == 1 + 2 * 5 + 2 * 2
    x, run = _solve("lsqr", a, b, damping=checked.lambdas[1], max_iter=5, tol=0.0)
    record = checked.records[1]
    assert record.relative_residual == pytest.approx(run.relative_residual, rel=1e-10)
    assert record.normal_residual == pytest.approx(run.normal_residual, rel=1e-6)
    assert record.message.startswith(run.message)


def test_path_stops_once_every_damping_has_converged():
    a, b = _matrix("tall")  # rank 8: the Krylov space is exhausted after 8 steps
    path = _path(a, b, max_iter=50, tol=1e-9)
    assert path.iterations <= 9
    assert all(record.converged for record in path.records), path.records[0].message


def test_path_basis_cap_limits_the_iterations_and_says_so():
    a, b = _matrix("tall")
    vector = a.shape[1] * 8  # bytes of one float64 Krylov vector
    path = _path(a, b, max_iter=10, max_basis_bytes=3 * vector)
    assert path.iterations == 3 and path.basis.shape == (3, a.shape[1])
    assert "basis cap" in path.message and "basis cap" in path.records[0].message
    with pytest.raises(GifError, match="basis cap"):
        _path(a, b, max_iter=10, max_basis_bytes=vector - 1)


def test_path_stops_on_nan_products_with_finite_solutions():
    a, b = _matrix("square")
    calls = {"n": 0}

    def poisoned(x):
        calls["n"] += 1
        return a @ x if calls["n"] < 4 else torch.full((a.shape[0],), float("nan"))

    path = solvers.lsqr_path(poisoned, lambda y: a.T @ y, b, max_iter=10, tol=0.0)
    assert path.iterations == 3
    assert all(not r.converged and "NaN" in r.message for r in path.records)
    assert all(torch.isfinite(path.solution(i)).all() for i in range(len(path)))
    assert json.dumps(path.to_dict(), allow_nan=False)


def test_path_of_a_zero_right_hand_side_is_zero():
    a, b = _matrix("square")
    path = _path(a, torch.zeros_like(b), max_iter=5)
    assert path.iterations == 0 and path.hvps == 1
    assert all(r.converged for r in path.records)
    assert not any(path.solution(i).any() for i in range(len(path)))


def test_path_rejects_a_bad_grid():
    a, b = _matrix("square")
    with pytest.raises(GifError, match="damping grid"):
        _path(a, b, grid=[0.1, -1.0])
    with pytest.raises(GifError, match="damping grid"):
        solvers.damping_grid(0, 1e-4, 1.0)
    with pytest.raises(GifError, match="damping grid"):
        solvers.damping_grid(4, 1.0, 1e-4)


# --------------------------------------------------------------------------- relative damping


@pytest.mark.parametrize("name", list(SOLVERS))
def test_relative_damping_is_a_multiple_of_the_estimated_sigma_max(name, reference):
    a, b = _matrix("tall")
    x, result = solvers.solve(
        name,
        lambda v: a @ v,
        lambda y: a.T @ y,
        b,
        damping=0.2,
        relative=True,
        max_iter=3000,
        tol=1e-10,
    )
    assert result.converged, result.message
    sigma_max = float(torch.linalg.matrix_norm(a, 2))
    assert result.sigma_max == pytest.approx(sigma_max, rel=1e-6)  # 12 columns: 10 steps suffice
    assert result.damping == pytest.approx(0.2 * result.sigma_max)
    assert "σ_max" in result.message
    assert (
        reference.relative_error(x, reference.damped_lstsq(a, b, result.damping)) < TOLERANCE[name]
    )


@pytest.mark.parametrize("name", ["lsqr", "cg"])
def test_relative_damping_means_the_same_at_any_curvature_scale(name, reference):
    """Scaling ``A`` and ``b`` by ``c`` (a loss scale, a model with larger curvature) leaves the
    relatively damped solution where it was; an absolute λ moves it."""
    a, b = _matrix("indefinite")

    def run(c, relative):
        return solvers.solve(
            name,
            lambda v: c * a @ v,
            lambda y: c * a.T @ y,
            c * b,
            damping=0.3,
            relative=relative,
            max_iter=500,
            tol=1e-12,
        )[0]

    assert reference.relative_error(run(40.0, True), run(1.0, True)) < 1e-6
    assert reference.relative_error(run(40.0, False), run(1.0, False)) > 1e-2


def test_relative_lsqr_costs_what_plain_lsqr_costs():
    a, b = _matrix("square")
    _, plain = _solve("lsqr", a, b, damping=0.1, max_iter=7, tol=0.0)
    _, relative = solvers.solve(
        "lsqr",
        lambda v: a @ v,
        lambda y: a.T @ y,
        b,
        damping=0.1,
        relative=True,
        max_iter=7,
        tol=0.0,
    )
    assert relative.hvps == plain.hvps == 1 + 2 * 7 + 2
    _, cg = solvers.solve(
        "cg", lambda v: a @ v, lambda y: a.T @ y, b, damping=0.1, relative=True, max_iter=7, tol=0
    )
    assert cg.hvps == 1 + 2 * 7 + 2 + (2 * solvers.SIGMA_STEPS + 1)


def test_sigma_max_estimate_and_relative_damping_checks():
    a, b = _matrix("tall")
    sigma_max, products = solvers.estimate_sigma_max(lambda v: a @ v, lambda y: a.T @ y, b)
    assert products <= 2 * solvers.SIGMA_STEPS + 1
    assert sigma_max == pytest.approx(float(torch.linalg.matrix_norm(a, 2)), rel=1e-6)
    assert solvers.relative_damping(0.01, 2.0) == pytest.approx(0.02)
    with pytest.raises(GifError, match="^damping: "):
        solvers.relative_damping(-1.0, 2.0)
    with pytest.raises(GifError, match="σ_max"):
        solvers.relative_damping(0.1, float("nan"))


def test_every_solver_records_the_damping_it_used():
    a, b = _system()
    for name in SOLVERS:
        _, result = _solve(name, a, b, damping=0.3)
        assert result.damping == 0.3 and result.sigma_max is None


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
    with pytest.raises(GifError, match=f"^neumann.*{key}"):
        _solve("neumann", a, b, **options)
