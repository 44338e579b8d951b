"""Matrix-free solvers for the damped least-squares problem of every influence estimator.

Every solver has the one signature

    solver(matvec, rmatvec, b, *, damping, max_iter, tol, progress=None, **options)
        -> (x, SolveResult)

and returns an approximation of

    x* = argmin_x ‖A x − b‖² + λ² ‖x‖²,     λ = damping,

with ``matvec(x) = A x`` (``[k] -> [n]``), ``rmatvec(y) = Aᵀ y`` (``[n] -> [k]``) and
``b`` of shape ``[n]``; ``x`` has ``b``'s dtype and device. With ``λ = 0`` this is the
minimum-norm least-squares solution: a singular or indefinite ``A`` is never an error. In the
estimators every ``matvec`` and ``rmatvec`` costs one Hessian-vector product (HVP).

Diagnostics (``SolveResult``), the same for every solver:

- ``relative_residual`` = ``‖A x − b‖ / ‖b‖``;
- ``normal_residual`` = ``‖Aᵀ(b − A x) − λ² x‖``, the gradient of the objective above (``‖Aᵀ r‖``
  when ``λ = 0``); it vanishes at ``x*`` even when ``A x = b`` has no solution;
- ``converged``: ``relative_residual ≤ tol`` or ``normal_residual ≤ tol · ‖Aᵀ b‖``, evaluated on
  the returned ``x`` with two extra products (counted in ``hvps``), so rounding in a solver's
  recurrences cannot report convergence that the returned ``x`` does not have;
- ``residual_history`` and ``normal_history``: ``relative_residual`` and the relative normal
  residual ``normal_residual / ‖Aᵀ b‖`` after each iteration, from the solver's recurrences.

A non-finite value stops the solve with ``converged=False``, the last finite iterate and a
message saying what to try; so does a residual that grows past ``DIVERGED`` times its start.
Nothing here raises on non-convergence.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from gifcli.errors import GifError

Operator = Callable[[Tensor], Tensor]
Progress = Callable[[int, float], None]

DIVERGED = 1e6
"""A relative residual or relative normal residual above this counts as divergence."""

MAX_DENSE_ENTRIES = 100_000_000
"""``exact`` refuses to build a dense matrix with more entries (800 MB in float64)."""

_TRY = (
    "try a larger influence.damping, fewer influence.max_iter, curvature 'ggn', a float64 "
    "model, or check that the model's loss is finite on the Hessian sample"
)


@dataclass
class SolveResult:
    """What a solve did and how well it did it (module docstring for the definitions)."""

    solver: str
    iterations: int
    hvps: int
    relative_residual: float
    normal_residual: float
    converged: bool
    seconds: float
    residual_history: list[float] = field(default_factory=list)
    normal_history: list[float] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict:
        """JSON-ready dict; non-finite floats become ``None``."""
        return {key: _json_value(value) for key, value in asdict(self).items()}


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


# --------------------------------------------------------------------------- shared pieces


class _Counted:
    """Wrap ``matvec`` / ``rmatvec`` to count products (each one HVP in the estimators)."""

    def __init__(self, matvec: Operator, rmatvec: Operator) -> None:
        self.calls = 0
        self._matvec, self._rmatvec = matvec, rmatvec

    def A(self, x: Tensor) -> Tensor:  # noqa: N802 - the matrix's name
        self.calls += 1
        return self._matvec(x)

    def At(self, y: Tensor) -> Tensor:  # noqa: N802
        self.calls += 1
        return self._rmatvec(y)


def _norm(t: Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _check_inputs(b: Tensor, damping: float, max_iter: int, tol: float) -> None:
    if b.ndim != 1:
        raise ValueError(f"b must be a flat vector, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise GifError("removal gradient: contains NaN or Inf; check the checkpoint and data")
    if damping < 0 or not math.isfinite(damping):
        raise GifError(f"influence.damping: must be a finite number >= 0, got {damping}")
    if max_iter < 1:
        raise GifError(f"influence.max_iter: must be >= 1, got {max_iter}")
    if tol < 0:
        raise GifError(f"influence.tol: must be >= 0, got {tol}")


def _finish(
    name: str,
    op: _Counted,
    b: Tensor,
    x: Tensor,
    *,
    damping: float,
    tol: float,
    iterations: int,
    exhausted: bool,
    started: float,
    history: tuple[list[float], list[float]],
    stop: str | None,
    atb_norm: float,
    normal_tol: float = 0.0,
) -> SolveResult:
    """Evaluate the true residuals of the returned ``x`` (2 products) and fill the result.

    ``stop`` is the reason the iteration stopped early (NaN/Inf, divergence), if it did;
    ``normal_tol`` an absolute bound on the normal residual that also counts as converged.
    """
    r = b - op.A(x)
    normal = _norm(op.At(r) - damping**2 * x)
    relative = _ratio(_norm(r), _norm(b))
    if not _finite(relative, normal):
        stop = stop or f"{name}: the residual of the returned solution is NaN or Inf; {_TRY}"
    converged = stop is None and (
        relative <= tol or normal <= tol * atb_norm or normal <= normal_tol
    )
    if stop is not None:
        message = stop
    elif converged:
        message = f"{name}: converged in {iterations} iterations"
    elif not exhausted:
        message = (
            f"{name}: its recurrences reached tol {tol:.1e} after {iterations} iterations, but "
            f"the returned solution has relative residual {relative:.2e} and relative normal "
            f"residual {_ratio(normal, atb_norm):.2e}: rounding (a float32 model) limits the "
            "accuracy; the solution is usable, or use a float64 model or a larger influence.tol"
        )
    else:
        message = (
            f"{name}: stopped at max_iter={iterations} with relative residual {relative:.2e} and "
            f"relative normal residual {_ratio(normal, atb_norm):.2e} (tol {tol:.1e}); "
            "the iteration limit regularises the update, raise influence.max_iter for a closer "
            "solve"
        )
    return SolveResult(
        solver=name,
        iterations=iterations,
        hvps=op.calls,
        relative_residual=relative,
        normal_residual=normal,
        converged=converged,
        seconds=time.perf_counter() - started,
        residual_history=history[0],
        normal_history=history[1],
        message=message,
    )


def _trivial(name: str, b: Tensor, atb: Tensor, op: _Counted, started: float) -> SolveResult:
    """``Aᵀ b = 0``: ``x = 0`` is the (minimum-norm) solution."""
    return SolveResult(
        solver=name,
        iterations=0,
        hvps=op.calls,
        relative_residual=1.0 if _norm(b) else 0.0,
        normal_residual=_norm(atb),
        converged=True,
        seconds=time.perf_counter() - started,
        message=f"{name}: Aᵀb = 0, so x = 0 solves the least-squares problem",
    )


def _breakdown(name: str, iteration: int, what: str) -> str:
    return f"{name}: {what} at iteration {iteration}; {_TRY}"


def _step_check(name: str, iteration: int, relative: float, normal_rel: float) -> str | None:
    """The stop reason after an iteration, or ``None`` to go on."""
    if not _finite(relative, normal_rel):
        return _breakdown(name, iteration, "NaN/Inf in the Hessian-vector products")
    if relative > DIVERGED or normal_rel > DIVERGED:
        return _breakdown(name, iteration, f"the residual grew past {DIVERGED:.0e} (diverged)")
    return None


def _report(progress: Progress | None, iteration: int, value: float) -> None:
    if progress is not None:
        progress(iteration, value)


# --------------------------------------------------------------------------- LSQR


def lsqr(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    progress: Progress | None = None,
) -> tuple[Tensor, SolveResult]:
    """LSQR (Paige & Saunders 1982) for ``min ‖A x − b‖² + λ² ‖x‖²``.

    Golub-Kahan bidiagonalisation ``β₁u₁ = b``, ``α₁v₁ = Aᵀu₁``,
    ``β_{k+1}u_{k+1} = A v_k − α_k u_k``, ``α_{k+1}v_{k+1} = Aᵀu_{k+1} − β_{k+1}v_k``, with
    ``x_k`` the damped least-squares solution over ``span(v₁..v_k)`` updated by Givens rotations
    (the first eliminates the damping row). Two products per iteration, one more to start.
    Mathematically equivalent to CG on the normal equations, with better rounding behaviour.
    The recurrences give ``‖r̄_k‖² = ‖A x_k − b‖² + λ²‖x_k‖²`` and ``‖Aᵀr_k − λ²x_k‖ = α|τ|``.
    """
    _check_inputs(b, damping, max_iter, tol)
    started, op = time.perf_counter(), _Counted(matvec, rmatvec)
    beta = _norm(b)
    u = b / beta if beta > 0 else b.clone()
    v = op.At(u)
    alpha = _norm(v)
    atb_norm = alpha * beta
    if atb_norm == 0:
        return torch.zeros_like(v), _trivial("lsqr", b, v * beta, op, started)
    v = v / alpha
    w, x = v.clone(), torch.zeros_like(v)
    phibar, rhobar, damped_res2 = beta, alpha, 0.0
    history: tuple[list[float], list[float]] = ([], [])
    stop, iteration = None, 0
    for iteration in range(1, max_iter + 1):
        u = op.A(v) - alpha * u
        beta = _norm(u)
        if beta > 0:
            u = u / beta
            v = op.At(u) - beta * v
            alpha = _norm(v)
            if alpha > 0:
                v = v / alpha
        # Givens rotation removing the damping row, then the bidiagonal's subdiagonal.
        rhobar1 = math.hypot(rhobar, damping)
        cs1, sn1 = rhobar / rhobar1, damping / rhobar1
        psi, phibar = sn1 * phibar, cs1 * phibar
        rho = math.hypot(rhobar1, beta)
        cs, sn = rhobar1 / rho, beta / rho
        theta, rhobar = sn * alpha, -cs * alpha
        phi, phibar = cs * phibar, sn * phibar
        x_next = x + (phi / rho) * w
        if not torch.isfinite(x_next).all():
            stop = _breakdown("lsqr", iteration, "NaN/Inf in the Hessian-vector products")
            break
        x, w = x_next, v - (theta / rho) * w
        damped_res2 += psi**2
        residual = math.sqrt(max(phibar**2 + damped_res2 - damping**2 * _norm(x) ** 2, 0.0))
        normal = alpha * abs(sn * phi)
        relative, normal_rel = _ratio(residual, _norm(b)), normal / atb_norm
        history[0].append(relative)
        history[1].append(normal_rel)
        _report(progress, iteration, normal_rel)
        stop = _step_check("lsqr", iteration, relative, normal_rel)
        if stop or relative <= tol or normal_rel <= tol or beta == 0 or alpha == 0:
            break
    result = _finish(
        "lsqr",
        op,
        b,
        x,
        damping=damping,
        tol=tol,
        iterations=iteration,
        exhausted=iteration == max_iter,
        started=started,
        history=history,
        stop=stop,
        atb_norm=atb_norm,
    )
    return x, result


# --------------------------------------------------------------------------- CG (CGLS)


def cg(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-6,
    progress: Progress | None = None,
) -> tuple[Tensor, SolveResult]:
    """Conjugate gradients on the normal equations ``(AᵀA + λ²I) x = Aᵀ b`` (CGLS).

    Keeps ``r = b − A x`` and ``s = Aᵀ r − λ² x`` by recurrence instead of forming ``AᵀA``:
    ``q = A p``, ``α = ‖s‖² / (‖q‖² + λ²‖p‖²)``, ``x += α p``, ``r −= α q``,
    ``s = Aᵀ r − λ² x``, ``p = s + (‖s_new‖²/‖s‖²) p``. Two products per iteration, one to start.
    """
    _check_inputs(b, damping, max_iter, tol)
    started, op = time.perf_counter(), _Counted(matvec, rmatvec)
    r = b.clone()
    s = op.At(r)
    atb_norm, b_norm = _norm(s), _norm(b)
    if atb_norm == 0:
        return torch.zeros_like(s), _trivial("cg", b, s, op, started)
    x, p, gamma = torch.zeros_like(s), s.clone(), atb_norm**2
    history: tuple[list[float], list[float]] = ([], [])
    stop, iteration = None, 0
    for iteration in range(1, max_iter + 1):
        q = op.A(p)
        alpha = gamma / (_norm(q) ** 2 + damping**2 * _norm(p) ** 2)
        if not math.isfinite(alpha) or not torch.isfinite(q).all():
            stop = _breakdown("cg", iteration, "NaN/Inf in the Hessian-vector products")
            break
        x, r = x + alpha * p, r - alpha * q
        s = op.At(r) - damping**2 * x
        gamma_next = _norm(s) ** 2
        relative, normal_rel = _ratio(_norm(r), b_norm), math.sqrt(gamma_next) / atb_norm
        history[0].append(relative)
        history[1].append(normal_rel)
        _report(progress, iteration, normal_rel)
        stop = _step_check("cg", iteration, relative, normal_rel)
        if stop or relative <= tol or normal_rel <= tol:
            break
        p, gamma = s + (gamma_next / gamma) * p, gamma_next
    result = _finish(
        "cg",
        op,
        b,
        x,
        damping=damping,
        tol=tol,
        iterations=iteration,
        exhausted=iteration == max_iter,
        started=started,
        history=history,
        stop=stop,
        atb_norm=atb_norm,
    )
    return x, result


# --------------------------------------------------------------------------- Neumann


def neumann(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 200,
    tol: float = 1e-6,
    progress: Progress | None = None,
    scale: float = 1.0,
    scale_step: float = 0.5,
    max_restarts: int = 1000,
    absolute_tol: float | None = None,
) -> tuple[Tensor, SolveResult]:
    """The paper's solver: a Neumann series on the squared system, restarted with a larger scale.

    With the loss scaled by ``1/c`` (``A → A/c``, ``b → b/c``; ``c = scale``) it iterates

        x ← v + x − M x,     v = Aᵀ b / c²,     M = (AᵀA + λ² I) / c²,

    i.e. ``x ← v + x − Pₜ H H Pₜ x`` for GIF. ``M`` is positive semi-definite whatever the sign
    of ``H``'s eigenvalues, so the series converges to ``(AᵀA + λ²I)⁺ Aᵀ b`` — which does not
    depend on ``c`` — as soon as ``c² > σ_max(A)² / 2 + λ²/2``. Whenever the iterate
    difference ``‖x_{k+1} − x_k‖`` grows (the spectral radius of ``I − M`` exceeds 1), the
    iteration restarts from ``x = 0`` with ``c += scale_step``. Growth below ``√eps`` of the
    first difference is rounding noise and does not restart.

    The iterate difference is the normal residual: ``x_{k+1} − x_k = (Aᵀ(b − A x_k) − λ²x_k)/c²``,
    so the diagnostics cost nothing extra. ``max_iter`` bounds the iterations of each attempt
    (the paper's ``max_iter``), ``max_restarts`` the attempts; ``iterations``, ``hvps`` and the
    histories count all attempts. Defaults ``scale=1``,
    ``scale_step=0.5`` and ``max_iter=200`` are the defaults of the paper's code (its
    ``normalizer``, ``step`` and ``max_iter``). Two products per iteration, one to start; a
    restart reuses ``Aᵀ b``.

    Besides ``tol`` (relative), ``absolute_tol`` is the paper's stopping rule: stop, converged,
    once ``‖x_{k+1} − x_k‖ ≤ absolute_tol · √k`` (``k = len(x)``: a root-mean-square change per
    coordinate below ``absolute_tol``; the paper's ``tol · √|t|``). Being absolute, it depends
    on the scale of the loss and on ``c``; None (the default) leaves it off.
    """
    _check_inputs(b, damping, max_iter, tol)
    if not (_finite(scale, scale_step) and scale > 0 and scale_step > 0):
        raise GifError("influence.neumann: scale and scale_step must be finite numbers > 0")
    if max_restarts < 0:
        raise GifError(f"influence.neumann.max_restarts: must be 0 or more, got {max_restarts}")
    if absolute_tol is not None and not (_finite(absolute_tol) and absolute_tol > 0):
        raise GifError(
            f"influence.neumann.absolute_tol: must be a finite number > 0 or null, got "
            f"{absolute_tol}"
        )
    started, op = time.perf_counter(), _Counted(matvec, rmatvec)
    atb = op.At(b)
    atb_norm, b_norm = _norm(atb), _norm(b)
    if atb_norm == 0:
        return torch.zeros_like(atb), _trivial("neumann", b, atb, op, started)
    noise = math.sqrt(torch.finfo(b.dtype).eps)
    small_step = 0.0 if absolute_tol is None else absolute_tol * math.sqrt(atb.numel())
    history: tuple[list[float], list[float]] = ([], [])

    def attempt(c: float) -> tuple[Tensor, str | None, bool]:
        """One attempt at scale ``c``: ``(x, stop reason, grew)``; ``grew`` asks for a restart."""
        v = atb / c**2
        x = v.clone()  # x₁ = v: the first step from x₀ = 0 costs no product.
        first_diff = previous = _norm(v)
        for _ in range(max_iter):
            r = b - op.A(x)
            step = (op.At(r) - damping**2 * x) / c**2  # x_{k+1} − x_k
            diff = _norm(step)
            relative, normal_rel = _ratio(_norm(r), b_norm), diff * c**2 / atb_norm
            history[0].append(relative)
            history[1].append(normal_rel)
            _report(progress, len(history[0]), normal_rel)
            if not _finite(relative, normal_rel):
                return x, _breakdown("neumann", len(history[0]), "NaN/Inf in the products"), False
            if relative <= tol or normal_rel <= tol or diff <= small_step:
                return x, None, False
            if diff > previous and diff > noise * first_diff:
                return x, None, True
            x, previous = x + step, diff
        return x, None, False

    c = scale
    for restart in range(max_restarts + 1):
        before = len(history[0])
        x, stop, grew = attempt(c)
        if not grew:
            break
        if restart == max_restarts:
            stop = _breakdown(
                "neumann",
                len(history[0]),
                f"still diverging at scale c={c:g} after {max_restarts} restarts; raise the scale",
            )
            break
        c += scale_step
    iterations = len(history[0])
    result = _finish(
        "neumann",
        op,
        b,
        x,
        damping=damping,
        tol=tol,
        iterations=iterations,
        exhausted=iterations - before >= max_iter,
        started=started,
        history=history,
        stop=stop,
        atb_norm=atb_norm,
        normal_tol=small_step * c**2,  # the iterate difference is the normal residual / c²
    )
    if stop is None:
        result.message += f" (final scale c={c:g}, {restart} restarts)"
    return x, result


# --------------------------------------------------------------------------- exact


def exact(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    damping: float = 0.0,
    max_iter: int = 1,
    tol: float = 1e-6,
    progress: Progress | None = None,
) -> tuple[Tensor, SolveResult]:
    """Dense float64 solve through the explicitly built matrix, for tiny models and tests.

    ``A`` (``[n, k]``) is built column by column as ``A e_j`` (``k`` products in ``b``'s dtype,
    so its entries are as accurate as the model's dtype) and stored in float64; then with the
    SVD ``A = U diag(σ) Vᵀ``

        x = V diag(σ / (σ² + λ²)) Uᵀ b,

    where for ``λ = 0`` the singular values ``σ ≤ max(n, k) · eps · σ_max`` (eps of ``b``'s
    dtype) count as zero: the minimum-norm least-squares solution, as ``torch.linalg.pinv``.
    ``max_iter`` and ``tol`` are unused (the signature is shared); ``progress`` is called once
    per column. Refuses matrices over ``MAX_DENSE_ENTRIES`` entries.
    """
    _check_inputs(b, damping, 1, tol)
    started, op = time.perf_counter(), _Counted(matvec, rmatvec)
    atb = op.At(b)
    n, k = b.numel(), atb.numel()
    if n * k > MAX_DENSE_ENTRIES:
        raise GifError(
            f"influence.solver: 'exact' would build a dense {n}x{k} matrix "
            f"({8 * n * k / 2**30:.1f} GiB, {k} Hessian-vector products); use 'lsqr' for a model "
            "this size"
        )
    dense = _dense_matrix(op, k, b, progress)
    if not torch.isfinite(dense).all():
        stop = f"exact: NaN/Inf in the Hessian-vector products; {_TRY}"
        result = SolveResult(
            solver="exact",
            iterations=0,
            hvps=op.calls,
            relative_residual=float("nan"),
            normal_residual=float("nan"),
            converged=False,
            seconds=time.perf_counter() - started,
            message=stop,
        )
        return torch.zeros_like(atb), result
    x64 = _damped_pinv_solve(dense, b.double(), damping, torch.finfo(b.dtype).eps)
    r = b.double() - dense @ x64
    normal = _norm(dense.T @ r - damping**2 * x64)
    relative = _ratio(_norm(r), _norm(b.double()))
    result = SolveResult(
        solver="exact",
        iterations=0,
        hvps=op.calls,
        relative_residual=relative,
        normal_residual=normal,
        converged=True,
        seconds=time.perf_counter() - started,
        residual_history=[relative],
        normal_history=[_ratio(normal, _norm(atb))],
        message=f"exact: dense float64 solve of a {n}x{k} matrix ({k} products)",
    )
    return x64.to(b.dtype), result


def _dense_matrix(op: _Counted, k: int, b: Tensor, progress: Progress | None) -> Tensor:
    """``A`` as a float64 ``[n, k]`` matrix, one product ``A e_j`` per column."""
    dense = torch.empty(b.numel(), k, dtype=torch.float64, device=b.device)
    unit = torch.zeros(k, dtype=b.dtype, device=b.device)
    for j in range(k):
        unit[j] = 1
        dense[:, j] = op.A(unit).double()
        unit[j] = 0
        _report(progress, j + 1, 1.0)
    return dense


def _damped_pinv_solve(dense: Tensor, b: Tensor, damping: float, eps: float) -> Tensor:
    """``argmin ‖A x − b‖² + λ²‖x‖²`` via the SVD (minimum norm when ``λ = 0``)."""
    u, sigma, vh = torch.linalg.svd(dense, full_matrices=False)
    if damping > 0:
        gain = sigma / (sigma**2 + damping**2)
    else:
        cutoff = max(dense.shape) * eps * (sigma.max() if sigma.numel() else 0.0)
        gain = torch.where(sigma > cutoff, 1.0 / sigma.clamp_min(1e-300), 0.0)
    return vh.T @ (gain * (u.T @ b))


SOLVERS: dict[str, Callable[..., tuple[Tensor, SolveResult]]] = {
    "lsqr": lsqr,
    "cg": cg,
    "neumann": neumann,
    "exact": exact,
}
"""Solver name (``influence.solver``) -> solver function; all share one signature."""
