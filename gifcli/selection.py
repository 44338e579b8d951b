"""Target-parameter selection: which parameters GIF may change, as boolean masks.

See docs/design.md, "Selection".

A *target mask* maps every trainable parameter name (state-dict names, `model.named_parameters()`
order) to a boolean tensor of the parameter's shape; `True` marks a target parameter.

Per target layer the budget is exactly `⌊ratio · #params⌋`, `#params` the layer's own trainable
parameters (weight + bias). For `Linear` / `Conv2d` layers the unit methods rank the layer's
output units (neurons / channels) by a statistic over the removal set and take whole *rows*
(the unit's incoming weights and its bias) of the best-ranked units; the remainder of the budget
is drawn uniformly at random inside the next unit's row.

- `top-outputs`:   |mean of the unit's output| over the removal set (for a convolution: over
                   samples and spatial positions).
- `top-gradients`: |mean gradient of the removal loss w.r.t. the unit's output|, the removal
                   loss being the cross-entropy of the removal set with its given labels (for a
                   `Linear` layer this ranks units by |∂L_U/∂bias|).
- `lowest-outputs`, `lowest-gradients`: the lowest-ranked units instead (ablations).
- `random`:        the budget drawn uniformly over the layer's parameters.

Layers other than `Linear` / `Conv2d` (e.g. BatchNorm) are targets only when named by
`include`; their rows do not map to the ranked output units, so their budget is always drawn
uniformly at random, as in `random`.

Determinism: units are ranked with a stable sort (ties go to the lower unit index), and every
layer draws its random numbers from its own generator seeded by `(seed, layer name)`, so adding
or excluding one layer does not change the draws of the others. `save_mask` writes the
safetensors file itself with sorted tensors and sorted metadata, so identical inputs and seed
give a byte-identical file.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from fractions import Fraction
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from gifcli.checkpoint import save_checkpoint
from gifcli.config import SCOPES, SELECTION_METHODS
from gifcli.errors import GifError, ParameterError
from gifcli.influence.hvp import trainable_parameters

UNIT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
MASK_FORMAT = "gif-target-mask"
MASK_FORMAT_VERSION = "1"

_RERUN_HINT = "re-run `gif select-params` with the same model config"


@dataclass(frozen=True)
class Layer:
    """A module that owns trainable parameters directly (not through its children).

    `parameters` holds `(state-dict name, parameter)` pairs in registration order; a parameter
    shared by several modules belongs to the first one only.
    """

    name: str
    module: nn.Module
    parameters: tuple[tuple[str, nn.Parameter], ...]

    @property
    def numel(self) -> int:
        """Number of trainable parameters of the layer (weight + bias)."""
        return sum(p.numel() for _, p in self.parameters)

    @property
    def unit_count(self) -> int | None:
        """Output units of a `Linear` / `Conv2d` layer whose parameters are all per-unit rows.

        None for other layer types, whose budget is drawn at random.
        """
        if isinstance(self.module, nn.Linear):
            units = self.module.out_features
        elif isinstance(self.module, nn.Conv2d):
            units = self.module.out_channels
        else:
            return None
        rowwise = all(p.dim() >= 1 and p.shape[0] == units for _, p in self.parameters)
        return units if rowwise else None


@dataclass
class Selection:
    """The result of a selection.

    mask:  parameter name -> BoolTensor of the parameter's shape (CPU), every trainable parameter.
    units: layer name -> whole output units chosen, best-ranked first (unit methods only).
    """

    mask: dict[str, Tensor]
    units: dict[str, list[int]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Layers and name patterns


def model_layers(model: nn.Module) -> list[Layer]:
    """Every module that directly owns trainable parameters, in `named_modules()` order."""
    canonical = {id(p): name for name, p in trainable_parameters(model).items()}
    claimed: set[int] = set()
    layers = []
    for module_name, module in model.named_modules():
        owned = []
        for _, p in module.named_parameters(recurse=False):
            if id(p) in canonical and id(p) not in claimed:
                claimed.add(id(p))
                owned.append((canonical[id(p)], p))
        if owned:
            layers.append(Layer(module_name, module, tuple(owned)))
    return layers


def _matches(layer: Layer, pattern: str) -> bool:
    """True if the glob matches the layer's module name or one of its parameter names."""
    names = (layer.name, *(name for name, _ in layer.parameters))
    return any(fnmatchcase(name, pattern) for name in names)


def _patterns(key: str, patterns: Iterable[str] | str | None) -> list[str]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise GifError(f"{key}: must be a list of glob patterns (strings), got {patterns!r}")
    return patterns


def _layer_list(layers: list[Layer], limit: int = 12) -> str:
    names = [layer.name or "(root)" for layer in layers]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def target_layers(
    model: nn.Module,
    *,
    include: Iterable[str] | str | None = None,
    exclude: Iterable[str] | str | None = None,
) -> list[Layer]:
    """The layers whose parameters may be targets.

    Without `include` (None or empty): every `Linear` and `Conv2d` layer. With `include`: exactly
    the layers (of any type) matching one of its patterns. Then layers matching an `exclude`
    pattern are dropped. Patterns are `fnmatch` globs (case-sensitive, `*` crosses dots) matched
    against the module name (`features.0`) and the layer's parameter names (`features.0.weight`).
    A pattern that matches no layer of the model is an error (most likely a typo).
    """
    layers = model_layers(model)
    include_patterns = _patterns("selection.include", include)
    exclude_patterns = _patterns("selection.exclude", exclude)
    checks = [("selection.include", p) for p in include_patterns]
    checks += [("selection.exclude", p) for p in exclude_patterns]
    for key, pattern in checks:
        if not any(_matches(layer, pattern) for layer in layers):
            raise GifError(
                f"{key}: pattern {pattern!r} matches no layer with trainable parameters; "
                f"layers are: {_layer_list(layers)}"
            )
    if not include_patterns:
        chosen = [layer for layer in layers if isinstance(layer.module, UNIT_LAYER_TYPES)]
    else:
        chosen = [layer for layer in layers if any(_matches(layer, p) for p in include_patterns)]
    chosen = [layer for layer in chosen if not any(_matches(layer, p) for p in exclude_patterns)]
    if not chosen:
        raise GifError(
            "selection: no target layer is left after selection.include / selection.exclude "
            "(without include, the targets are the Linear and Conv2d layers); "
            f"layers are: {_layer_list(layers)}"
        )
    return chosen


def scope_mask(model: nn.Module, scope: str) -> dict[str, Tensor]:
    """The mask (every trainable parameter, CPU) of the parameters ``if``, ``pif`` and ``sif``
    treat as variables (``influence.scope``).

    ``all``: every trainable parameter. ``linear-conv``: every parameter of every `Linear` /
    `Conv2d` module, as the paper's IF; BatchNorm and every other parameter are held fixed.
    """
    if scope not in SCOPES:
        raise GifError(f"influence.scope: must be one of {', '.join(SCOPES)}, got {scope!r}")
    mask = {
        name: torch.full(p.shape, scope == "all", dtype=torch.bool)
        for name, p in trainable_parameters(model).items()
    }
    if scope == "linear-conv":
        for layer in model_layers(model):
            if isinstance(layer.module, UNIT_LAYER_TYPES):
                for name, p in layer.parameters:
                    mask[name] = torch.ones(p.shape, dtype=torch.bool)
        if not any(m.any() for m in mask.values()):
            raise GifError(
                "influence.scope: linear-conv, but the model has no trainable nn.Linear or "
                f"nn.Conv2d parameter (layers: {_layer_list(model_layers(model))}); set "
                "influence.scope: all"
            )
    return mask


# --------------------------------------------------------------------------------------------
# Validation


def _check_method(method: str) -> None:
    if method not in SELECTION_METHODS:
        raise ParameterError(
            "method", f"must be one of {', '.join(SELECTION_METHODS)}, got {method!r}"
        )


def _check_ratio(ratio: float) -> Fraction:
    """The ratio as the exact decimal it was written as (0.29 -> 29/100, not 0.28999…)."""
    valid = isinstance(ratio, int | float) and not isinstance(ratio, bool)
    if not valid or not math.isfinite(ratio) or not 0 < ratio <= 1:
        raise ParameterError(
            "ratio",
            f"must be a number in (0, 1], got {ratio!r} "
            "(the fraction of each target layer's parameters to select, e.g. 0.05)",
        )
    return Fraction(repr(float(ratio)))


def layer_budget(numel: int, ratio: float) -> int:
    """Exactly `⌊ratio · numel⌋`, computed on the ratio's decimal value (no rounding error)."""
    return math.floor(_check_ratio(ratio) * numel)


# --------------------------------------------------------------------------------------------
# Statistics over the removal set


def _unit_dim(module: nn.Module, output: Tensor) -> int:
    """Dimension of `output` that indexes the layer's output units."""
    if isinstance(module, nn.Conv2d):
        return output.dim() - 3  # [N, C, H, W] or unbatched [C, H, W]
    return output.dim() - 1  # Linear: [..., out_features]


class _UnitSums:
    """Per-unit float64 sums of a layer statistic and the number of values summed, filled by
    forward hooks (``outputs``) or by tensor hooks on the outputs' gradients (``gradients``)."""

    def __init__(self, layers: list[Layer], statistic: str, device: torch.device | str) -> None:
        self.statistic = statistic
        self.sums = {
            layer.name: torch.zeros(layer.unit_count or 0, dtype=torch.float64, device=device)
            for layer in layers
        }
        self.counts = dict.fromkeys(self.sums, 0)

    def hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        """A forward hook adding layer ``name``'s outputs (or, later, their gradients)."""

        def forward_hook(module: nn.Module, _inputs: object, output: object) -> None:
            if not isinstance(output, Tensor):
                return
            dim = _unit_dim(module, output)
            other_dims = [d for d in range(output.dim()) if d != dim]
            self.counts[name] += output.numel() // output.shape[dim]
            if self.statistic == "outputs":
                self.sums[name] += output.detach().sum(other_dims, dtype=torch.float64)
            elif output.requires_grad:
                # A tensor hook sees the gradient w.r.t. this value even if a later in-place
                # op (ReLU(inplace=True)) overwrites the tensor.
                output.register_hook(lambda grad: self._add(name, grad, other_dims))

        return forward_hook

    def _add(self, name: str, grad: Tensor, other_dims: list[int]) -> None:
        self.sums[name] += grad.detach().sum(other_dims, dtype=torch.float64)

    def means(self, reduce: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """Sums and counts packed into one tensor, reduced once (across ranks), divided."""
        names = list(self.sums)
        device = next(iter(self.sums.values())).device
        count_tensor = torch.tensor(
            [self.counts[n] for n in names], dtype=torch.float64, device=device
        )
        packed = reduce(torch.cat([*self.sums.values(), count_tensor])).cpu()
        total_units = sum(s.numel() for s in self.sums.values())
        unit_sums = packed[:total_units].split([s.numel() for s in self.sums.values()])
        means = {}
        counts = packed[total_units:].tolist()
        for name, unit_sum, count in zip(names, unit_sums, counts, strict=True):
            if count == 0:
                raise GifError(
                    f"selection: layer {name!r} never ran as a module in the forward pass, so "
                    f"its units cannot be ranked by {self.statistic}; exclude it with "
                    "selection.exclude"
                )
            mean = unit_sum / count
            if not torch.isfinite(mean).all():
                raise GifError(
                    f"selection: the mean {self.statistic} of layer {name!r} over the removal "
                    "set are not finite (NaN or Inf); check the checkpoint and the data "
                    "normalisation"
                )
            means[name] = mean
        return means


def unit_statistics(
    model: nn.Module,
    layers: list[Layer],
    removal_x: Tensor,
    removal_y: Tensor,
    *,
    statistic: str,
    batch_size: int,
    device: torch.device | str,
    reduce: Callable[[Tensor], Tensor],
) -> dict[str, Tensor]:
    """Per-unit mean output or mean output gradient of each layer over the removal set.

    removal_x: [M, ...] inputs, removal_y: [M] int labels; `statistic` is "outputs" or
    "gradients". The model runs in eval() (restored afterwards) on `device`, in batches of
    `batch_size`. The gradient is that of the summed cross-entropy, i.e. per-sample gradients,
    so its mean over samples is the gradient of the mean removal loss. Sums and counts are
    accumulated in float64, packed into one tensor and passed once through `reduce` (the hook
    for an all-reduce across ranks) before dividing.

    Returns layer name -> [units] float64 means (CPU).
    """
    sums = _UnitSums(layers, statistic, device)
    modes = {module: module.training for module in model.modules()}
    handles = [layer.module.register_forward_hook(sums.hook(layer.name)) for layer in layers]
    params = [p for layer in layers for _, p in layer.parameters]
    try:
        model.eval()
        with torch.set_grad_enabled(statistic == "gradients"):
            for start in range(0, len(removal_x), batch_size):
                x = removal_x[start : start + batch_size].to(device)
                y = removal_y[start : start + batch_size].to(device=device, dtype=torch.long)
                _removal_pass(model, x, y, params, gradients=statistic == "gradients")
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.train(training)
    return sums.means(reduce)


def _removal_pass(
    model: nn.Module, x: Tensor, y: Tensor, params: list[Tensor], *, gradients: bool
) -> None:
    """One forward pass (and, for ``gradients``, one backward pass) of a removal batch."""
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2:
        raise GifError(
            "model: selection needs a model that returns logits shaped "
            f"[batch, classes], got {type(logits).__name__}"
        )
    if gradients:
        loss = F.cross_entropy(logits, y, reduction="sum")
        if loss.requires_grad:
            # Gradients w.r.t. the layers' parameters drive the backward pass through every
            # layer output (firing the tensor hooks) without touching `.grad`.
            torch.autograd.grad(loss, params, allow_unused=True)


# --------------------------------------------------------------------------------------------
# Building the mask of one layer


def _layer_generator(seed: int, layer_name: str) -> torch.Generator:
    """A CPU generator for one layer, seeded by (seed, layer name) through SHA-256."""
    digest = hashlib.sha256(f"{seed}/{layer_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _split_to_parameters(layer: Layer, flat: Tensor) -> dict[str, Tensor]:
    """Split a layer-flat BoolTensor [numel] into masks of the layer's parameter shapes."""
    parts = flat.split([p.numel() for _, p in layer.parameters])
    return {
        name: part.reshape(p.shape).clone()
        for (name, p), part in zip(layer.parameters, parts, strict=True)
    }


def random_layer_mask(layer: Layer, budget: int, generator: torch.Generator) -> dict[str, Tensor]:
    """`budget` parameters drawn uniformly (without replacement) over the whole layer."""
    flat = torch.zeros(layer.numel, dtype=torch.bool)
    flat[torch.randperm(layer.numel, generator=generator)[:budget]] = True
    return _split_to_parameters(layer, flat)


def unit_rows_mask(
    layer: Layer, ranking: Tensor, budget: int, generator: torch.Generator
) -> tuple[dict[str, Tensor], list[int]]:
    """Whole rows of the first units of `ranking`, the remainder at random in the next row.

    ranking: [units] unit indices, best first. A unit's row is its slice of every parameter
    of the layer (weight [units, ...] then bias [units]), `numel / units` entries.
    Returns the per-parameter masks and the whole units chosen (in ranking order).
    """
    units = len(ranking)
    row_widths = [p[0].numel() for _, p in layer.parameters]
    whole, remainder = divmod(budget, sum(row_widths))
    rows = torch.zeros(units, sum(row_widths), dtype=torch.bool)
    rows[ranking[:whole]] = True
    if remainder:
        columns = torch.randperm(sum(row_widths), generator=generator)[:remainder]
        rows[ranking[whole], columns] = True
    masks = {
        name: part.reshape(p.shape).clone()
        for (name, p), part in zip(layer.parameters, rows.split(row_widths, dim=1), strict=True)
    }
    return masks, ranking[:whole].tolist()


# --------------------------------------------------------------------------------------------
# Public entry points


def _identity(t: Tensor) -> Tensor:
    return t


def select_targets(
    model: nn.Module,
    removal_x: Tensor,
    removal_y: Tensor,
    *,
    method: str,
    ratio: float,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Selection:
    """Select the target parameters of `model` for unlearning the removal set.

    model:     the trained classifier, already on `device`; it is not modified (its train/eval
               modes are restored, hooks removed, `.grad` untouched).
    removal_x: [M, ...] removal inputs; removal_y: [M] labels (the removal set's given labels,
               e.g. the poisoned ones for backdoor recovery). Unused by `random`.
    method:    one of SELECTION_METHODS; ratio: in (0, 1], per-layer budget ⌊ratio · #params⌋.
    include, exclude: glob patterns on layer / parameter names (see `target_layers`).
    seed:      seeds the random draws (remainders, `random`, non-unit layers).
    reduce:    applied once to the packed float64 statistic sums and counts before dividing
               (identity by default; an all-reduce under torch.distributed).

    Returns a Selection whose mask has one BoolTensor per trainable parameter (CPU, all-False
    for non-targets) and the whole units chosen per ranked layer.
    """
    _check_method(method)
    _check_ratio(ratio)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GifError(f"selection: batch_size must be a positive integer, got {batch_size!r}")
    layers = target_layers(model, include=include, exclude=exclude)
    ranked = [layer for layer in layers if method != "random" and layer.unit_count]
    means: dict[str, Tensor] = {}
    if ranked:
        _check_removal_set(removal_x, removal_y, method)
        means = unit_statistics(
            model,
            ranked,
            removal_x,
            removal_y,
            statistic=method.split("-")[1],
            batch_size=batch_size,
            device=device,
            reduce=reduce or _identity,
        )
    mask = {
        name: torch.zeros(p.shape, dtype=torch.bool)
        for name, p in trainable_parameters(model).items()
    }
    units: dict[str, list[int]] = {}
    for layer in layers:
        budget = layer_budget(layer.numel, ratio)
        generator = _layer_generator(seed, layer.name)
        if layer.name in means:
            descending = method.startswith("top-")
            ranking = torch.sort(means[layer.name].abs(), descending=descending, stable=True)
            layer_mask, units[layer.name] = unit_rows_mask(
                layer, ranking.indices, budget, generator
            )
        else:
            layer_mask = random_layer_mask(layer, budget, generator)
        mask.update(layer_mask)
    if not any(m.any() for m in mask.values()):
        raise ParameterError(
            "ratio",
            f"{ratio!r} selects no parameter (⌊ratio · #params⌋ is 0 in every target layer); "
            "increase it",
        )
    return Selection(mask=mask, units=units)


def _check_removal_set(removal_x: Tensor, removal_y: Tensor, method: str) -> None:
    """A removal set ``method`` can rank units by: as many labels as inputs, not empty."""
    if len(removal_x) != len(removal_y):
        raise GifError(
            f"selection: the removal set has {len(removal_x)} inputs but {len(removal_y)} labels"
        )
    if len(removal_x) == 0:
        raise GifError(
            f"selection: the removal set is empty, so {method} has nothing to rank units "
            "by; check removal.classes or the poisoned samples"
        )


# --------------------------------------------------------------------------------------------
# Masks: checks, flat vectors, summaries


def _shape(t: Tensor | nn.Parameter) -> list[int]:
    return list(t.shape)


def check_mask(
    model: nn.Module, mask: dict[str, Tensor], *, source: str = "mask", complete: bool = True
) -> None:
    """Raise GifError naming the first tensor of `mask` that does not fit `model`.

    Checked in the model's parameter order (missing when `complete`, wrong shape, not bool),
    then unexpected names in sorted order.
    """
    expected = trainable_parameters(model)

    def misfit(what: str) -> GifError:
        return GifError(f"{source}: does not fit the model: {what}; {_RERUN_HINT}")

    for name, p in expected.items():
        if name not in mask:
            if complete:
                raise misfit(f"tensor {name!r} is missing")
            continue
        if _shape(mask[name]) != _shape(p):
            raise misfit(
                f"tensor {name!r} has shape {_shape(mask[name])}, the parameter has {_shape(p)}"
            )
        if mask[name].dtype != torch.bool:
            raise misfit(f"tensor {name!r} has dtype {mask[name].dtype}, expected torch.bool")
    for name in sorted(mask):
        if name not in expected:
            raise misfit(f"tensor {name!r} is not a trainable parameter of the model")


def mask_to_flat(model: nn.Module, mask: dict[str, Tensor]) -> Tensor:
    """BoolTensor [P] over the trainable parameters in `named_parameters()` order (CPU).

    Parameters absent from `mask` are fixed (False).
    """
    check_mask(model, mask, complete=False)
    parts = [
        mask[name].reshape(-1).cpu() if name in mask else torch.zeros(p.numel(), dtype=torch.bool)
        for name, p in trainable_parameters(model).items()
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def _whole_rows(layer: Layer, mask: dict[str, Tensor]) -> int | None:
    """Number of units whose whole row is selected, or None for layers without unit rows."""
    units = layer.unit_count
    if units is None:
        return None
    full = torch.ones(units, dtype=torch.bool)
    for name, p in layer.parameters:
        rows = mask.get(name, torch.zeros(p.shape, dtype=torch.bool)).reshape(units, -1)
        full &= rows.all(dim=1).cpu()
    return int(full.sum())


def summarize_mask(
    model: nn.Module, mask: dict[str, Tensor], units: dict[str, list[int]] | None = None
) -> list[dict[str, object]]:
    """One row per layer with trainable parameters, in model order.

    Keys: layer (module name), type (class name), parameters, selected, fraction (selected /
    parameters), units (whole output units selected: from `units` where given, else counted
    from the mask for Linear/Conv2d layers; None for other layers).
    """
    rows = []
    for layer in model_layers(model):
        selected = sum(int(mask[name].sum()) for name, _ in layer.parameters if name in mask)
        if units is not None and layer.name in units:
            whole: int | None = len(units[layer.name])
        else:
            whole = _whole_rows(layer, mask)
        rows.append(
            {
                "layer": layer.name,
                "type": type(layer.module).__name__,
                "parameters": layer.numel,
                "selected": selected,
                "fraction": selected / layer.numel,
                "units": whole,
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Files


def save_mask(
    path: str | os.PathLike[str],
    mask: dict[str, Tensor],
    *,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save a target mask as safetensors (bool tensors, sorted names), atomically.

    metadata: extra string key/values (e.g. the resolved config); `format` and
    `format_version` are always set. The same mask and metadata give a byte-identical file.
    """
    path = Path(path)
    for name, tensor in mask.items():
        if tensor.dtype != torch.bool:
            raise ValueError(f"mask tensor {name!r} must be torch.bool, got {tensor.dtype}")
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise ValueError("mask metadata keys and values must be strings")
    fixed = {"format": MASK_FORMAT, "format_version": MASK_FORMAT_VERSION}
    save_checkpoint(path, mask, {**extra, **fixed})


def load_mask(path: str | os.PathLike[str], model: nn.Module) -> dict[str, Tensor]:
    """Load a mask saved by `save_mask` and check that it fits `model`.

    Returns parameter name -> BoolTensor (CPU) in the model's parameter order. Raises GifError
    naming the path if the file cannot be read, or the first tensor that does not fit.
    """
    try:
        tensors = load_file(os.fspath(path), device="cpu")
    except (OSError, SafetensorError) as err:
        raise GifError(
            f"{path}: cannot read the mask ({err}); pass a mask.safetensors written by "
            "`gif select-params`"
        ) from err
    check_mask(model, tensors, source=os.fspath(path))
    return {name: tensors[name] for name in trainable_parameters(model)}
