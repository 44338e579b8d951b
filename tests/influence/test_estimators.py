"""Every estimator against its dense float64 reference (SPEC §1), through real HVPs."""

import pytest
import torch

from gifcli.errors import GifError
from gifcli.influence import (
    METHODS,
    CurvatureOperator,
    UpdatePath,
    estimate_path,
    estimate_update,
    removal_gradient,
)
from gifcli.influence.hvp import loss_gradient

CURVATURE_METHODS = ("gif", "fif", "pif", "if", "sif")
TOLERANCE = {"exact": 1e-8, "lsqr": 1e-4, "cg": 1e-4, "neumann": 1e-3}
# Damping for the iterative solvers keeps these tiny, near-singular problems to a few hundred
# iterations; the exact solver is also checked undamped.
ITERATIVE_DAMPING = {"lsqr": 0.05, "cg": 0.05, "neumann": 0.1}


def _target(dim, seed=0, fraction=0.3):
    return torch.rand(dim, generator=torch.Generator().manual_seed(seed)) < fraction


def _operators(problem, **kwargs):
    options = {"batch_size": 64} | kwargs
    hessian = CurvatureOperator(model=problem.model, x=problem.x, y=problem.y, **options)
    removal = CurvatureOperator(
        model=problem.model, x=problem.removal_x, y=problem.removal_y, **options
    )
    return hessian, removal


def _reference_update(problem, method, target, damping, reference, hessian=None):
    """``Δ`` from the dense ``H`` with lstsq / pinv, following the SPEC table literally."""
    h = problem.hessian if hessian is None else hessian
    g, t = problem.removal_gradient, target.nonzero().squeeze(1)
    solve = reference.damped_lstsq
    delta = torch.zeros_like(g)
    if method == "gif":
        delta[t] = solve(h[:, t], g, damping)
    elif method == "fif":
        delta[t] = solve(h[t][:, t], g[t], damping)
    elif method == "pif":
        delta[t] = solve(h, g, damping)[t]
    elif method == "if":
        delta = solve(h, g, damping)
    elif method == "sif":
        p = len(problem.removal_x) / problem.n_train
        first = solve(h, g, damping)
        second = solve(h, (h - problem.removal_hessian) @ first, damping)
        delta = first + p / (1 - p) * second
    else:
        delta[t] = g[t]
    return delta


def _estimate(problem, method, solver, damping, target, operators, **kwargs):
    hessian, removal = operators
    options = {"max_iter": 3000, "tol": 1e-10} | kwargs
    return estimate_update(
        method=method,
        operator=hessian,
        gradient=problem.removal_gradient,
        target_flat=target,
        solver=solver,
        damping=damping,
        removal_operator=removal,
        removal_fraction=len(problem.removal_x) / problem.n_train,
        **options,
    )


@pytest.fixture(scope="module")
def mlp_operators(mlp):
    return _operators(mlp)


@pytest.fixture(scope="module")
def cnn_operators(cnn):
    return _operators(cnn)


@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_exact_solver_matches_dense_reference(name, method, damping, request, reference):
    problem = request.getfixturevalue(name)
    target = _target(len(problem.theta))
    operators = request.getfixturevalue(f"{name}_operators")
    delta, result = _estimate(problem, method, "exact", damping, target, operators)
    expected = _reference_update(problem, method, target, damping, reference)
    assert result.converged, result.message
    assert reference.relative_error(delta, expected) < TOLERANCE["exact"]
    if method not in ("if", "sif"):
        assert not delta[~target].any()  # exactly zero outside the mask


@pytest.mark.parametrize("solver", ["lsqr", "cg", "neumann"])
@pytest.mark.parametrize("method", CURVATURE_METHODS)
def test_iterative_solvers_match_dense_reference_on_the_mlp(
    method, solver, mlp, mlp_operators, reference
):
    target = _target(len(mlp.theta))
    damping = ITERATIVE_DAMPING[solver]
    delta, result = _estimate(mlp, method, solver, damping, target, mlp_operators)
    assert result.converged, result.message
    expected = _reference_update(mlp, method, target, damping, reference)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]
    if method in ("gif", "fif", "pif"):
        assert not delta[~target].any()


@pytest.mark.parametrize("solver", ["lsqr", "cg"])
@pytest.mark.parametrize("method", ["gif", "fif", "sif"])
def test_iterative_solvers_match_dense_reference_on_the_cnn(
    method, solver, cnn, cnn_operators, reference
):
    target = _target(len(cnn.theta))
    delta, result = _estimate(cnn, method, solver, 0.05, target, cnn_operators)
    assert result.converged, result.message
    expected = _reference_update(cnn, method, target, 0.05, reference)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]


def test_gif_with_gauss_newton_curvature(cnn, reference):
    target = _target(len(cnn.theta))
    operators = _operators(cnn, curvature="ggn")
    delta, _ = _estimate(cnn, "gif", "exact", 0.01, target, operators)
    ggn = reference.ggn(cnn.model, cnn.x, cnn.y)
    expected = _reference_update(cnn, "gif", target, 0.01, reference, hessian=ggn)
    assert reference.relative_error(delta, expected) < 1e-8


def test_first_order_is_the_masked_gradient_without_products(mlp, mlp_operators):
    target = _target(len(mlp.theta))
    delta, result = _estimate(mlp, "first-order", "lsqr", 0.0, target, mlp_operators)
    assert torch.equal(delta, torch.where(target, mlp.removal_gradient, 0.0))
    assert (result.iterations, result.hvps, result.converged) == (0, 0, True)


@pytest.mark.parametrize("solver", ["exact", "lsqr"])
def test_gif_is_invariant_to_the_loss_scale(solver, mlp, reference):
    """Scaling the loss by s scales H and g alike; the undamped solution does not move."""
    target = _target(len(mlp.theta))
    deltas = []
    for scale in (1.0, 37.0):
        operator = CurvatureOperator(
            model=mlp.model, x=mlp.x, y=mlp.y, batch_size=64, loss_scale=scale
        )
        delta, result = estimate_update(
            method="gif",
            operator=operator,
            gradient=scale * mlp.removal_gradient,
            target_flat=target,
            solver=solver,
            damping=0.0,
            max_iter=2000,
            tol=1e-12,
        )
        deltas.append(delta)
    assert reference.relative_error(deltas[1], deltas[0]) < 1e-8


def test_neumann_converges_where_plain_neumann_diverges_on_an_indefinite_hessian(mlp, reference):
    hessian, g = mlp.hessian, mlp.removal_gradient
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert eigenvalues.min() < -0.1  # negative curvature
    # Plain (unsquared) Neumann / LiSSA, x ← g + x − H x / c, scaled so the positive part
    # converges: the negative eigenvalue μ makes it grow like (1 + |μ|/c)^k.
    c, x = 2 * float(eigenvalues.max()), torch.zeros_like(g)
    for _ in range(200):
        x = g / c + x - hessian @ x / c
    assert x.norm() > 1e3 * reference.damped_lstsq(hessian, g, 0.0).norm()
    # The paper's iteration on the squared system converges (here for IF, all parameters).
    operator = CurvatureOperator(model=mlp.model, x=mlp.x, y=mlp.y, batch_size=64)
    all_params = torch.ones(len(g), dtype=torch.bool)
    delta, result = estimate_update(
        method="if",
        operator=operator,
        gradient=g,
        target_flat=all_params,
        solver="neumann",
        damping=0.1,
        max_iter=3000,
        tol=1e-10,
    )
    assert result.converged, result.message
    assert reference.relative_error(delta, reference.damped_lstsq(hessian, g, 0.1)) < 1e-3


def test_singular_indefinite_hessian_undamped_is_not_an_error(mlp, mlp_operators, reference):
    eigenvalues = torch.linalg.eigvalsh(mlp.hessian).abs()
    assert eigenvalues.min() < 1e-14  # singular (softmax shift invariance)
    all_params = torch.ones(len(mlp.theta), dtype=torch.bool)
    delta, result = _estimate(mlp, "if", "exact", 0.0, all_params, mlp_operators)
    expected = torch.linalg.pinv(mlp.hessian) @ mlp.removal_gradient
    assert reference.relative_error(delta, expected) < 1e-8


def test_removal_gradient_for_class_removal_and_backdoor_relabelling(cnn, reference):
    m, n = len(cnn.removal_x), cnn.n_train
    g = removal_gradient(
        cnn.model, removal_x=cnn.removal_x, removal_y=cnn.removal_y, n_train=n, batch_size=4
    )
    assert reference.relative_error(g, cnn.removal_gradient) < 1e-12
    true_labels = (cnn.removal_y + 1) % 3
    g_backdoor = removal_gradient(
        cnn.model,
        removal_x=cnn.removal_x,
        removal_y=cnn.removal_y,
        n_train=n,
        batch_size=4,
        true_labels=true_labels,
    )
    expected = (
        m
        / (n - m)
        * (
            reference.gradient(cnn.model, cnn.removal_x, cnn.removal_y)
            - reference.gradient(cnn.model, cnn.removal_x, true_labels)
        )
    )
    assert reference.relative_error(g_backdoor, expected) < 1e-12


def test_progress_reports_each_iteration(mlp, mlp_operators):
    seen = []
    _estimate(
        mlp,
        "gif",
        "lsqr",
        0.05,
        _target(len(mlp.theta)),
        mlp_operators,
        max_iter=5,
        tol=0.0,
        progress=lambda iteration, residual: seen.append(iteration),
    )
    assert seen == [1, 2, 3, 4, 5]


def test_input_errors(mlp, mlp_operators):
    hessian, _ = mlp_operators
    target = _target(len(mlp.theta))
    common = {
        "operator": hessian,
        "target_flat": target,
        "solver": "lsqr",
        "damping": 0.0,
        "max_iter": 5,
        "tol": 1e-6,
    }
    nan_gradient = torch.full_like(mlp.removal_gradient, float("nan"))
    with pytest.raises(GifError, match="NaN"):
        estimate_update(method="gif", gradient=nan_gradient, **common)
    with pytest.raises(GifError, match="H_U"):
        estimate_update(method="sif", gradient=mlp.removal_gradient, **common)
    with pytest.raises(GifError, match="influence.method"):
        estimate_update(method="gif2", gradient=mlp.removal_gradient, **common)
    with pytest.raises(GifError, match="selects no parameter"):
        estimate_update(
            method="gif",
            gradient=mlp.removal_gradient,
            **common | {"target_flat": torch.zeros_like(target)},
        )
    with pytest.raises(GifError, match="m < n"):
        removal_gradient(
            mlp.model, removal_x=mlp.x, removal_y=mlp.y, n_train=len(mlp.x), batch_size=8
        )


def test_nan_loss_raises_a_gif_error_on_the_removal_gradient(reference):
    problem = reference.make_mlp(seed=5)
    with torch.no_grad():
        problem.model.net[2].bias.fill_(float("nan"))
    with pytest.raises(GifError, match="removal gradient"):
        removal_gradient(
            problem.model,
            removal_x=problem.removal_x,
            removal_y=problem.removal_y,
            n_train=problem.n_train,
            batch_size=8,
        )
    assert not torch.isfinite(
        loss_gradient(problem.model, problem.x, problem.y, batch_size=8)
    ).all()


# --------------------------------------------------------------------------- the damping path

PATH_METHODS = ("gif", "fif", "pif", "if")


def _path_estimate(problem, method, target, operators, **kwargs):
    hessian, _ = operators
    return estimate_path(
        method=method,
        operator=hessian,
        gradient=problem.removal_gradient,
        target_flat=target,
        **({"max_iter": 8, "tol": 0.0} | kwargs),
    )


@pytest.mark.parametrize("method", PATH_METHODS)
def test_path_updates_equal_separate_lsqr_solves_at_every_damping(
    method, mlp, mlp_operators, reference
):
    target = _target(len(mlp.theta))
    path = _path_estimate(mlp, method, target, mlp_operators)
    assert len(path) == 8 and path.path.iterations == 8
    for i, damping in enumerate(path.lambdas):
        delta, result = _estimate(
            mlp, method, "lsqr", damping, target, mlp_operators, max_iter=8, tol=0.0
        )
        assert reference.relative_error(path.update(i), delta) < 1e-5
        assert path.record(i).relative_residual == pytest.approx(result.relative_residual)
        if method != "if":
            assert not path.update(i)[~target].any()


@pytest.mark.parametrize(("name", "method"), [("mlp", m) for m in PATH_METHODS] + [("cnn", "gif")])
def test_path_over_the_whole_krylov_space_matches_the_dense_reference(
    name, method, request, reference
):
    """``k = n`` steps span the whole space once ``V`` is kept orthonormal; without that,
    lost orthogonality (as in lsqr) needs more steps on these near-singular Hessians."""
    problem = request.getfixturevalue(name)
    target = _target(len(problem.theta))
    operators = request.getfixturevalue(f"{name}_operators")
    size = int(target.sum()) if method in ("gif", "fif") else len(problem.theta)
    exact = _path_estimate(problem, method, target, operators, max_iter=size, reorthogonalize=True)
    plain = _path_estimate(problem, method, target, operators, max_iter=3 * size, tol=1e-13)
    for i, damping in enumerate(exact.lambdas):
        expected = _reference_update(problem, method, target, damping, reference)
        assert exact.path.iterations <= size
        assert reference.relative_error(exact.update(i), expected) < 1e-8
        assert reference.relative_error(plain.update(i), expected) < 1e-8


@pytest.mark.parametrize("method", ["gif", "if"])
def test_path_in_float32_matches_lsqr_without_reorthogonalisation(method, reference):
    """At 40 iterations in float32 the Krylov vectors are far from orthogonal, yet the path and
    lsqr share them and their bidiagonal, so they agree to float32 rounding."""
    problem = reference.make_cnn()
    problem.model.float()
    target = _target(len(problem.theta))
    operator = CurvatureOperator(model=problem.model, x=problem.x, y=problem.y, batch_size=64)
    gradient = problem.removal_gradient.float()
    common = {"operator": operator, "gradient": gradient, "target_flat": target, "tol": 0.0}
    path = estimate_path(method=method, max_iter=40, **common)
    basis = path.path.basis.double()
    assert (basis @ basis.T - torch.eye(40, dtype=torch.float64)).abs().max() > 0.1
    for i, damping in enumerate(path.lambdas):
        delta, _ = estimate_update(
            method=method, solver="lsqr", damping=damping, max_iter=40, **common
        )
        assert reference.relative_error(path.update(i), delta) < 1e-5


def test_auto_damping_returns_the_path_and_needs_lsqr(mlp, mlp_operators):
    hessian, removal = mlp_operators
    common = {
        "operator": hessian,
        "gradient": mlp.removal_gradient,
        "target_flat": _target(len(mlp.theta)),
        "damping": "auto",
        "max_iter": 5,
        "tol": 0.0,
    }
    path = estimate_update(method="gif", solver="lsqr", damping_grid=[0.01, 0.1], **common)
    assert isinstance(path, UpdatePath) and path.relative == pytest.approx([0.01, 0.1])
    assert path.lambdas == pytest.approx([0.01 * path.sigma_max, 0.1 * path.sigma_max])
    with pytest.raises(GifError, match="influence.solver to lsqr"):
        estimate_update(method="gif", solver="cg", **common)
    with pytest.raises(GifError, match="not 'sif'"):
        estimate_update(method="sif", solver="lsqr", removal_operator=removal, **common)
    with pytest.raises(GifError, match="'auto' or a number"):
        estimate_update(method="gif", solver="lsqr", **common | {"damping": "fast"})
    first_order, _ = estimate_update(method="first-order", solver="lsqr", **common)
    assert torch.is_tensor(first_order)


@pytest.mark.parametrize(("method", "solver"), [("gif", "lsqr"), ("gif", "exact"), ("sif", "cg")])
def test_relative_damping_solves_with_lambda_times_sigma_max(
    method, solver, mlp, mlp_operators, reference
):
    target = _target(len(mlp.theta))
    delta, result = _estimate(
        mlp, method, solver, 0.1, target, mlp_operators, damping_relative=True, max_iter=3000
    )
    assert result.converged, result.message
    size = int(target.sum()) if method == "gif" else len(mlp.theta)
    system = mlp.hessian[:, target] if method == "gif" else mlp.hessian
    assert result.sigma_max == pytest.approx(float(torch.linalg.matrix_norm(system, 2)), rel=1e-3)
    assert result.damping == pytest.approx(0.1 * result.sigma_max) and size > 0
    expected = _reference_update(mlp, method, target, result.damping, reference)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]
