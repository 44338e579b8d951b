"""YAML configuration -> typed dataclasses, dotted ``KEY=VALUE`` overrides, validation.

Every problem in a config is reported at once, one line per key, and an unknown key names the
closest valid one. ``load_config(path, overrides)`` is the only entry point the commands use.

Every value is checked before any work: numbers are finite, integers fit 64 bits, and counts
that size an allocation (classes, channels, grid points) have a ceiling. YAML is read with a
budget: anchors and aliases may repeat at most ``ALIAS_BUDGET`` values in all (a few hundred
bytes of nested aliases would otherwise expand to gigabytes), a config is at most
``MAX_CONFIG_BYTES`` long, and aliases cannot refer to themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from gifcli.errors import GifError, ParameterError, UsageError
from gifcli.inputs import read_input

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "imagefolder", "tensors")
TRIGGERS = ("checkerboard", "patch", "blend")
SELECTION_METHODS = ("top-outputs", "top-gradients", "lowest-outputs", "lowest-gradients", "random")
INFLUENCE_METHODS = ("gif", "fif", "pif", "if", "sif", "first-order")
CURVATURE_NAMES = ("hessian", "ggn")
GRADIENTS = ("retained", "removal")  # the right-hand side: see docs/design.md, "Notation"
DAMPING_FORMS = ("shift", "tikhonov")  # how influence.damping enters: docs/design.md, "Damping"
SOLVER_NAMES = ("lsqr", "cg", "neumann", "exact")
SCOPES = ("linear-conv", "all")


# --------------------------------------------------------------------------- typed strategies
# What a damping or step setting means, parsed once from its keys: the rest of the package asks
# these types, never the strings.


@dataclass(frozen=True)
class FixedDamping:
    """A damping ``λ`` (``influence.damping`` a number): a Levenberg-Marquardt ``shift`` of
    the curvature, else Tikhonov damping of the squared system; ``relative``: ``λ = value ×
    σ_max`` of the system."""

    value: float
    shift: bool = True
    relative: bool = False


@dataclass(frozen=True)
class DampingPath:
    """``influence.damping: auto``: every Tikhonov ``λ`` of a log-spaced grid relative to
    ``σ_max`` from one LSQR run, chosen with the step on the validation split."""

    points: int = 8
    smallest: float = 1e-4
    largest: float = 1.0


Damping = FixedDamping | DampingPath


def damping_of(
    value: float | str,
    form: str = "shift",
    relative: bool = False,
    *,
    points: int = 8,
    smallest: float = 1e-4,
    largest: float = 1.0,
) -> Damping:
    """The ``Damping`` of ``influence.damping`` (a number >= 0 or ``auto``) and its form."""
    if value == "auto":
        return DampingPath(points, smallest, largest)
    if isinstance(value, str) or not (math.isfinite(value) and value >= 0):
        raise ParameterError("damping", f"must be 'auto' or a number >= 0, got {value!r}")
    if form not in DAMPING_FORMS:
        raise ParameterError(
            "damping_form", f"unknown {form!r}; use one of {', '.join(DAMPING_FORMS)}"
        )
    return FixedDamping(float(value), shift=form == "shift", relative=relative)


def path_problems(method: str, solver: str) -> list[str]:
    """Why ``damping: auto`` cannot run for ``method`` and ``solver``: the damping path is one
    LSQR run of a method with one solve (``first-order`` solves nothing and ignores it)."""
    if method == "first-order":
        return []
    out = []
    if solver != "lsqr":
        out.append(
            f"'auto' runs the lsqr regularisation path; set influence.solver: lsqr (got "
            f"{solver!r}) or give a number"
        )
    if method == "sif":
        out.append(
            "'auto' covers the methods with one solve (gif, fif, pif, if), not sif; give a number"
        )
    return out


@dataclass(frozen=True)
class FixedStep:
    """``update.scale`` a number: the edit ``θ̂ + scale·Δ``."""

    scale: float


@dataclass(frozen=True)
class StepSearch:
    """``update.scale: auto``: the step searched on the validation split over ``points``
    log-spaced relative steps ``|sΔ| / |θ̂_t|`` from ``smallest`` to ``largest``."""

    points: int = 48
    smallest: float = 1e-3
    largest: float = 10.0


Step = FixedStep | StepSearch

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds alike
MAX_CLASSES = 100_000
MAX_CHANNELS = 4096
MAX_IMAGE_SIDE = 4096
MAX_GRID_POINTS = 10_000
MAX_WORKERS = 256
MAX_INT = 2**63 - 1  # what a tensor index or count can hold
MAX_COUNT = 10**9  # samples, iterations, batch sizes: far beyond any data set gif edits
MAX_DAMPING_POINTS = 64  # the damping path holds one update per point
ALIAS_BUDGET = 100_000
MAX_CONFIG_BYTES = 1 << 20
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where installed
SAMPLE_OBJECTIVES = ("ks", "mean-gap")  # remove-samples: see docs/design.md, "Tasks"


@dataclass(frozen=True)
class Within:
    """The range of a numeric key, declared beside its field (``_field(..., within=...)``) and
    checked by ``range_problems`` for every config section: ``"1..4096"`` (integers, both
    ends included) or an interval such as ``"(0, 1]"`` or ``"[0, inf)"`` (numbers). A list
    of numbers is checked element by element. Every integer key has a ceiling: a count that
    sizes an allocation or a loop cannot reach 64 bits."""

    text: str

    def bounds(self) -> tuple[float, float, bool, bool]:
        """``(low, high, low included, high included)``."""
        if ".." in self.text:
            low, high = self.text.split("..")
            return int(low), int(high), True, True
        low, high = self.text[1:-1].split(",")
        return float(low), float(high), self.text[0] == "[", self.text[-1] == "]"

    def holds(self, value: float) -> bool:
        low, high, with_low, with_high = self.bounds()
        above = value >= low if with_low else value > low
        below = value <= high if with_high else value < high
        return above and below

    def __str__(self) -> str:
        return self.text


def _field(default: Any, help: str, *, within: str | None = None, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (shown by the config reference) and, for a
    number, its range (``Within``)."""
    metadata = {"help": help, **({"within": Within(within)} if within else {})}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


def range_problems(section: Any, prefix: str) -> list[str]:
    """The numeric keys of a config section outside the range declared beside them, one line
    per key (a long list is not echoed element by element); ``prefix``: the section's dotted
    path with its dot, e.g. ``"influence."``."""
    out = []
    for f in dataclasses.fields(section):
        within = f.metadata.get("within")
        value = getattr(section, f.name)
        values = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, number in values:
            numeric = isinstance(number, int | float) and not isinstance(number, bool)
            if within is None or not numeric or within.holds(number):
                continue  # 'auto', null, or in range
            key = prefix + f.name + ("" if i is None else f"[{i}]")
            out.append(f"{key}: must be in {within}, got {_show(number)}")
            break
    return out


@dataclass
class ModelConfig:
    arch: str = _field(
        "tinynet",
        "builtin name (tinynet, mlp, lenet, linear: softmax regression), torchvision:<name>, or "
        "package.module:callable (an installed package, or its folder on PYTHONPATH: "
        "PYTHONPATH=. gif ... from the folder holding package/)",
    )
    num_classes: int = _field(10, "number of output classes", within=f"2..{MAX_CLASSES}")
    in_channels: int | None = _field(
        None, "input channels; null: taken from the data set", within=f"1..{MAX_CHANNELS}"
    )
    kwargs: dict = _field({}, "keyword arguments for a package.module:callable architecture")

    def problems(self) -> list[str]:
        out = range_problems(self, "model.")
        if not self.arch:
            out.append("model.arch: must not be empty")
        return out


@dataclass
class TriggerConfig:
    trigger: str = _field("checkerboard", "checkerboard | patch | blend")
    intensity: float = _field(
        16.0, "checkerboard: added on a 0-255 scale on alternating pixels", within="[-255, 255]"
    )
    size: int = _field(3, "patch: side of the square, in pixels", within=f"1..{MAX_IMAGE_SIDE}")
    value: float = _field(1.0, "patch: pixel value in [0, 1] before normalisation", within="[0, 1]")
    corner: str = _field("bottom-right", "patch: top-left | top-right | bottom-left | bottom-right")
    image: str | None = _field(None, "blend: path of the image mixed into inputs")
    alpha: float = _field(0.2, "blend: weight of the blended image", within="(0, 1]")

    def problems(self, prefix: str) -> list[str]:
        out = range_problems(self, f"{prefix}.")
        if self.trigger not in TRIGGERS:
            out.append(_choice(f"{prefix}.trigger", self.trigger, TRIGGERS))
        if self.trigger == "blend" and not self.image:
            out.append(f"{prefix}.image: the blend trigger needs an image path")
        corners = ("top-left", "top-right", "bottom-left", "bottom-right")
        if self.corner not in corners:
            out.append(_choice(f"{prefix}.corner", self.corner, corners))
        return out


@dataclass
class PoisonConfig(TriggerConfig):
    """A backdoor scenario planted in the training data: a trigger, and whom it poisons."""

    rate: float = _field(0.1, "fraction of training samples poisoned", within="(0, 1)")
    target: int = _field(0, "label the trigger flips inputs to", within=f"0..{MAX_CLASSES - 1}")
    seed: int = _field(0, "seed of the poisoned-index draw", within=f"0..{MAX_SEED}")


@dataclass
class DataConfig:
    dataset: str = _field("digits", " | ".join(DATASETS))
    root: str = _field("data", "folder torchvision data sets and imagefolder are read from")
    path: str | None = _field(
        None,
        "tensors: a .pt or .npz file, or a folder of .npy files, with x_train, y_train, x_test, "
        "y_test (memory-mapped where the format allows)",
    )
    download: bool = _field(False, "allow torchvision to download a missing data set")
    val_fraction: float = _field(
        0.1,
        "without a validation set of your own, the share of the training set held out (seeded, "
        "stratified) for the step-size search; never the test split",
        within="[0, 1)",
    )
    val_path: str | None = _field(
        None,
        "a validation set of your own: a .pt or .npz file, or a folder of .npy files, with "
        "x_val and y_val (images as x_train); null: x_val/y_val of a tensors file, the val/ "
        "folder of an imagefolder, else data.val_fraction of the training set",
    )
    mean: list[float] | None = _field(
        None, "per-channel normalisation mean; null: the data set's default", within="[-1e6, 1e6]"
    )
    std: list[float] | None = _field(
        None,
        "per-channel normalisation std; null: the data set's default",
        within="[1e-6, 1e6]",  # a std of 1e-300 would turn every input into inf
    )
    image_size: int | None = _field(
        None, "imagefolder: resize images to this square size", within=f"1..{MAX_IMAGE_SIDE}"
    )
    poison: PoisonConfig | None = _field(
        None, "backdoor scenario: {trigger, rate, target, seed, ...}; null: clean data"
    )
    workers: int = _field(
        0,
        "worker processes that decode image batches ahead (0: decode in the main process)",
        within=f"0..{MAX_WORKERS}",
    )

    def problems(self) -> list[str]:
        out = range_problems(self, "data.")
        if self.dataset not in DATASETS:
            out.append(_choice("data.dataset", self.dataset, DATASETS))
        if self.dataset == "tensors" and not self.path:
            out.append("data.path: the tensors data set needs a .pt or .npz file")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and not values:
                out.append(f"data.{key}: must list one number per channel")
        if self.poison is not None:
            out += self.poison.problems("data.poison")
        return out


@dataclass
class RandomRemovalConfig:
    """A random removal set, for experiments: a share of the training split, seeded."""

    fraction: float = _field(
        0.05, "share of the training split to forget, in (0, 1)", within="(0, 1)"
    )
    seed: int = _field(
        0, "seed of the draw (independent of the config seed)", within=f"0..{MAX_SEED}"
    )

    def problems(self, prefix: str) -> list[str]:
        return range_problems(self, f"{prefix}.")


@dataclass
class RemovalConfig:
    classes: list[int] = _field(
        [3], "remove-class: the classes to forget", within=f"0..{MAX_CLASSES - 1}"
    )
    trigger: TriggerConfig | str | None = _field(
        None,
        "recover-backdoor: the known trigger, a name or {trigger, ...options}; null: data.poison's",
    )
    target: int | None = _field(
        None,
        "recover-backdoor: the backdoor's target label; null: data.poison.target",
        within=f"0..{MAX_CLASSES - 1}",
    )
    poison_indices: str | None = _field(
        None,
        "file of poisoned training indices (.txt with "
        "optional true-label column, .npy, .json); null: "
        "from data.poison",
    )
    synthetic_samples: int | None = _field(
        None,
        "recover-backdoor from a trigger alone: "
        "clean training samples to trigger; null: use "
        "known poisoned samples",
        within=f"1..{MAX_COUNT}",
    )
    gradient_samples: int | None = _field(
        1024,
        "removal points (a seeded random subsample) the removal gradient and the selection "
        "statistics are averaged over, as the paper's code does (512-1,024), so that their cost "
        "does not grow with the data; m in m/(n - m) stays the whole removal set's size; "
        "null: every point",
        within=f"1..{MAX_COUNT}",
    )
    indices: str | None = _field(
        None,
        "remove-samples: file of training indices to forget (.txt one per line, .npy, .json), "
        "counted from 0 in the data set's training split before the validation split is "
        "held out",
    )
    random: RandomRemovalConfig | None = _field(
        None, "remove-samples: forget a random {fraction, seed} of the training split instead"
    )
    objective: str = _field(
        "ks",
        "remove-samples: step objective, " + " | ".join(SAMPLE_OBJECTIVES) + " (see README)",
    )
    tolerance: float = _field(
        1.0,
        "remove-samples: validation accuracy (points) the step may lose against the "
        "model before the edit",
        within="[0, 100]",
    )

    def __post_init__(self) -> None:
        if isinstance(self.trigger, str):
            self.trigger = TriggerConfig(trigger=self.trigger)

    def problems(self, num_classes: int) -> list[str]:
        out = range_problems(self, "removal.")
        if not self.classes:
            out.append("removal.classes: list at least one class")
        ordered = sorted(self.classes)
        repeated = [k for k, before in zip(ordered[1:], ordered, strict=False) if k == before]
        if repeated:
            out.append(f"removal.classes: class {repeated[0]} is listed twice; list it once")
        outside = [k for k in self.classes if not 0 <= k < num_classes][:1]
        if outside:
            out.append(f"removal.classes: class {outside[0]} is out of range 0..{num_classes - 1}")
        if len(self.classes) >= num_classes:
            out.append("removal.classes: at least one class must be retained")
        if self.target is not None and not 0 <= self.target < num_classes:
            out.append(f"removal.target: {self.target} is out of range 0..{num_classes - 1}")
        if self.trigger is not None:
            out += self.trigger.problems("removal.trigger")
        out += self.sample_problems()
        return out

    def sample_problems(self) -> list[str]:
        """The remove-samples keys: one removal set, of one kind."""
        out = []
        if self.indices is not None and self.random is not None:
            out.append(
                "removal.indices, removal.random: give one removal set; set the other to null"
            )
        if (self.indices is not None or self.random is not None) and self.poison_indices:
            out.append(
                "removal.poison_indices: a remove-samples config (removal.indices or "
                "removal.random) cannot also list poisoned samples; set one to null"
            )
        if self.random is not None:
            out += self.random.problems("removal.random")
        if self.objective not in SAMPLE_OBJECTIVES:
            out.append(_choice("removal.objective", self.objective, SAMPLE_OBJECTIVES))
        return out


@dataclass
class SelectionConfig:
    method: str = _field("top-outputs", " | ".join(SELECTION_METHODS))
    ratio: float = _field(
        0.05,
        "fraction of each Linear/Conv2d layer's parameters that are targets, in (0, 1]",
        within="(0, 1]",
    )
    include: list[str] | None = _field(
        None, "glob patterns of layer names to include (also non-Linear/Conv2d layers)"
    )
    exclude: list[str] | None = _field(None, "glob patterns of layer names to exclude")

    def problems(self) -> list[str]:
        out = range_problems(self, "selection.")
        if self.method not in SELECTION_METHODS:
            out.append(_choice("selection.method", self.method, SELECTION_METHODS))
        return out


@dataclass
class NeumannConfig:
    scale: float = _field(
        1.0, "neumann: the starting scale c (the loss is divided by c)", within="(0, 1e12]"
    )
    scale_step: float = _field(
        0.5,
        "neumann: added to c at each restart (when the iterate difference grows)",
        within="(0, 1e12]",
    )
    max_restarts: int = _field(
        1000, "neumann: restarts at most before it reports divergence", within=f"0..{MAX_COUNT}"
    )
    absolute_tol: float | None = _field(
        None,
        "neumann: also stop once the iterate difference is below this, as a root-mean-square "
        "per coordinate (the paper's tol); null: only influence.tol",
        within="(0, inf)",
    )

    def problems(self) -> list[str]:
        return range_problems(self, "influence.neumann.")


@dataclass
class InfluenceConfig:
    method: str = _field("gif", " | ".join(INFLUENCE_METHODS))
    curvature: str = _field(
        "ggn",
        "ggn (Gauss-Newton, positive semi-definite; a product runs one forward pass fewer "
        "than the Hessian's double backward: BENCHMARKS.md) "
        "| hessian (the paper's)",
    )
    solver: str = _field("lsqr", " | ".join(SOLVER_NAMES))
    hessian_samples: int | str = _field(
        "auto",
        "retained training samples in the Hessian sample; auto: sized by influence.budget",
        within=f"1..{MAX_COUNT}",
    )
    batch_size: int = _field(
        256, "samples per HVP batch; bounds HVP memory", within=f"1..{MAX_COUNT}"
    )
    cache_mb: int = _field(
        1024,
        "per-process budget (MiB) of the cache that makes repeated curvature products "
        "faster (linearised Hessian batches, kept Gauss-Newton graphs); 0 keeps nothing "
        "between products, "
        "so memory is bounded by batch_size alone",
        within=f"0..{1 << 30}",  # a PiB: bytes still fit 64 bits
    )
    max_iter: int | str = _field(
        "auto", "solver iterations at most; auto: sized by influence.budget", within="1..1000000"
    )
    budget: float = _field(
        0.25,
        "auto hessian_samples / max_iter: the edit's predicted work as a fraction of one "
        "retraining's (train.epochs x retrained samples training steps, in sample passes: the "
        "unit of cost.retrain_ratio); the dearest rung of the budget "
        "ladder (64x3, 128x5, 256x5, 512x5, 1024x5, 2048x5, 1024x20 samples x iterations) "
        "that fits is used",
        within="(0, 1e6]",
    )
    tol: float = _field(1.0e-6, "solver stopping tolerance (relative)", within="(0, 1]")
    weight_decay: float | None = _field(
        None,
        "wd of the objective the model was trained on, mean loss + (wd/2)|theta|^2: the "
        "curvature is H + wd*I and the gradient has the wd*theta term; null: the one the "
        "checkpoint records (gif train writes it), else train.weight_decay for a model in "
        "memory, else 0 with a note. 0 with curvature: hessian and gradient: removal is the "
        "paper's estimator",
        within="[0, 1]",
    )
    gradient: str = _field(
        "removal",
        "the right-hand side g: removal (from the removal set alone, m/(n-m) (grad L_U + "
        "wd*theta): exact at a minimum of the training objective, and on SGD-trained networks "
        "the closer to retraining, which stops short of that minimum too; see BENCHMARKS.md, "
        "The influence step) | retained (minus the gradient of the retained objective at the "
        "model, one pass over the retained training data: the exact Newton step wherever "
        "training stopped)",
    )
    retained_samples: int | None = _field(
        None,
        "gradient: retained: the retained training samples it is averaged over (a seeded "
        "sample); null: all of them, one gradient pass over the retained data",
        within=f"1..{MAX_COUNT}",
    )
    damping: float | str = _field(
        0.0,
        "lambda (see damping_form); 0: none, the weight decay already makes the Gauss-Newton "
        "system positive definite; auto: every tikhonov lambda of the damping grid from one "
        "lsqr run, chosen with the step on the validation split",
        within="[0, 1e10]",  # lambda^2 stays finite in float32
    )
    damping_form: str = _field(
        "shift",
        "shift: Levenberg-Marquardt, the curvature becomes H + (wd + lambda) I (gif: the "
        "least-squares problem on those columns, undamped), so only directions of curvature "
        "below lambda are damped | tikhonov: min |Ax - b|^2 + lambda^2 |x|^2, the squared "
        "system damped, which damps every direction of curvature below lambda (the form "
        "the tool had before; with weight_decay 0, the paper's)",
    )
    damping_relative: bool = _field(
        False,
        "true: a numeric damping is relative, lambda = damping * sigma_max, the largest "
        "singular value of the system's matrix estimated by Golub-Kahan steps (tikhonov with "
        "lsqr: from its own run; otherwise 10 extra steps, 21 HVPs); false: lambda = damping. "
        "The auto grid is always relative",
    )
    damping_points: int = _field(
        8, "auto: lambdas on the log-spaced damping grid", within=f"1..{MAX_DAMPING_POINTS}"
    )
    damping_min: float = _field(
        1.0e-4, "auto: smallest lambda, as a multiple of sigma_max", within="(0, 1e6]"
    )
    damping_max: float = _field(
        1.0, "auto: largest lambda, as a multiple of sigma_max", within="(0, 1e6]"
    )

    @property
    def damping_setting(self) -> Damping:
        """``damping`` with its form, or the damping path (``auto``), as a ``Damping``."""
        return damping_of(
            self.damping,
            self.damping_form,
            self.damping_relative,
            points=self.damping_points,
            smallest=self.damping_min,
            largest=self.damping_max,
        )

    def __post_init__(self) -> None:
        # YAML reads 1e-3 (no dot) as text; a damping written that way is still a number.
        if isinstance(self.damping, str) and self.damping != "auto":
            with contextlib.suppress(ValueError):
                self.damping = float(self.damping)

    scope: str = _field(
        "linear-conv",
        "if, pif, sif: the parameters they treat as variables; linear-conv: every parameter "
        "of every nn.Linear / nn.Conv2d module (the paper's IF; BatchNorm and all others held "
        "fixed), all: every trainable parameter",
    )
    neumann: NeumannConfig = _field(NeumannConfig, "settings of the neumann solver")

    def problems(self) -> list[str]:
        out = range_problems(self, "influence.")
        for key, choices in (
            ("method", INFLUENCE_METHODS),
            ("curvature", CURVATURE_NAMES),
            ("solver", SOLVER_NAMES),
            ("scope", SCOPES),
            ("gradient", GRADIENTS),
            ("damping_form", DAMPING_FORMS),
        ):
            if getattr(self, key) not in choices:
                out.append(_choice(f"influence.{key}", getattr(self, key), choices))
        for key in ("hessian_samples", "max_iter"):
            value = getattr(self, key)
            if isinstance(value, str) and value != "auto":
                out.append(f"influence.{key}: must be 'auto' or a positive integer, got {value!r}")
        out += self._damping_problems()
        return out + self.neumann.problems()

    def solver_options(self) -> dict:
        """Keyword arguments of the chosen solver beyond the shared ones (``neumann``'s)."""
        return dataclasses.asdict(self.neumann) if self.solver == "neumann" else {}

    def _damping_problems(self) -> list[str]:
        out = []
        if not self.damping_min <= self.damping_max:
            out.append(
                "influence.damping_min, influence.damping_max: need 0 < damping_min <= "
                f"damping_max, got {self.damping_min:g} and {self.damping_max:g}"
            )
        if not isinstance(self.damping, str):
            pass  # a number: its range is the field's
        elif self.damping != "auto":
            out.append(f"influence.damping: must be 'auto' or a number, got {self.damping!r}")
        else:
            out += [f"influence.damping: {p}" for p in path_problems(self.method, self.solver)]
        return out


@dataclass
class UpdateConfig:
    scale: float | str | None = _field(
        None,
        "the step s of the edit theta + s*delta, in units of the influence step (1.0: the "
        "Newton step of the retained objective, no search); auto: searched on the validation "
        "split; null: the task's rule, remove-class and recover-backdoor auto (their "
        "validation objectives measure what the edit is for, and the searched step came closer "
        "to retraining), remove-samples 1.0 (the unedited model already meets its validation "
        "objective for a random deletion, so a search is erratic: no step, or one stretched "
        "far past the quadratic model; the influence step never moved away from retraining; "
        "see BENCHMARKS.md, The influence step)",
        within="(0, inf)",  # a scale too large for the model is refused after the solve
    )
    grid_points: int = _field(
        48, "auto: points of the log-spaced scale grid", within=f"2..{MAX_GRID_POINTS}"
    )
    grid_min: float = _field(
        1.0e-3, "auto: smallest step, as |s*delta| / |target params|", within="(0, 1e6]"
    )
    grid_max: float = _field(
        10.0, "auto: largest step, as |s*delta| / |target params|", within="(0, 1e6]"
    )
    search_samples: int | None = _field(
        512,
        "auto: samples of each split the step search scores (the validation split; "
        "remove-samples also the removal set), a seeded subsample, so that the search does not "
        "grow with the data; null: all",
        within=f"1..{MAX_COUNT}",
    )
    recalibrate_batchnorm: bool = _field(
        True,
        "re-estimate the BatchNorm running statistics of every edited model (in the step "
        "search and the output) on the Hessian sample: an edit moves the activations they "
        "describe (see BENCHMARKS.md, ResNet-18 with BatchNorm); a model without BatchNorm "
        "is unchanged; false: keep the input's statistics",
    )

    @property
    def step(self) -> Step:
        """``scale`` as a ``Step`` (``auto``: the search); ``scale`` null is the task's rule,
        which the edit resolves before it asks."""
        if self.scale == "auto":
            return StepSearch(self.grid_points, self.grid_min, self.grid_max)
        if self.scale is None or isinstance(self.scale, str):
            raise GifError(f"update.scale: must be 'auto' or a number, got {self.scale!r}")
        return FixedStep(float(self.scale))

    def problems(self) -> list[str]:
        out = range_problems(self, "update.")
        if isinstance(self.scale, str) and self.scale != "auto":
            out.append(f"update.scale: must be 'auto' or a number, got {self.scale!r}")
        if not self.grid_min < self.grid_max:
            out.append("update.grid_min, update.grid_max: need 0 < grid_min < grid_max")
        return out


@dataclass
class TrainConfig:
    epochs: int = _field(15, "training epochs", within="1..1000000")
    lr: float = _field(0.05, "SGD learning rate (cosine schedule)", within="(0, inf)")
    momentum: float = _field(0.9, "SGD momentum", within="[0, 1]")
    weight_decay: float = _field(5.0e-4, "SGD weight decay", within="[0, 1]")
    batch_size: int = _field(128, "training batch size", within=f"1..{MAX_COUNT}")
    augment: bool = _field(
        False,
        "random crop with 4 pixels of padding and horizontal flip of each training batch (the "
        "standard augmentation of 32x32 colour sets such as cifar10); false: images as they are",
    )

    def problems(self) -> list[str]:
        return range_problems(self, "train.")


@dataclass
class MetricsConfig:
    train_samples: int | None = _field(
        None,
        "measure the *_train metrics on a seeded sample of this many training samples (for very "
        "large sets; the report says so); null: the whole training split",
        within=f"1..{MAX_COUNT}",
    )

    def problems(self) -> list[str]:
        return range_problems(self, "metrics.")


@dataclass
class AuditConfig:
    references: int = _field(
        8,
        "gif audit: reference models trained with gif train's recipe (seeds varied), half with "
        "the removal set and a held-out sample, half without; even",
        within="6..1000",
    )
    cache: str | None = _field(
        None,
        "gif audit: folder of cached reference models, keyed by content (recipe, training "
        "data, seed); null: references/ beside the audit's output folder",
    )

    def problems(self) -> list[str]:
        if self.references % 2:
            return [f"audit.references: must be even, got {self.references}"]
        return range_problems(self, "audit.")


@dataclass
class OutputConfig:
    dir: str = _field("runs/remove-class", "folder the outputs are written to")


@dataclass
class Config:
    seed: int = _field(
        0, "seed of every random draw (split, selection, training)", within=f"0..{MAX_SEED}"
    )
    device: str = _field("auto", "auto | cpu | cuda[:N]")
    model: ModelConfig = _field(ModelConfig, "the architecture")
    checkpoint: str | None = _field(None, "trained weights: .safetensors, or .pt/.pth")
    data: DataConfig = _field(DataConfig, "the data set")
    removal: RemovalConfig = _field(RemovalConfig, "what to forget")
    selection: SelectionConfig = _field(SelectionConfig, "target-parameter selection")
    influence: InfluenceConfig = _field(InfluenceConfig, "the update estimator and its solver")
    update: UpdateConfig = _field(UpdateConfig, "the step scale")
    train: TrainConfig = _field(TrainConfig, "gif train")
    metrics: MetricsConfig = _field(MetricsConfig, "how the metrics are measured")
    audit: AuditConfig = _field(AuditConfig, "gif audit: membership audit against references")
    output: OutputConfig = _field(OutputConfig, "outputs")

    source: ClassVar[str] = "CONFIG"
    """The YAML file the config was read from (set by ``load_config``), for messages."""

    def problems(self) -> list[str]:
        out = range_problems(self, "")
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            out.append(f"device: must be auto, cpu or cuda[:N], got {self.device!r}")
        out += self.model.problems()
        out += self.data.problems()
        out += self.removal.problems(self.model.num_classes)
        out += self.selection.problems()
        out += self.influence.problems()
        out += self.update.problems()
        out += self.train.problems()
        out += self.metrics.problems()
        out += self.audit.problems()
        poison = self.data.poison
        if poison is not None and not 0 <= poison.target < self.model.num_classes:
            out.append(
                f"data.poison.target: {self.data.poison.target} is out of range "
                f"0..{self.model.num_classes - 1}"
            )
        return out

    @property
    def backdoor_target(self) -> int | None:
        """The backdoor's target label: removal.target, else the poison scenario's."""
        if self.removal.target is not None:
            return self.removal.target
        return self.data.poison.target if self.data.poison is not None else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    hint = difflib.get_close_matches(str(value), choices, n=1)
    suggestion = f"; did you mean {hint[0]!r}?" if hint else ""
    return f"{key}: {value!r} is not one of {', '.join(choices)}{suggestion}"


# ---------------------------------------------------------------------------------- parsing


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'selection.ratio=0.1'`` -> ``(['selection', 'ratio'], 0.1)``; values parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UsageError(
            f"override {_show(text)}: expected KEY=VALUE with a dotted key, e.g. "
            f"selection.ratio=0.1"
        )
    try:
        value = safe_yaml(raw, source=f"override {_show(text)}") if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(
            f"override {_show(text)}: the value is not valid YAML ({_first_line(exc)})"
        ) from None
    except GifError as exc:
        raise UsageError(str(exc)) from None
    return key.strip().split("."), value


def safe_yaml(text: str, *, source: str) -> Any:
    """``yaml.safe_load`` within the budget of the module doc; GifError naming ``source``."""
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_aliases(node, source)
        return loader.construct_document(node)
    except RecursionError:
        raise GifError(f"{source}: YAML nested too deeply; flatten the config") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise GifError(f"{source}: a value cannot be read ({_first_line(exc)})") from None
    finally:
        loader.dispose()


def _check_aliases(root: yaml.Node, source: str) -> None:
    """Refuse a YAML graph whose aliases expand past ``ALIAS_BUDGET`` values, or that
    contains itself; costs one pass over the distinct nodes (sizes are memoised)."""
    sizes: dict[int, int] = {}  # id(node) -> nodes in its expansion
    entered: set[int] = set()  # nodes on the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            entered.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            _check_unique_keys(node, source)
            continue
        if id(node) in sizes:
            continue
        if id(node) in entered:
            raise GifError(
                f"{source}: a YAML alias (*name) refers to its own anchor; configs cannot be "
                f"recursive"
            )
        entered.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in sizes)
    if sizes[id(root)] - len(sizes) > ALIAS_BUDGET:
        raise GifError(
            f"{source}: YAML aliases (*name) repeat more than {ALIAS_BUDGET:,} values; write "
            f"the values out instead of nesting anchors"
        )


def _check_unique_keys(node: yaml.Node, source: str) -> None:
    """Refuse a mapping that gives one key twice: YAML would silently keep the last."""
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[str, yaml.Node] = {}
    for key, _ in node.value:
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        if key.value in seen:
            first = seen[key.value].start_mark.line + 1
            raise GifError(
                f"{source}: key {_show(key.value)} is given twice (lines {first} and "
                f"{key.start_mark.line + 1}); keep one"
            )
        seen[key.value] = key


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Merge dotted overrides into a raw config mapping (a new dict; ``raw`` is untouched)."""
    merged = _deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return merged


def _deepcopy(raw: Any) -> Any:
    if isinstance(raw, dict):
        return {k: _deepcopy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deepcopy(v) for v in raw]
    return raw


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    text = read_input(
        path,
        what="config file",
        missing="pass the path of a YAML config (see configs/)",
        limit=MAX_CONFIG_BYTES,
    )
    try:
        raw = safe_yaml(text.decode(), source=str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise GifError(
            f"{path}: malformed YAML{where}: {getattr(exc, 'problem', None) or _first_line(exc)}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GifError(f"{path}: cannot read the config ({exc})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise GifError(
            f"{path}: the config must be a YAML mapping of keys, got {type(raw).__name__}"
        )
    return raw


def build_config(
    raw: dict, *, source: str = "config", overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Typed config from a raw mapping; every problem is reported at once in one GifError.

    A problem with a key that one of ``overrides`` set is labelled as coming from it.
    """
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    problems += config.problems()  # keys that failed to convert keep their valid defaults
    if problems:
        labelled = [_label(p, overrides) for p in problems]
        where = f"{source} with its command-line overrides" if overrides else source
        if overrides and all(p != q for p, q in zip(problems, labelled, strict=True)):
            where = "command-line overrides"
        bullets = "\n".join(f"  - {p}" for p in labelled)
        raise GifError(f"{where}: {len(problems)} problem(s) in the config:\n{bullets}")
    return config


def _label(problem: str, overrides: list[str] | tuple[str, ...]) -> str:
    """``problem`` with the override that set its key, if one did (the last one: a later
    override of a key replaces an earlier one)."""
    key = problem.split(":", 1)[0]
    for text in reversed(overrides):
        dotted = text.partition("=")[0].strip()
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
            return f"{problem} (from the override {_show(text)})"
    return problem


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply dotted overrides, validate; raises GifError listing problems."""
    raw = apply_overrides(read_yaml(path), list(overrides))
    config = build_config(raw, source=str(path), overrides=overrides)
    config.source = str(path)
    return config


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(
            f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {_show(raw)}"
        )
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            hint = difflib.get_close_matches(str(key), list(fields), n=1)
            suggestion = f"; did you mean {prefix}{hint[0]}?" if hint else ""
            problems.append(f"{dotted}: unknown key{suggestion}")
            continue
        ok, converted = _convert(hints[key], value, dotted, problems)
        if ok:
            kwargs[key] = converted
    return cls(**kwargs)


def _convert(hint: Any, value: Any, key: str, problems: list[str]) -> tuple[bool, Any]:
    """Check ``value`` against the type ``hint``; (True, value) or record a problem."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return True, None
        problems.append(f"{key}: must not be null")
        return False, None
    errors: list[str] = []
    for option in options:
        if option is type(None):
            continue
        if dataclasses.is_dataclass(option):
            if isinstance(value, dict):
                return True, _build(option, value, key + ".", problems)
            continue
        origin = typing.get_origin(option) or option
        if origin is list:
            if isinstance(value, list):
                (item,) = typing.get_args(option) or (Any,)
                items = []
                for i, v in enumerate(value):
                    ok, converted = _convert(item, v, f"{key}[{i}]", errors)
                    if not ok:
                        break
                    items.append(converted)
                else:
                    return True, items
            continue
        if origin is dict and isinstance(value, dict):
            return True, value
        if origin is bool and isinstance(value, bool):
            return True, value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > MAX_INT:
                problems.append(f"{key}: {_show(value)} is out of range (at most {MAX_INT})")
                return False, None
            return True, value
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1024 else math.inf  # float() overflows
            if not math.isfinite(number):
                problems.append(f"{key}: must be a finite number, got {_show(value)}")
                return False, None
            return True, number
        if origin is str and isinstance(value, str):
            return True, value
        if origin is Any:
            return True, value
    if errors:
        problems.extend(errors)
    else:
        problems.append(f"{key}: expected {_type_name(hint)}, got {_show(value)}")
    return False, None


def _show(value: Any, most: int = 60) -> str:
    """``repr(value)``, cut short: a value may be a long list or a number of 4,000 digits."""
    if isinstance(value, int) and abs(value) >= 10**most:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _type_name(hint: Any) -> str:
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    names = []
    for option in options:
        if option is type(None):
            names.append("null")
        elif dataclasses.is_dataclass(option):
            names.append("a mapping")
        elif typing.get_origin(option) is list:
            (item,) = typing.get_args(option)
            names.append(f"a list of {_type_name(item)}")
        else:
            names.append(
                {
                    int: "an integer",
                    float: "a number",
                    str: "a string",
                    bool: "true/false",
                    dict: "a mapping",
                }.get(option, str(option))
            )
    return " or ".join(names)


def reference(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every config key: the README's config reference."""
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        hint = typing.get_type_hints(cls)[f.name]
        nested = [o for o in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(o)]
        rows.append(
            (
                prefix + f.name,
                "" if dataclasses.is_dataclass(default) else repr(default),
                f.metadata.get("help", ""),
            )
        )
        if nested:
            rows += reference(nested[0], prefix + f.name + ".")
    return rows
