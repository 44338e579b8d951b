"""Matrix-free solvers for the damped least-squares problem of every influence estimator.

Every solver has the one signature

    solver(matvec, rmatvec, b, settings, **options) -> (x, SolveResult)

(``settings``: a ``SolverSettings``, the damping, iteration limit, tolerance and progress hook)

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

Beyond one ``λ``: ``lsqr_path`` solves the damped problem for a whole grid of ``λ`` from one
Golub-Kahan run (the regularisation path), and ``solve`` is the one entry point that also takes
a damping *relative* to ``σ_max(A)`` (``relative_damping``), estimated from the same
bidiagonalisation (see docs/design.md, solvers).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor

from gifcli.errors import GifError, ParameterError
from gifcli.records import SolveDiagnostics

Operator = Callable[[Tensor], Tensor]
Progress = Callable[[int, float], None]

STATUSES = {
    "converged": "the residual, or the normal residual |Aᵀr − λ²x| of a least-squares system "
    "with no exact solution, reached influence.tol",
    "iteration-limit": "stopped at influence.max_iter; the limit regularises the update",
    "float-floor": "stopped where rounding limits the accuracy; the solution is usable",
    "breakdown": "NaN/Inf or divergence; the update is not usable",
    "no-solve": "first-order: no curvature solve",
}
"""A solve's ``status`` and what it means (the report and the terminal show it)."""

DIVERGED = 1e6
"""A relative residual or relative normal residual above this counts as divergence."""

MAX_DENSE_ENTRIES = 100_000_000
"""``exact`` refuses to build a dense matrix with more entries (800 MB in float64)."""

_TRY = (
    "try a larger influence.damping, fewer influence.max_iter, curvature 'ggn', a float64 "
    "model, or check that the model's loss is finite on the Hessian sample"
)


@dataclass(kw_only=True)
class SolveResult(SolveDiagnostics):
    """What a solve did and how well it did it (module docstring for the definitions;
    ``status``: ``STATUSES``)."""

    solver: str

    @property
    def ok(self) -> bool:
        """True when the returned ``x`` is the intended solution: converged, or stopped by the
        iteration limit or by rounding (both regularise); False after a breakdown."""
        return self.status != "breakdown"

    def to_dict(self) -> dict:
        """JSON-ready dict (``ok`` included); non-finite floats become ``None``."""
        record = {key: _json_value(value) for key, value in asdict(self).items()}
        record["ok"] = self.ok
        return record


def _json_value(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


@dataclass(frozen=True)
class SolverSettings:
    """What every solver is asked: the damping ``λ`` of the least-squares problem, at most
    ``max_iter`` iterations, the relative tolerance ``tol`` (module docstring) and
    ``progress(iteration, relative normal residual)`` after each iteration. Checked when
    made, before any product."""

    damping: float = 0.0
    max_iter: int = 100
    tol: float = 1e-6
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.damping < 0 or not math.isfinite(self.damping):
            raise ParameterError("damping", f"must be a finite number >= 0, got {self.damping}")
        if self.max_iter < 1:
            raise ParameterError("max_iter", f"must be >= 1, got {self.max_iter}")
        if self.tol < 0:
            raise ParameterError("tol", f"must be >= 0, got {self.tol}")

    def values(self) -> tuple[float, int, float, Progress | None]:
        """``(damping, max_iter, tol, progress)``."""
        return self.damping, self.max_iter, self.tol, self.progress


Solved = tuple[Tensor, "SolveResult"]


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


def _check_b(b: Tensor) -> None:
    if b.ndim != 1:
        raise ValueError(f"b must be a flat vector, got shape {tuple(b.shape)}")
    if not torch.isfinite(b).all():
        raise GifError("removal gradient: contains NaN or Inf; check the checkpoint and data")


class _Run:
    """One solve in progress: its products counted (``op``), its clock, its settings and the
    residual histories its iterations record."""

    def __init__(
        self, name: str, matvec: Operator, rmatvec: Operator, b: Tensor, settings: SolverSettings
    ) -> None:
        _check_b(b)
        self.name, self.b, self.settings = name, b, settings
        self.op = _Counted(matvec, rmatvec)
        self.started = time.perf_counter()
        self.history: tuple[list[float], list[float]] = ([], [])

    def at(self, damping: float, history: tuple[list[float], list[float]]) -> _Run:
        """The same run read at another damping, with that damping's histories (a path's)."""
        other = copy.copy(self)
        other.settings, other.history = replace(self.settings, damping=damping), history
        return other

    def record(self, relative: float, normal_rel: float) -> None:
        """An iteration's relative residual and relative normal residual, and the progress
        hook told."""
        self.history[0].append(relative)
        self.history[1].append(normal_rel)
        _report(self.settings.progress, len(self.history[0]), normal_rel)

    def trivial(self, atb: Tensor) -> Solved:
        """``Aᵀ b = 0``: ``x = 0`` is the (minimum-norm) solution."""
        return torch.zeros_like(atb), SolveResult(
            solver=self.name,
            iterations=0,
            hvps=self.op.calls,
            relative_residual=1.0 if _norm(self.b) else 0.0,
            normal_residual=_norm(atb),
            converged=True,
            seconds=time.perf_counter() - self.started,
            damping=self.settings.damping,
            message=f"{self.name}: Aᵀb = 0, so x = 0 solves the least-squares problem",
        )

    def finish(
        self,
        x: Tensor,
        *,
        iterations: int,
        stop: str | None,
        atb_norm: float,
        exhausted: bool | None = None,
        normal_tol: float = 0.0,
    ) -> Solved:
        """Evaluate the true residuals of the returned ``x`` (2 products) and fill the result.

        ``stop`` is the reason the iteration stopped early (NaN/Inf, divergence), if it did;
        ``exhausted``: the iteration limit was reached (default: ``iterations == max_iter``);
        ``normal_tol`` an absolute bound on the normal residual that also counts as converged.
        """
        name, b, op = self.name, self.b, self.op
        damping, max_iter, tol, _ = self.settings.values()
        exhausted = iterations == max_iter if exhausted is None else exhausted
        r = b - op.A(x)
        normal = _norm(op.At(r) - damping**2 * x)
        relative = _ratio(_norm(r), _norm(b))
        if not _finite(relative, normal):
            stop = stop or f"{name}: the residual of the returned solution is NaN or Inf; {_TRY}"
        converged = stop is None and (
            relative <= tol or normal <= tol * atb_norm or normal <= normal_tol
        )
        status = (
            "breakdown"
            if stop is not None
            else "converged"
            if converged
            else "float-floor"
            if not exhausted
            else "iteration-limit"
        )
        if stop is not None:
            message = stop
        elif converged:
            message = f"{name}: converged in {iterations} iterations"
        elif not exhausted:
            message = (
                f"{name}: its recurrences reached tol {tol:.1e} after {iterations} iterations, "
                f"but the returned solution has relative residual {relative:.2e} and relative "
                f"normal residual {_ratio(normal, atb_norm):.2e}: rounding (a float32 model) "
                "limits the accuracy; the solution is usable, or use a float64 model or a "
                "larger influence.tol"
            )
        else:
            message = (
                f"{name}: stopped at max_iter={iterations} with relative residual "
                f"{relative:.2e} and relative normal residual {_ratio(normal, atb_norm):.2e} "
                f"(tol {tol:.1e}); the iteration limit regularises the update, raise "
                "influence.max_iter for a closer solve"
            )
        return x, SolveResult(
            solver=name,
            iterations=iterations,
            hvps=op.calls,
            relative_residual=relative,
            normal_residual=normal,
            converged=converged,
            seconds=time.perf_counter() - self.started,
            damping=damping,
            residual_history=self.history[0],
            normal_history=self.history[1],
            message=message,
            status=status,
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


# --------------------------------------------------------------------------- Golub-Kahan


class _GolubKahan:
    """Golub-Kahan bidiagonalisation of ``A`` started from ``b``, one step at a time.

    ``β₁u₁ = b``, ``α₁v₁ = Aᵀu₁``, then each ``step()`` (two products)
    ``β_{j+1}u_{j+1} = A v_j − α_j u_j``, ``α_{j+1}v_{j+1} = Aᵀu_{j+1} − β_{j+1}v_j``. After
    ``k`` steps ``A V_k = U_{k+1} B_k`` with ``B_k`` the ``(k+1)×k`` lower bidiagonal of
    ``α₁..α_k`` (diagonal) and ``β₂..β_{k+1}`` (subdiagonal); ``V_k`` spans the Krylov space
    ``K_k(AᵀA, Aᵀb)``, which does not depend on any damping. ``alphas``/``betas`` keep every
    coefficient; only the current ``u``, ``v`` are kept. A zero ``β`` leaves ``v`` and ``α`` as
    they were (the space is exhausted).
    """

    def __init__(self, op: _Counted, b: Tensor) -> None:
        self.op = op
        self.beta = _norm(b)
        self.u = b / self.beta if self.beta > 0 else b.clone()
        v = op.At(self.u)
        self.alpha = _norm(v)
        self.v = v / self.alpha if self.alpha > 0 else v
        self.alphas, self.betas = [self.alpha], [self.beta]

    def step(self) -> tuple[float, float]:
        """One step; returns the new ``(β, α)``."""
        u = self.op.A(self.v) - self.alpha * self.u
        beta = _norm(u)
        if beta > 0:
            u = u / beta
            v = self.op.At(u) - beta * self.v
            self.alpha = _norm(v)
            self.v = v / self.alpha if self.alpha > 0 else v
        self.u, self.beta = u, beta
        self.alphas.append(self.alpha)
        self.betas.append(beta)
        return beta, self.alpha

    def reorthogonalize(self, basis: Tensor) -> float:
        """Project the newest ``v`` off the rows of ``basis`` (``V``), twice
        ("twice is enough"), and renormalise; returns the corrected ``α``. In floating point
        the ``v_j`` lose orthogonality as Ritz values converge; this keeps ``V`` orthonormal
        (one-sided reorthogonalisation) at ``2k`` dot products of length ``n`` per step and
        no product with ``A``."""
        if self.beta == 0 or self.alpha == 0:
            return self.alpha
        v = self.v * self.alpha
        for _ in range(2):
            v = v - (basis @ v) @ basis
        self.alpha = _norm(v)
        self.v = v / self.alpha if self.alpha > 0 else v
        self.alphas[-1] = self.alpha
        return self.alpha


class _Bidiagonal:
    """The small damped problem ``min ‖B_k y − β₁e₁‖² + λ²‖y‖²`` of a Golub-Kahan run, in float64.

    Built from ``α₁..α_{k+1}`` and ``β₁..β_{k+1}``; one SVD of ``B_k`` serves every ``λ``. With
    ``x = V_k y``: ``‖A x − b‖ = ‖s‖``, ``s = β₁e₁ − B_k y``, and
    ``‖Aᵀ(b − Ax) − λ²x‖² = ‖B_kᵀ s − λ² y‖² + (α_{k+1} s_{k+1})²`` (``AᵀU_{k+1} = V_{k+1}L``,
    ``L`` the square bidiagonal ``[B_k, α_{k+1}e_{k+1}]ᵀ``): the diagnostics cost no product.
    """

    def __init__(self, alphas: Sequence[float], betas: Sequence[float], k: int) -> None:
        self.matrix = torch.zeros(k + 1, k, dtype=torch.float64)
        index = torch.arange(k)
        self.matrix[index, index] = torch.tensor(alphas[:k], dtype=torch.float64)
        self.matrix[index + 1, index] = torch.tensor(betas[1 : k + 1], dtype=torch.float64)
        self.rhs = torch.zeros(k + 1, dtype=torch.float64)
        self.rhs[0] = betas[0]
        self.alpha_next = alphas[k]
        self.svd = torch.linalg.svd(self.matrix, full_matrices=False)

    @property
    def sigma_max(self) -> float:
        """``σ_max(B_k)``: a lower bound of ``‖A‖₂`` that converges in few steps (Lanczos)."""
        return float(self.svd[1][0]) if self.svd[1].numel() else 0.0

    def solve(self, dampings: Sequence[float], eps: float) -> tuple[Tensor, Tensor, Tensor]:
        """For every ``λ`` of ``dampings`` (``G`` of them) at once: ``y`` (``[G, k]``),
        ``‖A x − b‖`` and ``‖Aᵀ(b − Ax) − λ²x‖`` (``[G]`` each) for ``x = V_k y``."""
        u, sigma, vh = self.svd
        lam = torch.tensor(dampings, dtype=torch.float64)
        gains = _svd_gains(sigma, lam, max(self.matrix.shape) * eps)
        y = (gains * (u.T @ self.rhs)) @ vh
        s = self.rhs - y @ self.matrix.T
        gradient = s @ self.matrix - lam[:, None] ** 2 * y
        normal = torch.hypot(torch.linalg.vector_norm(gradient, dim=1), self.alpha_next * s[:, -1])
        return y, torch.linalg.vector_norm(s, dim=1), normal


# --------------------------------------------------------------------------- LSQR


def lsqr(matvec: Operator, rmatvec: Operator, b: Tensor, settings: SolverSettings) -> Solved:
    """LSQR (Paige & Saunders 1982) for ``min ‖A x − b‖² + λ² ‖x‖²``.

    On the Golub-Kahan bidiagonalisation (``_GolubKahan``), ``x_k`` is the damped least-squares
    solution over ``span(v₁..v_k)``, updated by Givens rotations (the first eliminates the
    damping row); only ``x`` and one search direction are kept. Two products per iteration, one
    more to start. Mathematically equivalent to CG on the normal equations, with better rounding
    behaviour. The recurrences give ``‖r̄_k‖² = ‖A x_k − b‖² + λ²‖x_k‖²`` and
    ``‖Aᵀr_k − λ²x_k‖ = α|τ|``.
    """
    run = _Run("lsqr", matvec, rmatvec, b, settings)
    damping, max_iter, tol, _ = settings.values()
    bidiagonal = _GolubKahan(run.op, b)
    atb_norm = bidiagonal.alpha * bidiagonal.beta
    if atb_norm == 0:
        return run.trivial(bidiagonal.v * bidiagonal.beta)
    w, x = bidiagonal.v.clone(), torch.zeros_like(bidiagonal.v)
    phibar, rhobar, damped_res2 = bidiagonal.beta, bidiagonal.alpha, 0.0
    stop, iteration = None, 0
    for iteration in range(1, max_iter + 1):
        beta, alpha = bidiagonal.step()
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
        x, w = x_next, bidiagonal.v - (theta / rho) * w
        damped_res2 += psi**2
        residual = math.sqrt(max(phibar**2 + damped_res2 - damping**2 * _norm(x) ** 2, 0.0))
        normal = alpha * abs(sn * phi)
        relative, normal_rel = _ratio(residual, _norm(b)), normal / atb_norm
        run.record(relative, normal_rel)
        stop = _step_check("lsqr", iteration, relative, normal_rel)
        if stop or relative <= tol or normal_rel <= tol or beta == 0 or alpha == 0:
            break
    return run.finish(x, iterations=iteration, stop=stop, atb_norm=atb_norm)


# --------------------------------------------------------------------------- LSQR path


DAMPING_GRID = (8, 1e-4, 1.0)
"""Default grid of ``lsqr_path``: (points, smallest, largest), log-spaced, times ``σ_max``."""

SIGMA_STEPS = 10
"""Golub-Kahan steps (``2·SIGMA_STEPS + 1`` products) that estimate ``σ_max`` for a relative
damping with a solver other than ``lsqr``, which takes it from its own run."""


def damping_grid(points: int, smallest: float, largest: float) -> list[float]:
    """``points`` log-spaced values from ``smallest`` to ``largest`` (both > 0), ascending."""
    if points < 1 or not 0 < smallest <= largest:
        raise GifError(
            f"damping grid: need points >= 1 and 0 < smallest <= largest, got {points} points "
            f"from {smallest:g} to {largest:g}"
        )
    return torch.logspace(
        math.log10(smallest), math.log10(largest), points, dtype=torch.float64
    ).tolist()


def relative_damping(value: float, sigma_max: float) -> float:
    """The absolute ``λ = value · σ_max`` of a damping given relative to the curvature scale.

    ``σ_max`` is ``‖A‖₂`` estimated by ``σ_max(B_k)`` of a Golub-Kahan run on ``(A, b)``
    (``lsqr_path``, ``estimate_sigma_max``), so a relative value means the same on any model or
    loss scale: ``λ`` scales with ``A``.
    """
    if value < 0 or not math.isfinite(value):
        raise ParameterError("damping", f"must be a finite number >= 0, got {value}")
    if sigma_max < 0 or not math.isfinite(sigma_max):
        raise ParameterError(
            "damping",
            f"the curvature scale σ_max is {sigma_max}, so a relative damping "
            f"has no meaning; {_TRY}",
        )
    return value * sigma_max


@dataclass
class PathResult:
    """The damped least-squares solutions of one Golub-Kahan run for a grid of ``λ``.

    ``lambdas``: the absolute ``λ`` (``[G]``, in the order of the grid); ``relative``:
    ``λ / σ_max``; ``records[i]``: the ``SolveResult`` of ``λ_i`` (``iterations``, ``hvps`` and
    ``seconds`` are those of the one run, shared by every ``λ``); ``coefficients``: ``y_λ``,
    ``[G, k]`` float64; ``basis``: ``V_k``, ``[k, n]`` (rows ``v_j``). ``solution(i)`` builds
    ``x_λ = V_k y_λ`` (``[n]``, ``b``'s dtype and device) when asked, so only the solutions
    in use occupy memory.
    """

    lambdas: list[float]
    relative: list[float]
    sigma_max: float
    iterations: int
    hvps: int
    seconds: float
    records: list[SolveResult]
    coefficients: Tensor
    basis: Tensor
    device: torch.device
    sigma_history: list[float] = field(default_factory=list)
    """``σ_max(B_j)`` after each iteration: how settled the estimate is."""
    message: str = ""

    def __len__(self) -> int:
        return len(self.lambdas)

    def solution(self, index: int) -> Tensor:
        """``x_λ`` of ``lambdas[index]``, ``[n]``."""
        k = self.coefficients.shape[1]
        x = self.coefficients[index].to(self.basis.dtype) @ self.basis[:k]
        return x.to(self.device)

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {
            "lambdas": self.lambdas,
            "relative": self.relative,
            "sigma_max": self.sigma_max,
            "iterations": self.iterations,
            "hvps": self.hvps,
            "seconds": self.seconds,
            "sigma_history": self.sigma_history,
            "message": self.message,
            "records": [record.to_dict() for record in self.records],
        }


def lsqr_path(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    grid: Sequence[float] | None = None,
    relative: bool = True,
    max_iter: int = 20,
    tol: float = 1e-6,
    progress: Progress | None = None,
    max_basis_bytes: int | None = None,
    reorthogonalize: bool = False,
    verify: bool = False,
) -> PathResult:
    """LSQR for every ``λ`` of ``grid`` at once: ``min ‖A x − b‖² + λ² ‖x‖²`` from one run.

    The Golub-Kahan bidiagonalisation does not depend on ``λ``, and LSQR with damping ``λ``
    after ``k`` iterations is exactly the damped problem restricted to its Krylov space
    ``span(V_k)``: ``x_λ = V_k y_λ``, ``y_λ = argmin ‖B_k y − β₁e₁‖² + λ²‖y‖²``. So one run of
    ``k`` steps (``2k + 1`` products, as ``lsqr``) keeps ``V_k`` and solves the small float64
    problem for each ``λ`` (one SVD of ``B_k``, ``_Bidiagonal``): it equals ``lsqr`` at each
    ``λ`` with the same iterations up to rounding, and the exact damped solution once ``V_k``
    spans the whole space (in floating point that takes more than ``n`` steps on an
    ill-conditioned ``A``, or ``reorthogonalize``). By default ``V_k`` is not reorthogonalised,
    exactly like ``lsqr``'s own vectors: both lose orthogonality alike and still agree.

    Args:
        grid: the ``λ`` values; default ``damping_grid(*DAMPING_GRID)`` (8 values from 1e-4
            to 1). ``relative=True``: they are multiples of ``σ_max``, the largest singular
            value of ``B_k`` (an estimate of ``‖A‖₂`` from this run); else absolute.
        max_iter, tol: at most ``max_iter`` steps; stop early once every ``λ`` of the grid has
            ``relative_residual <= tol`` or relative normal residual ``<= tol``, or the
            Krylov space is exhausted (``α`` or ``β`` below ``eps · σ_max``).
        progress: ``progress(iteration, the worst relative normal residual of the grid)``.
        max_basis_bytes: cap on ``V_k``'s memory, ``k · n · itemsize`` bytes (``4 k n`` in
            float32, ``n`` the length of ``x``): the run stops at the iterations that fit,
            and says so.
        reorthogonalize: keep ``V_k`` orthonormal (``_GolubKahan.reorthogonalize``; no extra
            product). Then ``x_λ`` is no longer ``lsqr``'s in floating point but the damped
            solution over a true ``k``-dimensional Krylov space.
        verify: evaluate each returned ``x_λ``'s true residuals with two products per ``λ``
            (as every other solver does); by default the diagnostics come from the small
            problem (equal in exact arithmetic; see ``_Bidiagonal``) and cost nothing.

    Each record's ``residual_history``/``normal_history`` are LSQR's at that ``λ`` after each
    iteration, from the small problems ``B_1..B_k``.
    """
    settings = SolverSettings(max_iter=max_iter, tol=tol)  # checked before any product
    values = list(damping_grid(*DAMPING_GRID) if grid is None else grid)
    if not values or any(v < 0 or not math.isfinite(v) for v in values):
        raise GifError(f"damping grid: needs finite values >= 0, got {values}")
    tracked = _Run("lsqr", matvec, rmatvec, b, settings)
    started, op = tracked.started, tracked.op
    run = _GolubKahan(op, b)
    atb_norm, n = run.alpha * run.beta, run.v.numel()
    steps = _basis_steps(max_iter, max_basis_bytes, n, b.dtype)
    basis = torch.empty(steps if atb_norm else 0, n, dtype=b.dtype, device=b.device)
    eps = torch.finfo(b.dtype).eps
    smalls: list[_Bidiagonal] = []
    stop = None
    while atb_norm and len(smalls) < steps:
        basis[len(smalls)] = run.v
        beta, alpha = run.step()
        if reorthogonalize and _finite(beta, alpha):
            alpha = run.reorthogonalize(basis[: len(smalls) + 1])
        if not _finite(beta, alpha):
            stop = _breakdown("lsqr", len(smalls) + 1, "NaN/Inf in the Hessian-vector products")
            break
        small = _Bidiagonal(run.alphas, run.betas, len(smalls) + 1)
        smalls.append(small)
        _, residual, normal = small.solve(_absolute(values, relative, small), eps)
        residual, normal = residual / run.betas[0], normal / atb_norm
        _report(progress, len(smalls), float(normal.max()))
        stop = _step_check("lsqr", len(smalls), float(residual.max()), float(normal.max()))
        converged = bool(((residual <= tol) | (normal <= tol)).all())
        if stop or converged or min(beta, alpha) <= eps * small.sigma_max:
            break
    k = len(smalls)
    lambdas = _absolute(values, relative, smalls[-1] if smalls else None)
    coefficients, records = _path_records(smalls, lambdas, run, tol=tol, stop=stop, eps=eps)
    path = PathResult(
        lambdas=lambdas,
        relative=[_ratio(lam, records[0].sigma_max) for lam in lambdas],
        sigma_max=records[0].sigma_max,
        iterations=k,
        hvps=0,
        seconds=0.0,
        records=records,
        coefficients=coefficients,
        basis=basis,
        device=b.device,
        sigma_history=[small.sigma_max for small in smalls],
    )
    capped = steps < max_iter and k == steps
    for i, record in enumerate(records):
        if verify and atb_norm:
            at = tracked.at(record.damping, (record.residual_history, record.normal_history))
            _, checked = at.finish(path.solution(i), iterations=k, stop=stop, atb_norm=atb_norm)
            checked.sigma_max, records[i] = record.sigma_max, checked
        else:
            record.message = _path_message(record, stop, k, max_iter, tol, atb_norm, capped)
    path.hvps, path.seconds = op.calls, time.perf_counter() - started
    for record in records:
        record.hvps, record.seconds = path.hvps, path.seconds
        record.message += (
            f"; λ = {record.damping:.3g} = {_ratio(record.damping, path.sigma_max):.3g} × "
            f"σ_max {path.sigma_max:.3g} (σ_max of the same run)"
        )
    path.message = (
        f"lsqr path: {len(lambdas)} dampings from one run of {k} iterations "
        f"({path.hvps} products), σ_max ≈ {path.sigma_max:.3g}"
        + (f"; {stop}" if stop else "")
        + (f"; the basis cap stopped it at {steps} iterations" if capped else "")
    )
    return path


def _basis_steps(max_iter: int, max_basis_bytes: int | None, n: int, dtype: torch.dtype) -> int:
    """The iterations whose basis fits in ``max_basis_bytes`` (all ``max_iter`` without a cap)."""
    if max_basis_bytes is None:
        return max_iter
    vector = n * torch.finfo(dtype).bits // 8
    if max_basis_bytes < vector:
        raise GifError(
            f"lsqr path: one Krylov vector takes {vector / 2**20:.1f} MiB, more than the basis "
            f"cap of {max_basis_bytes / 2**20:.1f} MiB; raise the cap or use a numeric "
            "influence.damping (plain lsqr keeps no basis)"
        )
    return min(max_iter, max_basis_bytes // vector)


def _absolute(values: Sequence[float], relative: bool, small: _Bidiagonal | None) -> list[float]:
    """The grid's absolute ``λ`` (relative values times ``σ_max(B_k)``)."""
    if not relative:
        return list(values)
    sigma_max = small.sigma_max if small is not None else 0.0
    return [relative_damping(v, sigma_max) for v in values]


def _path_records(
    smalls: list[_Bidiagonal],
    lambdas: list[float],
    run: _GolubKahan,
    *,
    tol: float,
    stop: str | None,
    eps: float,
) -> tuple[Tensor, list[SolveResult]]:
    """``y_λ`` (``[G, k]``) and one record per ``λ`` from the small problems ``B_1..B_k``."""
    b_norm, atb_norm = run.betas[0], run.alphas[0] * run.betas[0]
    sigma_max = smalls[-1].sigma_max if smalls else 0.0
    coefficients = torch.zeros(len(lambdas), len(smalls), dtype=torch.float64)
    residuals = torch.full((len(smalls) + 1, len(lambdas)), b_norm, dtype=torch.float64)
    normals = torch.full((len(smalls) + 1, len(lambdas)), atb_norm, dtype=torch.float64)
    for j, small in enumerate(smalls, start=1):
        coefficients, residuals[j], normals[j] = small.solve(lambdas, eps)
    relative = residuals / b_norm if b_norm else torch.zeros_like(residuals)
    normal_rel = normals / atb_norm if atb_norm else torch.zeros_like(normals)
    records = []
    for i, lam in enumerate(lambdas):
        final, normal = float(relative[-1, i]), float(normals[-1, i])
        converged = stop is None and (final <= tol or normal <= tol * atb_norm)
        records.append(
            SolveResult(
                solver="lsqr",
                iterations=len(smalls),
                hvps=0,
                relative_residual=final,
                normal_residual=normal,
                converged=converged,
                status="breakdown" if stop else "converged" if converged else "iteration-limit",
                seconds=0.0,
                damping=lam,
                sigma_max=sigma_max,
                residual_history=relative[1:, i].tolist(),
                normal_history=normal_rel[1:, i].tolist(),
            )
        )
    return coefficients, records


def _path_message(
    record: SolveResult,
    stop: str | None,
    k: int,
    max_iter: int,
    tol: float,
    atb_norm: float,
    capped: bool,
) -> str:
    if atb_norm == 0:
        return "lsqr: Aᵀb = 0, so x = 0 solves the least-squares problem"
    if stop is not None:
        return stop
    where = (
        f"converged in {k} iterations"
        if record.converged
        else f"stopped at max_iter={k}"
        if k == max_iter
        else f"stopped at the basis cap, {k} iterations"
        if capped
        else f"stopped after {k} iterations (the Krylov space is exhausted)"
    )
    return (
        f"lsqr: {where} with relative residual {record.relative_residual:.2e} and relative "
        f"normal residual {_ratio(record.normal_residual, atb_norm):.2e} (tol {tol:.1e}; "
        "from the bidiagonal problem)"
    )


def estimate_sigma_max(
    matvec: Operator, rmatvec: Operator, b: Tensor, *, steps: int = SIGMA_STEPS
) -> tuple[float, int]:
    """``(σ_max(B_k), products)`` after ``steps`` Golub-Kahan steps from ``b``, keeping no basis.

    The same estimate of ``‖A‖₂`` that ``lsqr_path`` takes from its own run (Lanczos: the
    largest singular value converges first); ``2·steps + 1`` products.
    """
    op = _Counted(matvec, rmatvec)
    run = _GolubKahan(op, b)
    k = 0
    while run.alpha * run.beta and k < steps:
        beta, alpha = run.step()
        if not _finite(beta, alpha):
            break
        k += 1
        if beta == 0 or alpha == 0:
            break
    return (_Bidiagonal(run.alphas, run.betas, k).sigma_max if k else 0.0), op.calls


def solve(
    name: str,
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    *,
    damping: float,
    relative: bool = False,
    max_iter: int,
    tol: float,
    progress: Progress | None = None,
    **options: object,
) -> Solved:
    """Solve with ``SOLVERS[name]``; ``relative=True``: ``damping`` is ``λ / σ_max(A)``.

    A relative damping takes ``σ_max`` from the bidiagonalisation of the solve itself with
    ``lsqr`` (``lsqr_path`` on one ``λ``, with ``lsqr``'s residual check; no extra product),
    and from ``estimate_sigma_max`` (``SIGMA_STEPS`` steps, counted in ``hvps``) with the other
    solvers. The record carries the absolute ``λ`` (``damping``) and ``sigma_max``.
    """
    if name not in SOLVERS:
        raise ParameterError("solver", f"unknown {name!r}; use one of {', '.join(SOLVERS)}")
    settings = SolverSettings(
        damping=0.0 if relative else damping, max_iter=max_iter, tol=tol, progress=progress
    )
    if not relative:
        return SOLVERS[name](matvec, rmatvec, b, settings, **options)
    relative_damping(damping, 0.0)  # validates the value before any product
    if name == "lsqr":
        path = lsqr_path(
            matvec,
            rmatvec,
            b,
            grid=[damping],
            verify=True,
            max_iter=max_iter,
            tol=tol,
            progress=progress,
        )
        return path.solution(0), path.records[0]
    _check_b(b)
    started = time.perf_counter()
    sigma_max, products = estimate_sigma_max(matvec, rmatvec, b)
    lam = relative_damping(damping, sigma_max)
    x, result = SOLVERS[name](matvec, rmatvec, b, replace(settings, damping=lam), **options)
    result.hvps += products
    result.seconds = time.perf_counter() - started
    result.sigma_max = sigma_max
    result.message += (
        f"; λ = {lam:.3g} ({damping:g} × σ_max {sigma_max:.3g}, σ_max from {SIGMA_STEPS} "
        f"Golub-Kahan steps, {products} products)"
    )
    return x, result


# --------------------------------------------------------------------------- CG (CGLS)


def cg(matvec: Operator, rmatvec: Operator, b: Tensor, settings: SolverSettings) -> Solved:
    """Conjugate gradients on the normal equations ``(AᵀA + λ²I) x = Aᵀ b`` (CGLS).

    Keeps ``r = b − A x`` and ``s = Aᵀ r − λ² x`` by recurrence instead of forming ``AᵀA``:
    ``q = A p``, ``α = ‖s‖² / (‖q‖² + λ²‖p‖²)``, ``x += α p``, ``r −= α q``,
    ``s = Aᵀ r − λ² x``, ``p = s + (‖s_new‖²/‖s‖²) p``. Two products per iteration, one to start.
    """
    run = _Run("cg", matvec, rmatvec, b, settings)
    damping, max_iter, tol, _ = settings.values()
    op, r = run.op, b.clone()
    s = op.At(r)
    atb_norm, b_norm = _norm(s), _norm(b)
    if atb_norm == 0:
        return run.trivial(s)
    x, p, gamma = torch.zeros_like(s), s.clone(), atb_norm**2
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
        run.record(relative, normal_rel)
        stop = _step_check("cg", iteration, relative, normal_rel)
        if stop or relative <= tol or normal_rel <= tol:
            break
        p, gamma = s + (gamma_next / gamma) * p, gamma_next
    return run.finish(x, iterations=iteration, stop=stop, atb_norm=atb_norm)


# --------------------------------------------------------------------------- Neumann


def neumann(
    matvec: Operator,
    rmatvec: Operator,
    b: Tensor,
    settings: SolverSettings,
    *,
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
    histories count all attempts. The defaults ``scale=1`` and ``scale_step=0.5`` are the
    paper's code's (its ``normalizer`` and ``step``; its ``max_iter`` is 200). Two products per
    iteration, one to start; a restart reuses ``Aᵀ b``.

    Besides ``tol`` (relative), ``absolute_tol`` is the paper's stopping rule: stop, converged,
    once ``‖x_{k+1} − x_k‖ ≤ absolute_tol · √k`` (``k = len(x)``: a root-mean-square change per
    coordinate below ``absolute_tol``; the paper's ``tol · √|t|``). Being absolute, it depends
    on the scale of the loss and on ``c``; None (the default) leaves it off.
    """
    run = _Run("neumann", matvec, rmatvec, b, settings)
    damping, max_iter, tol, _ = settings.values()
    if not (_finite(scale, scale_step) and scale > 0 and scale_step > 0):
        raise ParameterError("neumann", "scale and scale_step must be finite numbers > 0")
    if max_restarts < 0:
        raise ParameterError("neumann.max_restarts", f"must be 0 or more, got {max_restarts}")
    if absolute_tol is not None and not (_finite(absolute_tol) and absolute_tol > 0):
        raise ParameterError(
            "neumann.absolute_tol", f"must be a finite number > 0 or null, got {absolute_tol}"
        )
    op, history = run.op, run.history
    atb = op.At(b)
    atb_norm, b_norm = _norm(atb), _norm(b)
    if atb_norm == 0:
        return run.trivial(atb)
    noise = math.sqrt(torch.finfo(b.dtype).eps)
    small_step = 0.0 if absolute_tol is None else absolute_tol * math.sqrt(atb.numel())

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
            run.record(relative, normal_rel)
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
    x, result = run.finish(
        x,
        iterations=iterations,
        stop=stop,
        atb_norm=atb_norm,
        exhausted=iterations - before >= max_iter,
        normal_tol=small_step * c**2,  # the iterate difference is the normal residual / c²
    )
    if stop is None:
        result.message += f" (final scale c={c:g}, {restart} restarts)"
    return x, result


# --------------------------------------------------------------------------- exact


def exact(matvec: Operator, rmatvec: Operator, b: Tensor, settings: SolverSettings) -> Solved:
    """Dense float64 solve through the explicitly built matrix, for tiny models and tests.

    ``A`` (``[n, k]``) is built column by column as ``A e_j`` (``k`` products in ``b``'s dtype,
    so its entries are as accurate as the model's dtype) and stored in float64; then with the
    SVD ``A = U diag(σ) Vᵀ``

        x = V diag(σ / (σ² + λ²)) Uᵀ b,

    where for ``λ = 0`` the singular values ``σ ≤ max(n, k) · eps · σ_max`` (eps of ``b``'s
    dtype) count as zero: the minimum-norm least-squares solution, as ``torch.linalg.pinv``.
    ``settings.max_iter`` is unused (the signature is shared); ``progress`` is called once per
    column. Refuses matrices over ``MAX_DENSE_ENTRIES`` entries.
    """
    run = _Run("exact", matvec, rmatvec, b, settings)
    damping, _, _, progress = settings.values()
    started, op = run.started, run.op
    atb = op.At(b)
    n, k = b.numel(), atb.numel()
    if n * k > MAX_DENSE_ENTRIES:
        raise ParameterError(
            "solver",
            f"'exact' would build a dense {n}x{k} matrix "
            f"({8 * n * k / 2**30:.1f} GiB, {k} Hessian-vector products); use 'lsqr' for a model "
            "this size",
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
            damping=damping,
            message=stop,
            status="breakdown",
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
        damping=damping,
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
    svd = torch.linalg.svd(dense, full_matrices=False)
    return _svd_solve(svd, b, damping, max(dense.shape) * eps)


def _svd_solve(svd: tuple[Tensor, Tensor, Tensor], b: Tensor, damping: float, cutoff: float):
    """``V diag(σ/(σ² + λ²)) Uᵀ b`` from ``A = U diag(σ) Vᵀ`` (``_svd_gains``)."""
    u, sigma, vh = svd
    gain = _svd_gains(sigma, torch.tensor([damping], dtype=sigma.dtype), cutoff)[0]
    return vh.T @ (gain * (u.T @ b))


def _svd_gains(sigma: Tensor, dampings: Tensor, cutoff: float) -> Tensor:
    """The filter factors ``σ / (σ² + λ²)``, one row per ``λ`` (``[G, k]``); for ``λ = 0`` the
    singular values ``σ ≤ cutoff · σ_max`` count as zero (the minimum-norm solution)."""
    floor = cutoff * (sigma.max() if sigma.numel() else 0.0)
    inverse = torch.where(sigma > floor, 1.0 / sigma.clamp_min(1e-300), 0.0)
    lam = dampings[:, None]
    return torch.where(lam > 0, sigma / (sigma**2 + lam**2), inverse)


SOLVERS: dict[str, Callable[..., Solved]] = {
    "lsqr": lsqr,
    "cg": cg,
    "neumann": neumann,
    "exact": exact,
}
"""Solver name (``influence.solver``) -> solver function; all share one signature."""
