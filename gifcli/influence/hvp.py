"""Hessian- and Gauss-Newton-vector products of the retained risk, through ``torch.func``.

Parameters are handled as one *flat vector*: the concatenation of ``model.named_parameters()``
that require grad, in that order (``flatten_params``). Parameters that do not require grad and
all buffers are held fixed.

The retained risk over the Hessian sample ``{(x_i, y_i)}_{i=1..N}`` is

    R(θ) = (1/N) Σ_i s · CE(f(x_i; θ), y_i)            (s = ``loss_scale``)

and every product streams the sample in batches: each batch contributes the derivative of its
*summed* loss, the sums and the sample count go through ``reduce_sum`` (the one reduction
point), and the total is divided by the count. Batches of different sizes are therefore weighted
by their size, and so are ranks holding different numbers of samples: under ``torchrun`` each
rank streams only its shard of the sample and ``reduce_sum`` is an all-reduce
(``gifcli.distributed``). Memory is per process: one batch's forward and backward passes plus,
on the default path, the linearisation cache below (its budget counts per rank).

HVP path. Three compositions give ``H v`` for one batch:

- double backward (``torch.autograd.grad`` twice, the paper's HVP): the gradient's graph is
  built and differentiated per product; nothing kept between products, and no ``torch.func``
  transform, whose first use imports torch's compiler (a fixed cost of every process);
- ``linearize(grad(L), θ)``: traced once per batch at the first product, then each product
  replays only the tangent part — the forward and backward passes at ``θ̂`` are constants of
  the trace, computed once. The trace keeps those intermediates alive, so the cache has a
  memory budget (``cache_bytes``, default 1 GiB); batches beyond it use forward-over-reverse,
  and memory stops growing with the sample size there;
- forward-over-reverse ``jvp(grad(L), θ, v)``: one forward pass carrying dual numbers and one
  backward pass per product, nothing kept between products: memory flat in the sample size.

A replayed linearised product is cheaper than a double-backward one, but tracing a batch costs
some products' worth, so it pays only in long solves. ``hvp_mode_for(products)`` therefore
picks double backward below ``LINEARIZE_MIN_PRODUCTS`` products (the budgeted solves: no
trace, and no compiler import) and ``linearize`` from there; forward-over-reverse is
linearize's fallback (cache full, or an operation linearize cannot trace). The per-product
and tracing costs, and where the threshold comes from, are measured by
``benchmarks/solvers.py`` (BENCHMARKS.md, "Solvers").

Gauss-Newton (``curvature="ggn"``, class ``GaussNewton``): ``Jᵀ H_out J v`` is a ``jvp`` of
the logits and a backward pass through the batch's forward graph at ``θ̂``, which is built
once and kept within the same memory budget: one forward pass fewer per product than the
Hessian's double backward (what that saves: BENCHMARKS.md, "Cost against retraining").
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, linearize

from gifcli import distributed
from gifcli.errors import GifError, ParameterError

HVP_MODES = ("double-backward", "forward-over-reverse", "linearize")
DEFAULT_HVP_MODE = "linearize"
LINEARIZE_MIN_PRODUCTS = 40
"""Products from which tracing ``linearize`` pays for itself (module docstring)."""
LINEARIZE_CACHE_BYTES = 1 << 30
"""Default memory budget of the linearisation cache (1 GiB)."""
KEPT_PER_ACTIVATION_BYTE = 10
"""Fallback size of a linearised batch per byte of its leaf activations, on the high side of
what the exact count finds (the traced graph also keeps the backward pass's intermediates)."""

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
    sample counts). With one process it is the identity; under ``torchrun`` it is an all-reduce
    (SUM, ``gifcli.distributed.all_reduce_sum``), and because sums and counts are reduced
    separately before the division, ranks may hold different numbers of samples. Every rank
    must reach it the same number of times, in the same order.
    """
    return distributed.all_reduce_sum(tensor)


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


def _or_zeros(params: ParamDict, grads: Iterable[Tensor | None]) -> ParamDict:
    """``grads`` by parameter name, zeros for a parameter autograd did not reach (``None``)."""
    return {
        name: torch.zeros_like(p) if g is None else g
        for (name, p), g in zip(params.items(), grads, strict=True)
    }


def _batch_gradient(
    loss: _FunctionalLoss, xb: Tensor, yb: Tensor, *, create_graph: bool = False
) -> tuple[tuple[Tensor, ...], ParamDict]:
    """``∇θ`` of the batch's summed loss by reverse-mode autograd, one tensor per parameter
    (a parameter the loss does not reach gets zeros), and the leaf parameters it was taken
    at (to differentiate again, with ``create_graph``)."""
    params = {name: p.detach().requires_grad_() for name, p in loss.params.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(
            loss.loss_sum(params, xb, yb),
            list(params.values()),
            create_graph=create_graph,
            allow_unused=True,
        )
    return tuple(_or_zeros(params, grads).values()), params


def _check_sample(x: Tensor, y: Tensor, batch_size: int, what: str) -> None:
    if len(x) != len(y):
        raise GifError(f"{what}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise GifError(f"{what}: the sample is empty; it needs at least one point")
    if batch_size < 1:
        raise ParameterError("batch_size", f"must be >= 1, got {batch_size}")


def loss_gradient(
    model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int, loss_scale: float = 1.0
) -> Tensor:
    """Flat gradient ``∇θ (s/N) Σ_i CE(f(x_i; θ), y_i)`` of the mean loss, shape ``[dim]``.

    ``x``: inputs ``[N, ...]`` (cast to the parameters' dtype batch by batch), ``y``: labels
    ``[N]``. Streamed in batches of ``batch_size``; puts the model in ``eval()``.
    """
    _check_sample(x, y, batch_size, "loss gradient")
    loss = _FunctionalLoss(model, loss_scale)
    total = torch.zeros(
        sum(p.numel() for p in loss.params.values()), dtype=loss.dtype, device=loss.device
    )
    for xb, yb in loss.batches(x, y, batch_size):
        total += flatten(_batch_gradient(loss, xb, yb)[0])
    return reduce_sum(total) / reduce_sum(loss.count(len(x)))


# --------------------------------------------------------------------------- products


class _GaussNewtonBatch:
    """One batch's Gauss-Newton product ``Jᵀ H_out J v``, ``H_out = s · (diag(p) − p pᵀ)``
    with ``p = softmax(logits)``, through the batch's forward graph at ``θ̂``, built once:
    each product is a ``jvp`` (``J v``) and a backward pass through the kept graph (``Jᵀ u``),
    one forward pass fewer than building the graph per product.

    The labels do not enter: the cross-entropy's Hessian in the logits does not depend on them.
    ``kept_bytes``: the tensors the graph saves for the backward pass (counted as they are
    saved, the parameters themselves left out), the memory a cached batch holds.
    """

    def __init__(self, loss: _FunctionalLoss, xb: Tensor) -> None:
        self.loss, self.xb = loss, xb
        self.params = {name: p.detach().requires_grad_() for name, p in loss.params.items()}
        shared = {p.untyped_storage().data_ptr() for p in loss.params.values()}
        storages: dict[int, int] = {}

        def pack(t: Tensor) -> Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in shared:  # the parameters are held once, not per batch
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            self.z = loss.logits(self.params, xb)
        self.p = torch.softmax(self.z.detach(), dim=-1)
        self.kept_bytes = sum(storages.values())

    def product(self, v: ParamDict) -> ParamDict:
        jv = jvp(lambda params: self.loss.logits(params, self.xb), (self.loss.params,), (v,))[1]
        p = self.p
        h_jv = self.loss.loss_scale * (p * jv - p * (p * jv).sum(dim=-1, keepdim=True))
        with torch.enable_grad():
            products = torch.autograd.grad(
                self.z, list(self.params.values()), h_jv, retain_graph=True, allow_unused=True
            )
        return _or_zeros(self.params, products)


@functools.cache
def _load_forward_ad() -> None:
    """Run one tiny ``jvp`` so torch loads its forward-AD decompositions now, with the
    deprecation warning that loading emits (about torch internals) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        jvp(torch.sin, (torch.zeros(1),), (torch.ones(1),))


def _double_backward(loss: _FunctionalLoss, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
    grads, params = _batch_gradient(loss, xb, yb, create_graph=True)
    reached = [(g, v[name]) for name, g in zip(params, grads, strict=True) if g.requires_grad]
    if not reached:  # the loss is linear in every parameter: no curvature
        return {name: torch.zeros_like(p) for name, p in params.items()}
    with torch.enable_grad():
        products = torch.autograd.grad(
            [g for g, _ in reached],
            list(params.values()),
            grad_outputs=[direction for _, direction in reached],
            allow_unused=True,
        )
    return _or_zeros(params, products)


def hvp_mode_for(products: int) -> str:
    """The fastest HVP path for a solve of about ``products`` products (module docstring)."""
    return "linearize" if products >= LINEARIZE_MIN_PRODUCTS else "double-backward"


def _forward_over_reverse(
    grad_fn: Callable, params: ParamDict, xb: Tensor, yb: Tensor, v: ParamDict
) -> ParamDict:
    return jvp(lambda p: grad_fn(p, xb, yb), (params,), (v,))[1]


def _kept_bytes(tangent_fn: Callable, loss: _FunctionalLoss, xb: Tensor) -> int:
    """Bytes of the tensors a linearised batch keeps alive.

    Counted exactly from the traced graph module(s) that ``torch.func.linearize``'s function
    closes over (its constants: the intermediate values of the forward and backward passes,
    folded at the first call). Should a torch version hide them elsewhere, falls back to
    ``KEPT_PER_ACTIVATION_BYTE ×`` the batch's leaf-module activation bytes.
    """
    cells = getattr(tangent_fn, "__closure__", None) or ()
    modules = [c.cell_contents for c in cells if isinstance(_cell_value(c), nn.Module)]
    storages: dict[int, int] = {}
    for module in modules:
        for sub in module.modules():
            tensors = [t for _, t in sub.named_parameters(recurse=False)]
            tensors += [t for _, t in sub.named_buffers(recurse=False)]
            tensors += [t for t in vars(sub).values() if isinstance(t, Tensor)]
            for t in tensors:
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    if storages:
        return sum(storages.values())
    return KEPT_PER_ACTIVATION_BYTE * _activation_bytes(loss, xb)


def _cell_value(cell: object) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _activation_bytes(loss: _FunctionalLoss, xb: Tensor) -> int:
    """Bytes of all leaf-module outputs for the batch ``xb``."""
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in loss.model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            loss.logits(loss.params, xb)
    finally:
        for handle in handles:
            handle.remove()
    return total


class Curvature:
    """One curvature's products over a batch of the loss at ``θ̂``, with the cache of batches
    they keep within a memory budget, and the facts the budget and the estimators ask of it.
    ``CURVATURES_BY_NAME`` holds one class per ``influence.curvature``; ``curvature_kind(name)``
    looks one up."""

    name: ClassVar[str]
    passes: ClassVar[float]
    """Sample passes of one product over one sample, for the budget (``cost.HVP_PASSES``):
    rounded from what the reports' ``cost.hvp_passes`` measure (BENCHMARKS.md, "The budget's
    prediction against the count"); constants, so that one config always plans one solve."""
    label_free: ClassVar[bool] = False
    """Its products do not depend on the labels (a relabelling's curvature difference is 0)."""
    takes_hvp_mode: ClassVar[bool] = False
    """Its products are made by the HVP path ``hvp_mode`` (module docstring)."""

    def __init__(self, loss: _FunctionalLoss, *, hvp_mode: str, cache_bytes: int) -> None:
        self.loss, self.hvp_mode, self.cache_bytes = loss, hvp_mode, int(cache_bytes)
        self.cached: dict[int, object] = {}
        self.cached_bytes = 0
        self.cache_full = False

    def product(self, index: int, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
        """``Σ_{i∈batch} C_i v`` of batch ``index`` as a parameter dict."""
        raise NotImplementedError

    def _admit(self, index: int, kept: object, nbytes: int) -> None:
        """Cache ``kept`` for batch ``index`` while the budget has room; once a batch does not
        fit, later ones are not tried (they are as large; the last may be smaller)."""
        if not self.cache_full and self.cached_bytes + nbytes <= self.cache_bytes:
            self.cached[index] = kept
            self.cached_bytes += nbytes
        else:
            self.cache_full = True


class Hessian(Curvature):
    """``∇²R(θ̂)``, possibly indefinite, by double backward, ``linearize`` (cached per batch)
    or forward-over-reverse (``hvp_mode``; module docstring). A product re-runs the forward
    and backward passes of a batch and differentiates them again: 3 sample passes."""

    name = "hessian"
    passes = 3.0
    takes_hvp_mode = True

    def __init__(self, loss: _FunctionalLoss, *, hvp_mode: str, cache_bytes: int) -> None:
        super().__init__(loss, hvp_mode=hvp_mode, cache_bytes=cache_bytes)
        self._grad_fn = functools.cache(lambda: grad(loss.loss_sum))
        self._linearize_failed = False  # an operation linearize cannot trace: stop trying

    def product(self, index: int, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
        if self.hvp_mode == "double-backward":
            return _double_backward(self.loss, xb, yb, v)
        if self.hvp_mode == "linearize":
            product = self._linearized_product(index, xb, yb, v)
            if product is not None:
                return product
        return _forward_over_reverse(self._grad_fn(), self.loss.params, xb, yb, v)

    def _linearized_product(
        self, index: int, xb: Tensor, yb: Tensor, v: ParamDict
    ) -> ParamDict | None:
        """The product through this batch's linearisation, traced now while the cache has
        room; ``None`` when the batch is not cached (the caller then uses forward-over-reverse).
        """
        if index in self.cached:
            return self.cached[index](v)
        if self.cache_full or self._linearize_failed:
            return None
        try:
            with warnings.catch_warnings():
                # linearize's tracing and constant folding (run at the first call) warn about
                # internals they handle themselves.
                warnings.simplefilter("ignore")
                _, tangent_fn = linearize(lambda p: self._grad_fn()(p, xb, yb), self.loss.params)
                product = tangent_fn(v)
        except Exception:  # an op without a traceable forward-mode rule
            self._linearize_failed = True
            return None
        self._admit(index, tangent_fn, _kept_bytes(tangent_fn, self.loss, xb))
        return product


class GaussNewton(Curvature):
    """The Gauss-Newton matrix ``(1/N) Σ_i J_iᵀ H_out,i J_i``, positive semi-definite: a
    ``jvp`` and a backward pass through each batch's forward graph at ``θ̂``, kept within the
    cache budget (``_GaussNewtonBatch``): one forward pass fewer than the Hessian's, 2 sample
    passes. The labels do not enter."""

    name = "ggn"
    passes = 2.0
    label_free = True

    def product(self, index: int, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
        batch = self.cached.get(index)
        if batch is None:  # built now; cached while the budget has room
            batch = _GaussNewtonBatch(self.loss, xb)
            self._admit(index, batch, batch.kept_bytes)
        return batch.product(v)


CURVATURES_BY_NAME: dict[str, type[Curvature]] = {c.name: c for c in (Hessian, GaussNewton)}


def curvature_kind(name: str) -> type[Curvature]:
    """The ``Curvature`` class named ``name`` (``influence.curvature``)."""
    try:
        return CURVATURES_BY_NAME[name]
    except (KeyError, TypeError):
        raise ParameterError(
            "curvature", f"unknown {name!r}; use one of {tuple(CURVATURES_BY_NAME)}"
        ) from None


class CurvatureOperator:
    """Matrix-free ``H v`` for the retained risk over a Hessian sample.

    ``H`` is ``∇²R(θ̂)`` (``curvature="hessian"``, possibly indefinite) or the Gauss-Newton
    matrix ``(1/N) Σ_i J_iᵀ H_out,i J_i`` (``curvature="ggn"``, positive semi-definite), with
    ``J_i = ∂ logits_i / ∂θ`` and ``H_out,i = s · (diag(p_i) − p_i p_iᵀ)`` the Hessian of the
    cross-entropy in the logits.

    Args (keyword-only):
        model: evaluated in ``eval()`` mode (set here) at the parameters it has now, ``θ̂``
            (copied: later changes to the model do not reach the operator); buffers and
            parameters without requires_grad are held fixed.
        x, y: the Hessian sample, inputs ``[N, ...]`` (float32 is fine for a float64 model: each
            batch is cast to the parameters' dtype and moved to their device) and labels ``[N]``.
        batch_size: points per streamed batch; the product does not depend on it.
        curvature: ``"hessian"`` or ``"ggn"``.
        loss_scale: multiplies the loss, hence ``H`` (the undamped GIF solution is invariant
            to it when the removal gradient is scaled alike).
        hvp_mode: the Hessian path, one of ``HVP_MODES`` (module docstring); ignored for
            ``"ggn"``, whose product is a ``jvp`` and a backward pass through the kept graph.
        cache_bytes: memory budget of the cache: the tensors each linearised batch keeps
            (``"linearize"``, counted after tracing; batches beyond it use
            forward-over-reverse) or each batch's forward graph keeps for the Gauss-Newton
            product (``"ggn"``, counted as they are saved; batches beyond it rebuild theirs per
            product). Memory stops growing with the sample size once it is reached.

    ``matvec(v)`` maps a flat ``[dim]`` vector to ``H v`` ``[dim]`` in the parameters' dtype and
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
        cache_bytes: int = LINEARIZE_CACHE_BYTES,
    ) -> None:
        kind = curvature_kind(curvature)
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode: unknown {hvp_mode!r}; use one of {HVP_MODES}")
        _check_sample(x, y, batch_size, "Hessian sample")
        if not kind.takes_hvp_mode or hvp_mode != "double-backward":
            _load_forward_ad()
        self._loss = _FunctionalLoss(model, loss_scale)
        self._loss.params = {name: p.clone() for name, p in self._loss.params.items()}
        self._products = kind(self._loss, hvp_mode=hvp_mode, cache_bytes=cache_bytes)
        self.x, self.y, self.batch_size = x, y, int(batch_size)
        self.curvature, self.hvp_mode = curvature, hvp_mode
        self.dim = sum(p.numel() for p in self._loss.params.values())
        self.dtype, self.device = self._loss.dtype, self._loss.device
        self.hvp_count = 0

    @property
    def sample_size(self) -> int:
        return len(self.x)

    @property
    def cached_batches(self) -> int:
        """Batches whose linearisation (Hessian, ``"linearize"`` mode) or Gauss-Newton graph
        is cached."""
        return len(self._products.cached)

    @property
    def cached_bytes(self) -> int:
        """Bytes kept by the cached linearisations or Gauss-Newton graphs."""
        return self._products.cached_bytes

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

    def _batch_product(self, index: int, xb: Tensor, yb: Tensor, v: ParamDict) -> ParamDict:
        """``Σ_{i∈batch} ∇²ℓ_i v`` (or its Gauss-Newton part) as a parameter dict."""
        return self._products.product(index, xb, yb, v)
