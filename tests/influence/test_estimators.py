"""Every estimator against its dense float64 reference (SPEC §1), through real HVPs."""

import pytest
import torch

from gifcli.config import damping_of
from gifcli.errors import GifError
from gifcli.influence import (
    METHODS,
    CurvatureOperator,
    UpdatePath,
    estimate_path,
    estimate_update,
    removal_gradient,
)
from gifcli.influence.estimators import estimator, retained_gradient
from gifcli.influence.hvp import flatten_params, loss_gradient
from gifcli.influence.operators import Zero, removal_curvature
from gifcli.influence.solvers import lsqr_path

CURVATURE_METHODS = ("gif", "fif", "pif", "if", "sif")
TOLERANCE = {"exact": 1e-8, "lsqr": 1e-4, "cg": 1e-4, "neumann": 1e-3}
# Damping for the iterative solvers keeps these tiny, near-singular problems to a few hundred
# iterations; the exact solver is also checked undamped.
ITERATIVE_DAMPING = {"lsqr": 0.05, "cg": 0.05, "neumann": 0.1}
WEIGHT_DECAY = 0.02
OBJECTIVES = {
    # the paper's: the loss's curvature alone, damping on the squared system
    "paper": {"damping_form": "tikhonov", "weight_decay": 0.0},
    # the trained objective's curvature H + wd·I, damping as a further shift H + (wd + λ)·I
    "trained": {"damping_form": "shift", "weight_decay": WEIGHT_DECAY},
    # the trained objective's curvature, damping on its squared system
    "trained-tikhonov": {"damping_form": "tikhonov", "weight_decay": WEIGHT_DECAY},
}


def _target(dim, seed=0, fraction=0.3):
    return torch.rand(dim, generator=torch.Generator().manual_seed(seed)) < fraction


def _operators(problem, **kwargs):
    options = {"batch_size": 64} | kwargs
    hessian = CurvatureOperator(model=problem.model, x=problem.x, y=problem.y, **options)
    removal = CurvatureOperator(
        model=problem.model, x=problem.removal_x, y=problem.removal_y, **options
    )
    return hessian, removal


def _reference_update(
    problem,
    method,
    target,
    damping,
    reference,
    *,
    hessian=None,
    removal_hessian=None,
    change_hessian=None,
    gradient=None,
    scope=None,
    damping_form="tikhonov",
    weight_decay=0.0,
):
    """``Δ`` from the dense ``H`` with lstsq / pinv, following the estimator table literally.

    Defaults are the problem's dense loss curvature, ``H_U`` and ``H_D = H_U`` (of ``sif``) and
    ``g``; ``scope``: bool coordinates ``s`` that ``if``, ``pif`` and ``sif`` keep free (default:
    all). The objective's curvature is the loss's plus ``weight_decay·I``; ``damping_form``
    ``shift`` adds ``damping·I`` to it and solves undamped, ``tikhonov`` damps the
    least-squares problem by ``damping``.
    """
    h = problem.hessian if hessian is None else hessian
    identity = torch.eye(len(h), dtype=h.dtype)
    shift = weight_decay + (damping if damping_form == "shift" else 0.0)
    damping = damping if damping_form == "tikhonov" else 0.0
    h_loss, h = h, h + shift * identity
    h_u = problem.removal_hessian if removal_hessian is None else removal_hessian
    h_d = h_u if change_hessian is None else change_hessian
    g = problem.removal_gradient if gradient is None else gradient
    t = target.nonzero().squeeze(1)
    free = torch.ones_like(target) if scope is None else scope.clone()
    if method == "pif":
        free |= target  # a pif target is never held constant
    s = free.nonzero().squeeze(1)
    solve = reference.damped_lstsq
    delta = torch.zeros_like(g)
    if method == "gif":
        delta[t] = solve(h[:, t], g, damping)
    elif method == "fif":
        delta[t] = solve(h[t][:, t], g[t], damping)
    elif method == "pif":
        delta[s] = solve(h[s][:, s], g[s], damping)
        delta[~target] = 0
    elif method == "if":
        delta[s] = solve(h[s][:, s], g[s], damping)
    elif method == "sif":
        p = len(problem.removal_x) / problem.n_train
        h_s = ((1 - p) * h_loss + p * h_u + shift * identity)[s][:, s]
        first = solve(h_s, g[s], damping)
        second = solve(h_s, h_d[s][:, s] @ first, damping)
        delta[s] = (1 - 2 * p) / (1 - p) * first + p / (1 - p) * second
    else:
        delta[t] = g[t]
    return delta


def _estimate(problem, method, solver, damping, target, operators, **kwargs):
    """``estimate_update`` with the paper's objective unless ``kwargs`` say otherwise."""
    hessian, removal = operators
    options = {"max_iter": 3000, "tol": 1e-10} | OBJECTIVES["paper"] | kwargs
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


def _cnn_sif_is_slow(name, method, damping, objective):
    """The cnn's ``sif`` builds two dense systems column by column: one case runs in the quick
    loop, the others with the slow tests."""
    slow = (name, method) == ("cnn", "sif") and (damping, objective) != (0.05, "trained")
    return pytest.param(name, method, damping, objective, marks=pytest.mark.slow if slow else ())


@pytest.mark.parametrize(
    ("name", "method", "damping", "objective"),
    [
        _cnn_sif_is_slow(name, method, damping, objective)
        for name in ("mlp", "cnn")
        for method in METHODS
        for damping in (0.0, 0.05)
        for objective in OBJECTIVES
    ],
)
def test_exact_solver_matches_dense_reference(name, method, damping, objective, request, reference):
    problem = request.getfixturevalue(name)
    target = _target(len(problem.theta))
    operators = request.getfixturevalue(f"{name}_operators")
    settings = OBJECTIVES[objective]
    delta, result = _estimate(
        problem, method, "exact", damping, target, operators, **settings
    ).fixed()
    expected = _reference_update(problem, method, target, damping, reference, **settings)
    assert result.converged, result.message
    assert reference.relative_error(delta, expected) < TOLERANCE["exact"]
    if method not in ("if", "sif"):
        assert not delta[~target].any()  # exactly zero outside the mask


@pytest.mark.parametrize("solver", ["lsqr", "cg", "neumann"])
@pytest.mark.parametrize("method", CURVATURE_METHODS)
def test_iterative_solvers_match_dense_reference_on_the_mlp(
    method, solver, mlp, mlp_operators, reference
):
    """The trained objective's curvature; on this indefinite Hessian a shift could make it
    singular, so λ damps the squared system (tikhonov) here."""
    target = _target(len(mlp.theta))
    damping, settings = ITERATIVE_DAMPING[solver], OBJECTIVES["trained-tikhonov"]
    delta, result = _estimate(
        mlp, method, solver, damping, target, mlp_operators, **settings
    ).fixed()
    assert result.converged, result.message
    expected = _reference_update(mlp, method, target, damping, reference, **settings)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]
    if method in ("gif", "fif", "pif"):
        assert not delta[~target].any()


@pytest.mark.parametrize("objective", ["paper", "trained-tikhonov"])
@pytest.mark.parametrize("solver", ["lsqr", "cg"])
@pytest.mark.parametrize("method", ["gif", "fif", "sif"])
def test_iterative_solvers_match_dense_reference_on_the_cnn(
    method, solver, objective, cnn, cnn_operators, reference
):
    target = _target(len(cnn.theta))
    settings = OBJECTIVES[objective]
    delta, result = _estimate(cnn, method, solver, 0.05, target, cnn_operators, **settings).fixed()
    assert result.converged, result.message
    expected = _reference_update(cnn, method, target, 0.05, reference, **settings)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]


@pytest.fixture(scope="module")
def cnn_ggn_operators(cnn):
    return _operators(cnn, curvature="ggn")


@pytest.mark.parametrize("damping", [0.0, 0.01])
@pytest.mark.parametrize("solver", ["lsqr", "cg"])
@pytest.mark.parametrize("method", CURVATURE_METHODS)
def test_gauss_newton_plus_weight_decay_is_well_posed_for_the_krylov_solvers(
    method, solver, damping, cnn, cnn_ggn_operators, reference
):
    """``G + wd·I`` is positive definite: every solver reaches the dense solution of the trained
    objective's system, undamped or shifted further."""
    target = _target(len(cnn.theta))
    settings = OBJECTIVES["trained"]
    delta, result = _estimate(
        cnn, method, solver, damping, target, cnn_ggn_operators, **settings, tol=1e-12
    ).fixed()
    assert result.converged, result.message
    ggn = reference.ggn(cnn.model, cnn.x, cnn.y)
    h_u = reference.ggn(cnn.model, cnn.removal_x, cnn.removal_y)
    expected = _reference_update(
        cnn, method, target, damping, reference, hessian=ggn, removal_hessian=h_u, **settings
    )
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]
    if damping:  # the record carries the shift λ
        assert result.damping == damping and "curvature shifted" in result.message


def _backdoor(problem, reference, curvature="hessian"):
    """The problem's removal set relabelled: removed with its labels, re-added with ``true``.

    Returns ``g``, the dense ``H_U`` (labels as trained) and ``H_D`` (of ``L_U(trained labels)
    − L_U(true)``), and the removal curvature built by the code under test."""
    classes = problem.model(problem.removal_x.double()).shape[1]
    x, y, true = problem.removal_x, problem.removal_y, (problem.removal_y + 1) % classes
    m, n = len(x), problem.n_train
    g = (
        m
        / (n - m)
        * (reference.gradient(problem.model, x, y) - reference.gradient(problem.model, x, true))
    )
    dense = reference.ggn if curvature == "ggn" else reference.hessian
    h_u = dense(problem.model, x, y)
    h_d = h_u - dense(problem.model, x, true)

    def curvature_of(a, b):
        return CurvatureOperator(model=problem.model, x=a, y=b, batch_size=64, curvature=curvature)

    removal = removal_curvature(curvature_of, x, y, true_labels=true, curvature=curvature)
    return g, h_u, h_d, removal


def _sif(problem, operator, g, removal, damping):
    return estimate_update(
        method="sif",
        operator=operator,
        gradient=g,
        target_flat=torch.ones(len(g), dtype=torch.bool),
        solver="exact",
        damping=damping,
        max_iter=1,
        tol=1e-10,
        removal_operator=removal,
        removal_fraction=len(problem.removal_x) / problem.n_train,
        damping_form="tikhonov",
    )


@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_sif_for_a_backdoor_matches_the_dense_reference(name, damping, request, reference):
    """Both ``H_U`` of the formula are the curvature of ``L_U(poisoned) − L_U(true)``."""
    problem = request.getfixturevalue(name)
    g, h_u, h_d, removal = _backdoor(problem, reference)
    hessian, _ = request.getfixturevalue(f"{name}_operators")
    delta, result = _sif(problem, hessian, g, removal, damping).fixed()
    everything = torch.ones(len(g), dtype=torch.bool)
    expected = _reference_update(
        problem,
        "sif",
        everything,
        damping,
        reference,
        removal_hessian=h_d,
        change_hessian=h_d,
        gradient=g,
    )
    assert result.converged, result.message
    assert reference.relative_error(delta, expected) < TOLERANCE["exact"]
    # Each exact solve makes len(g) + 1 products of H_S: one HVP over the Hessian sample and
    # two over the removal set (both label sets); H_D Δ₁ in between costs two more.
    assert result.hvps == 2 * 3 * (len(g) + 1) + 2


def test_sif_for_a_backdoor_under_gauss_newton_has_no_second_order_term(cnn, reference):
    """The GGN does not depend on the labels, so the relabelling's ``H_D`` vanishes (checked on
    the dense matrices) and ``sif`` is ``(1 − 2p)/(1 − p) · H_S⁻¹ g``, one solve."""
    g, h_u, h_d, removal = _backdoor(cnn, reference, curvature="ggn")
    assert h_d.abs().max() < 1e-14
    assert isinstance(removal, Zero)
    hessian, _ = _operators(cnn, curvature="ggn")
    delta, result = _sif(cnn, hessian, g, removal, 0.01).fixed()
    p = len(cnn.removal_x) / cnn.n_train
    h_s = (1 - p) * reference.ggn(cnn.model, cnn.x, cnn.y)  # + p · H_D, which is 0
    expected = (1 - 2 * p) / (1 - p) * reference.damped_lstsq(h_s, g, 0.01)
    assert reference.relative_error(delta, expected) < 1e-8
    assert "second-order term 0" in result.message and "second solve" not in result.message
    assert result.hvps == len(g) + 1


def _linear_conv_scope(problem):
    """Coordinates of the nn.Linear / nn.Conv2d parameters (the cnn's BatchNorm is left out)."""
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return torch.cat(
        [
            torch.full((p.numel(),), isinstance(module, layers))
            for module in problem.model.modules()
            for p in module.parameters(recurse=False)
        ]
    )


@pytest.mark.parametrize("damping", [0.0, 0.05])
@pytest.mark.parametrize("method", ["if", "pif", "sif"])
def test_scope_holds_the_other_parameters_fixed(method, damping, cnn, cnn_operators, reference):
    """``influence.scope: linear-conv`` on a model with BatchNorm: ``H[s, s]``, ``g_s``."""
    scope = _linear_conv_scope(cnn)
    assert 0 < int((~scope).sum()) < len(scope)  # the BatchNorm weight and bias
    target = _target(len(cnn.theta))
    delta, result = _estimate(
        cnn, method, "exact", damping, target, cnn_operators, scope_flat=scope
    ).fixed()
    expected = _reference_update(cnn, method, target, damping, reference, scope=scope)
    assert result.converged, result.message
    assert reference.relative_error(delta, expected) < TOLERANCE["exact"]
    assert not delta[~scope & ~target].any()
    if damping:  # undamped, the near-null directions of H dominate both solutions alike
        unscoped, _ = _estimate(cnn, method, "exact", damping, target, cnn_operators).fixed()
        assert reference.relative_error(delta, unscoped) > 1e-5  # the scope does change it


def test_gif_with_gauss_newton_curvature(cnn, reference):
    target = _target(len(cnn.theta))
    operators = _operators(cnn, curvature="ggn")
    delta, _ = _estimate(cnn, "gif", "exact", 0.01, target, operators).fixed()
    ggn = reference.ggn(cnn.model, cnn.x, cnn.y)
    expected = _reference_update(cnn, "gif", target, 0.01, reference, hessian=ggn)
    assert reference.relative_error(delta, expected) < 1e-8


def test_first_order_is_the_masked_gradient_without_products(mlp, mlp_operators):
    target = _target(len(mlp.theta))
    delta, result = _estimate(mlp, "first-order", "lsqr", 0.0, target, mlp_operators).fixed()
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
        ).fixed()
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
        damping_form="tikhonov",
        max_iter=3000,
        tol=1e-10,
    ).fixed()
    assert result.converged, result.message
    assert reference.relative_error(delta, reference.damped_lstsq(hessian, g, 0.1)) < 1e-3


def test_singular_indefinite_hessian_undamped_is_not_an_error(mlp, mlp_operators, reference):
    eigenvalues = torch.linalg.eigvalsh(mlp.hessian).abs()
    assert eigenvalues.min() < 1e-14  # singular (softmax shift invariance)
    all_params = torch.ones(len(mlp.theta), dtype=torch.bool)
    delta, result = _estimate(mlp, "if", "exact", 0.0, all_params, mlp_operators).fixed()
    expected = torch.linalg.pinv(mlp.hessian) @ mlp.removal_gradient
    assert reference.relative_error(delta, expected) < 1e-8


def test_removal_gradient_for_class_removal_and_backdoor_relabelling(cnn, reference):
    """Removal: ``m/(n − m) · (∇L_U + wd·θ̂)``; relabelling: the new training set has ``n``
    points again, ``m/n · (∇L_U(trained labels) − ∇L_U(true))``, and the weight decay
    cancels."""
    m, n = len(cnn.removal_x), cnn.n_train
    g = removal_gradient(
        cnn.model, removal_x=cnn.removal_x, removal_y=cnn.removal_y, n_train=n, batch_size=4
    )
    assert reference.relative_error(g, cnn.removal_gradient) < 1e-12
    decayed = removal_gradient(
        cnn.model,
        removal_x=cnn.removal_x,
        removal_y=cnn.removal_y,
        n_train=n,
        batch_size=4,
        weight_decay=WEIGHT_DECAY,
    )
    expected = cnn.removal_gradient + m / (n - m) * WEIGHT_DECAY * cnn.theta
    assert reference.relative_error(decayed, expected) < 1e-12
    true_labels = (cnn.removal_y + 1) % 3
    for weight_decay in (0.0, WEIGHT_DECAY):
        g_backdoor = removal_gradient(
            cnn.model,
            removal_x=cnn.removal_x,
            removal_y=cnn.removal_y,
            n_train=n,
            batch_size=4,
            true_labels=true_labels,
            weight_decay=weight_decay,
        )
        expected = (
            m
            / n
            * (
                reference.gradient(cnn.model, cnn.removal_x, cnn.removal_y)
                - reference.gradient(cnn.model, cnn.removal_x, true_labels)
            )
        )
        assert reference.relative_error(g_backdoor, expected) < 1e-12


def test_retained_gradient_is_minus_the_retained_objectives_gradient(cnn, reference):
    g = retained_gradient(cnn.model, x=cnn.x, y=cnn.y, batch_size=5, weight_decay=WEIGHT_DECAY)
    expected = -(reference.gradient(cnn.model, cnn.x, cnn.y) + WEIGHT_DECAY * cnn.theta)
    assert reference.relative_error(g, expected) < 1e-12
    assert torch.equal(flatten_params(cnn.model), cnn.theta)


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
    with pytest.raises(GifError, match="^method: unknown"):
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
    with pytest.raises(GifError, match="not finite on the removal set"):
        removal_gradient(
            problem.model,
            removal_x=problem.removal_x,
            removal_y=problem.removal_y,
            n_train=problem.n_train,
            batch_size=8,
        )
    with pytest.raises(GifError, match="not finite on the retained data"):
        retained_gradient(problem.model, x=problem.x, y=problem.y, batch_size=8)
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


def _reorthogonalized_path(problem, method, target, operators, max_iter):
    """``estimate_path``'s run with the Krylov basis kept orthonormal (``lsqr_path``'s
    ``reorthogonalize``), on the estimator's own system."""
    hessian, _ = operators
    system = estimator(method).system(hessian, problem.removal_gradient, target, None)
    path = lsqr_path(*system.products, max_iter=max_iter, tol=0.0, reorthogonalize=True)
    return UpdatePath.along(method, path, system.to_update)


@pytest.mark.parametrize("method", PATH_METHODS)
def test_path_updates_equal_separate_lsqr_solves_at_every_damping(
    method, mlp, mlp_operators, reference
):
    target = _target(len(mlp.theta))
    path = _path_estimate(mlp, method, target, mlp_operators)
    assert len(path) == 8 and path.run.iterations == 8
    for i, damping in enumerate(path.lambdas):
        delta, result = _estimate(
            mlp, method, "lsqr", damping, target, mlp_operators, max_iter=8, tol=0.0
        ).fixed()
        assert reference.relative_error(path.update(i), delta) < 1e-5
        assert path.record(i).relative_residual == pytest.approx(result.relative_residual)
        if method != "if":
            assert not path.update(i)[~target].any()


@pytest.mark.parametrize(
    ("name", "method"),
    [("mlp", m) for m in PATH_METHODS] + [pytest.param("cnn", "gif", marks=pytest.mark.slow)],
)
def test_path_over_the_whole_krylov_space_matches_the_dense_reference(
    name, method, request, reference
):
    """``k = n`` steps span the whole space once ``V`` is kept orthonormal; without that,
    lost orthogonality (as in lsqr) needs more steps on these near-singular Hessians."""
    problem = request.getfixturevalue(name)
    target = _target(len(problem.theta))
    operators = request.getfixturevalue(f"{name}_operators")
    size = int(target.sum()) if method in ("gif", "fif") else len(problem.theta)
    exact = _reorthogonalized_path(problem, method, target, operators, max_iter=size)
    plain = _path_estimate(problem, method, target, operators, max_iter=3 * size, tol=1e-13)
    for i, damping in enumerate(exact.lambdas):
        expected = _reference_update(problem, method, target, damping, reference)
        assert exact.run.iterations <= size
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
    basis = path.run.basis.double()
    assert (basis @ basis.T - torch.eye(40, dtype=torch.float64)).abs().max() > 0.1
    for i, damping in enumerate(path.lambdas):
        delta, _ = estimate_update(
            method=method,
            solver="lsqr",
            damping=damping,
            damping_form="tikhonov",
            max_iter=40,
            **common,
        ).fixed()
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
    assert path.lambdas == pytest.approx([0.01 * path.run.sigma_max, 0.1 * path.run.sigma_max])
    with pytest.raises(GifError, match="set influence.solver: lsqr"):
        estimate_update(method="gif", solver="cg", **common)
    with pytest.raises(GifError, match="not sif"):
        estimate_update(method="sif", solver="lsqr", removal_operator=removal, **common)
    with pytest.raises(GifError, match="'auto' or a number"):
        estimate_update(method="gif", solver="lsqr", **common | {"damping": "fast"})
    first_order, _ = estimate_update(method="first-order", solver="lsqr", **common).fixed()
    with pytest.raises(GifError, match="no damping path"):
        estimate_path(method="first-order", **{k: common[k] for k in common if k != "damping"})
    assert torch.is_tensor(first_order)


@pytest.mark.parametrize(("method", "solver"), [("gif", "lsqr"), ("gif", "exact"), ("sif", "cg")])
def test_relative_damping_solves_with_lambda_times_sigma_max(
    method, solver, mlp, mlp_operators, reference
):
    target = _target(len(mlp.theta))
    delta, result = _estimate(
        mlp, method, solver, 0.1, target, mlp_operators, damping_relative=True, max_iter=3000
    ).fixed()
    assert result.converged, result.message
    size = int(target.sum()) if method == "gif" else len(mlp.theta)
    p = len(mlp.removal_x) / mlp.n_train
    system = (
        mlp.hessian[:, target]
        if method == "gif"
        else (1 - p) * mlp.hessian + p * mlp.removal_hessian  # sif solves with H_S
    )
    assert result.sigma_max == pytest.approx(float(torch.linalg.matrix_norm(system, 2)), rel=1e-3)
    assert result.damping == pytest.approx(0.1 * result.sigma_max) and size > 0
    expected = _reference_update(mlp, method, target, result.damping, reference)
    assert reference.relative_error(delta, expected) < TOLERANCE[solver]


DAMPINGS = {  # (damping, form, relative): none, a shift, relative shift, relative tikhonov
    "none": (0.0, "shift", False),
    "shift": (0.05, "shift", False),
    "relative-shift": (0.01, "shift", True),
    "relative-tikhonov": (0.01, "tikhonov", True),
}


@pytest.mark.parametrize("damping", DAMPINGS)
@pytest.mark.parametrize("solver", ["lsqr", "cg", "neumann", "exact"])
@pytest.mark.parametrize("method", METHODS)
def test_the_budget_counts_the_products_the_solve_makes(
    method, solver, damping, mlp, mlp_operators
):
    """``Estimator.products`` (what the budget plans with) against the solve's own count, with
    the solver run to its iteration limit: within 10% for every estimator and solver."""
    value, form, relative = DAMPINGS[damping]
    target = _target(len(mlp.removal_gradient))
    iterations = 6
    _, result = _estimate(
        mlp,
        method,
        solver,
        value,
        target,
        mlp_operators,
        max_iter=iterations,
        tol=1e-12,
        damping_form=form,
        damping_relative=relative,
        weight_decay=WEIGHT_DECAY,
    ).fixed()
    unknowns = int(target.sum()) if method in ("gif", "fif") else len(target)
    expected = estimator(method).products(
        solver, iterations, damping_of(value, form, relative), unknowns=unknowns
    )
    assert result.hvps <= expected
    assert result.hvps >= 0.9 * expected, (result.hvps, expected, result.message)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_the_budget_counts_sif_for_a_backdoor(curvature, mlp, reference):
    """A backdoor's ``H_U`` is two products (two label sets) under the Hessian, none under
    Gauss-Newton (one solve)."""
    g, _, _, removal = _backdoor(mlp, reference, curvature)
    operator = CurvatureOperator(
        model=mlp.model, x=mlp.x, y=mlp.y, batch_size=64, curvature=curvature
    )
    _, result = estimate_update(
        method="sif",
        operator=operator,
        gradient=g,
        target_flat=torch.ones(len(g), dtype=torch.bool),
        solver="lsqr",
        damping=0.05,
        max_iter=6,
        tol=1e-12,
        weight_decay=WEIGHT_DECAY,
        removal_operator=removal,
        removal_fraction=len(mlp.removal_x) / mlp.n_train,
    ).fixed()
    removal_products = 2 if curvature == "hessian" else 0
    expected = estimator("sif").products(
        "lsqr", 6, damping_of(0.05), removal_products=removal_products
    )
    assert 0.9 * expected <= result.hvps <= expected


def test_the_budget_counts_one_path_run_for_auto_damping(mlp, mlp_operators):
    path = _estimate(
        mlp,
        "gif",
        "lsqr",
        "auto",
        _target(len(mlp.removal_gradient)),
        mlp_operators,
        max_iter=6,
        tol=1e-12,
    )
    assert path.run.hvps == estimator("gif").products("lsqr", 6, damping_of("auto"))
