"""Hessian- and Gauss-Newton-vector products of the retained risk, through ``torch.func``.

Parameters are handled as one *flat vector*: the concatenation of ``model.named_parameters()``
that require grad, in that order (``flatten_params``). Parameters that do not require grad and
all buffers are held fixed.

The retained risk over the Hessian sample ``{(x_i, y_i)}_{i=1..N}`` is

    R(θ) = (1/N) Σ_i s · CE(f(x_i; θ), y_i)            (s = ``loss_scale``)

and every product streams the sample in batches: each batch contributes the derivative of its
*summed* loss, the sums and the sample count go through ``reduce_sum`` (the one reduction
point), and the total is divided by the count. Batches of different sizes are therefore weighted
by their size, and so are ranks holding different numbers of samples once ``reduce_sum``
becomes an all-reduce.

HVP path. Three ``torch.func`` compositions give ``H v`` for one batch:

- forward-over-reverse ``jvp(grad(L), θ, v)`` (the default): one forward pass carrying dual
  numbers and one backward pass; no graph of the gradient is kept;
- reverse-over-reverse ``vjp(grad(L), θ)(v)``: builds and differentiates the graph of the
  gradient, about twice the memory of forward-over-reverse;
- ``linearize(grad(L), θ)`` traced once per batch and reused across products: saves the
  re-tracing of the forward pass but keeps one linearised graph *per batch* alive, so its memory
  grows with the Hessian sample size.

``benchmarks/solvers.py`` measures them against each other and against the double-backward
HVP (``torch.autograd.grad`` twice); forward-over-reverse is the fastest on the measured models
(numbers in ``benchmarks/BENCHMARKS.md``, section "Solvers") and the only one whose memory does
not depend on the sample size, hence the default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize, vjp

from gifcli.errors import GifError

CURVATURES = ("hessian", "ggn")
HVP_MODES = ("forward-over-reverse", "reverse-over-reverse", "linearize")
DEFAULT_HVP_MODE = "forward-over-reverse"

ParamDict = dict[str, Tensor]


# --------------------------------------------------------------------------- flat vectors


def trainable_parameters(model: nn.Module) -> ParamDict:
    """The parameters that define the flat vector: ``named_parameters()`` with requires_grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector of shape ``[Σ numel]``."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Mapping[str, Tensor]) -> ParamDict:
    """Split a flat vector ``[Σ numel]`` into views shaped like ``like`` (same key order)."""
    total = sum(t.numel() for t in like.values())
    if flat.ndim != 1 or flat.numel() != total:
        raise ValueError(f"flat vector has shape {tuple(flat.shape)}; expected ({total},)")
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start : start + t.numel()].view_as(t)
        start += t.numel()
    return out


def flatten_params(model: nn.Module) -> Tensor:
    """The model's trainable parameters as a detached flat vector (a copy)."""
    return flatten(p.detach() for p in trainable_parameters(model).values()).clone()


# --------------------------------------------------------------------------- reduction point


def reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` across the processes that share the Hessian sample.

    The single reduction point of every batch accumulation (HVPs, GGN products, gradients and
    sample counts). With one process it is the identity; under ``torch.distributed`` it becomes
    an all-reduce (SUM), and because sums and counts are reduced separately before the division,
    ranks may hold different numbers of samples.
    """
    return tensor


# --------------------------------------------------------------------------- the loss


class _FunctionalLoss:
    """``θ ↦ s · Σ_batch CE(f(x; θ), y)`` with buffers and frozen parameters held fixed."""

    def __init__(self, model: nn.Module, loss_scale: float) -> None:
        model.eval()
        self.model = model
        self.loss_scale = float(loss_scale)
        params = trainable_parameters(model)
        if not params:
            raise GifError("model: no parameter requires grad; nothing to differentiate")
        self.params: ParamDict = {name: p.detach() for name, p in params.items()}
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.fixed: ParamDict = {
            name: t.detach()
            for name, t in (*model.named_parameters(), *model.named_buffers())
            if name not in self.params
        }

    def logits(self, params: ParamDict, x: Tensor) -> Tensor:
        return functional_call(self.model, (params, self.fixed), (x,))

    def loss_sum(self, params: ParamDict, x: Tensor, y: Tensor) -> Tensor:
        return self.loss_scale * F.cross_entropy(self.logits(params, x), y, reduction="sum")

    def batches(self, x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches moved to the parameters' device; floating inputs cast to their dtype."""
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            dtype = self.dtype if xb.is_floating_point() else None
            yield xb.to(self.device, dtype), yb.to(self.device)

    def count(self, n: int) -> Tensor:
        return torch.tensor(float(n), dtype=self.dtype, device=self.device)


def _check_sample(x: Tensor, y: Tensor, batch_size: int, what: str) -> None:
    if len(x) != len(y):
        raise GifError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise GifError(f"{what}: the sample is empty; it needs at least one point")
    if batch_size < 1:
        raise GifError(f"influence.batch_size: must be >= 1, got {batch_size}")


def loss_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, loss_scale: float = 1.0
) -> Tensor:
    """Flat gradient ``∇θ (s/N) Σ_i CE(f(x_i; θ), y_i)`` of the mean loss, shape ``[dim]``.

    ``x``: inputs ``[N, ...]`` (cast to the parameters' dtype batch by batch), ``y``: labels
    ``[N]``. Streamed in batches of ``batch_size``; puts the model in ``eval()``.
    """
    _check_sample(x, y, batch_size, "loss gradient")
    loss = _FunctionalLoss(model, loss_scale)
    grad_fn = grad(loss.loss_sum)
    total = torch.zeros(sum(p.numel() for p in loss.params.values()), dtype=loss.dtype,
                        device=loss.device)
    for xb, yb in loss.batches(x, y, batch_size):
        total += flatten(grad_fn(loss.params, xb, yb).values())
    return reduce_sum(total) / reduce_sum(loss.count(len(x)))


# --------------------------------------------------------------------------- products


def _ggn_product(loss: _FunctionalLoss, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
    """``Σ_i J_iᵀ H_out,i J_i v`` with ``H_out = s · (diag(p) − p pᵀ)``, p = softmax(logits)."""

    def logits(params: ParamDict) -> Tensor:
        return loss.logits(params, xb)

    z, jv = jvp(logits, (loss.params,), (v,))
    p = torch.softmax(z, dim=-1)
    h_jv = loss.loss_scale * (p * jv - p * (p * jv).sum(dim=-1, keepdim=True))
    _, vjp_fn = vjp(logits, loss.params)
    return vjp_fn(h_jv)[0]


class CurvatureOperator:
    """Matrix-free ``H v`` for the retained risk over a Hessian sample.

    ``H`` is ``∇²R(θ̂)`` (``curvature="hessian"``, possibly indefinite) or the Gauss-Newton
    matrix ``(1/N) Σ_i J_iᵀ H_out,i J_i`` (``curvature="ggn"``, positive semi-definite), with
    ``J_i = ∂ logits_i / ∂θ`` and ``H_out,i`` the Hessian of the cross-entropy in the logits.

    Args (keyword-only):
        model: evaluated in ``eval()`` mode (set here) at its current parameters ``θ̂``;
            buffers and parameters without requires_grad are held fixed.
        x, y: the Hessian sample, inputs ``[N, ...]`` (float32 is fine for a float64 model: each
            batch is cast to the parameters' dtype and device) and labels ``[N]``.
        batch_size: points per streamed batch; the result does not depend on it.
        curvature: ``"hessian"`` or ``"ggn"``.
        loss_scale: multiplies the loss, hence ``H`` (the GIF solution is invariant to it).
        hvp_mode: the Hessian path, one of ``HVP_MODES`` (see the module docstring); ignored for
            ``"ggn"``, whose product is a ``jvp`` followed by a ``vjp``.

    ``matvec(v)`` takes and returns a flat vector ``[dim]`` in the parameters' dtype and
    device; ``hvp_count`` counts the products over the whole sample.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        curvature: str = "hessian",
        loss_scale: float = 1.0,
        hvp_mode: str = DEFAULT_HVP_MODE,
    ) -> None:
        if curvature not in CURVATURES:
            raise GifError(f"influence.curvature: unknown {curvature!r}; use one of {CURVATURES}")
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode: unknown {hvp_mode!r}; use one of {HVP_MODES}")
        _check_sample(x, y, batch_size, "Hessian sample")
        self._loss = _FunctionalLoss(model, loss_scale)
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.curvature, self.hvp_mode = curvature, hvp_mode
        self.dim = sum(p.numel() for p in self._loss.params.values())
        self.dtype, self.device = self._loss.dtype, self._loss.device
        self.hvp_count = 0
        self._batch_product = self._make_batch_product()

    @property
    def sample_size(self) -> int:
        return len(self.x)

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``v`` of shape ``[dim]``; returns ``[dim]``."""
        if v.shape != (self.dim,):
            raise ValueError(f"v has shape {tuple(v.shape)}; expected ({self.dim},)")
        v_dict = unflatten(v.to(self.device, self.dtype), self._loss.params)
        total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for index, (xb, yb) in enumerate(self._loss.batches(self.x, self.y, self.batch_size)):
            total += flatten(self._batch_product(index, xb, yb, v_dict).values())
        self.hvp_count += 1
        return reduce_sum(total) / reduce_sum(self._loss.count(len(self.x)))

    __call__ = matvec

    def _make_batch_product(self) -> Callable[[int, Tensor, Tensor, ParamDict], ParamDict]:
        """``(batch index, x_b, y_b, v) ↦ Σ_{i∈b} ∇²ℓ_i v`` (or the GGN), as a parameter dict."""
        loss = self._loss
        if self.curvature == "ggn":
            return lambda _, xb, yb, v: _ggn_product(loss, xb, yb, v)
        grad_fn = grad(loss.loss_sum)
        if self.hvp_mode == "forward-over-reverse":
            return lambda _, xb, yb, v: jvp(
                lambda p: grad_fn(p, xb, yb), (loss.params,), (v,)
            )[1]
        if self.hvp_mode == "reverse-over-reverse":
            return lambda _, xb, yb, v: vjp(lambda p: grad_fn(p, xb, yb), loss.params)[1](v)[0]
        cache: dict[int, Callable[[ParamDict], ParamDict]] = {}

        def linearized(index: int, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
            if index not in cache:
                cache[index] = linearize(lambda p: grad_fn(p, xb, yb), loss.params)[1]
            return cache[index](v)

        return linearized
