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

from gifcli.errors import GifError, UsageError

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "imagefolder", "tensors")
TRIGGERS = ("checkerboard", "patch", "blend")
SELECTION_METHODS = ("top-outputs", "top-gradients", "lowest-outputs", "lowest-gradients", "random")
INFLUENCE_METHODS = ("gif", "fif", "pif", "if", "sif", "first-order")
TARGETED_METHODS = ("gif", "fif", "pif", "first-order")  # Δ is zero outside the target mask
CURVATURES = ("hessian", "ggn")
GRADIENTS = ("retained", "removal")  # the right-hand side: see docs/design.md, "Notation"
DAMPING_FORMS = ("shift", "tikhonov")  # how influence.damping enters: docs/design.md, "Damping"
SOLVERS = ("lsqr", "cg", "neumann", "exact")
SCOPES = ("linear-conv", "all")

MAX_SEED = 2**32 - 1  # numpy's and torch's seeds alike
MAX_CLASSES = 100_000
MAX_CHANNELS = 4096
MAX_IMAGE_SIDE = 4096
MAX_GRID_POINTS = 10_000
MAX_WORKERS = 256
MAX_INT = 2**63 - 1  # what a tensor index or count can hold
ALIAS_BUDGET = 100_000
MAX_CONFIG_BYTES = 1 << 20
SAMPLE_OBJECTIVES = ("ks", "mean-gap")  # remove-samples: see docs/design.md, "Tasks"


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (shown by the config reference)."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    if dataclasses.is_dataclass(default) and isinstance(default, type):
        return field(default_factory=default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    arch: str = _field(
        "tinynet",
        "builtin name (tinynet, mlp, lenet, linear: softmax regression), torchvision:<name>, or "
        "package.module:callable (an installed package, or its folder on PYTHONPATH: "
        "PYTHONPATH=. gif ... from the folder holding package/)",
    )
    num_classes: int = _field(10, "number of output classes")
    in_channels: int | None = _field(None, "input channels; null: taken from the data set")
    kwargs: dict = _field({}, "keyword arguments for a package.module:callable architecture")

    def problems(self) -> list[str]:
        out = []
        if not 2 <= self.num_classes <= MAX_CLASSES:
            out.append(f"model.num_classes: must be in 2..{MAX_CLASSES}, got {self.num_classes}")
        if self.in_channels is not None and not 1 <= self.in_channels <= MAX_CHANNELS:
            out.append(f"model.in_channels: must be in 1..{MAX_CHANNELS}, got {self.in_channels}")
        if not self.arch:
            out.append("model.arch: must not be empty")
        return out


@dataclass
class TriggerConfig:
    trigger: str = _field("checkerboard", "checkerboard | patch | blend")
    intensity: float = _field(16.0, "checkerboard: added on a 0-255 scale on alternating pixels")
    size: int = _field(3, "patch: side of the square, in pixels")
    value: float = _field(1.0, "patch: pixel value in [0, 1] before normalisation")
    corner: str = _field("bottom-right", "patch: top-left | top-right | bottom-left | bottom-right")
    image: str | None = _field(None, "blend: path of the image mixed into inputs")
    alpha: float = _field(0.2, "blend: weight of the blended image")

    def problems(self, prefix: str) -> list[str]:
        out = []
        if self.trigger not in TRIGGERS:
            out.append(_choice(f"{prefix}.trigger", self.trigger, TRIGGERS))
        if self.trigger == "blend" and not self.image:
            out.append(f"{prefix}.image: the blend trigger needs an image path")
        if not 0.0 < self.alpha <= 1.0:
            out.append(f"{prefix}.alpha: must be in (0, 1], got {self.alpha}")
        if self.size < 1:
            out.append(f"{prefix}.size: must be positive, got {self.size}")
        corners = ("top-left", "top-right", "bottom-left", "bottom-right")
        if self.corner not in corners:
            out.append(_choice(f"{prefix}.corner", self.corner, corners))
        return out


@dataclass
class PoisonConfig(TriggerConfig):
    """A backdoor scenario planted in the training data: a trigger, and whom it poisons."""

    rate: float = _field(0.1, "fraction of training samples poisoned")
    target: int = _field(0, "label the trigger flips inputs to")
    seed: int = _field(0, "seed of the poisoned-index draw")

    def problems(self, prefix: str) -> list[str]:
        out = super().problems(prefix)
        if not 0.0 < self.rate < 1.0:
            out.append(f"{prefix}.rate: must be in (0, 1), got {self.rate}")
        out += _seed_problems(f"{prefix}.seed", self.seed)
        return out


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
    )
    val_path: str | None = _field(
        None,
        "a validation set of your own: a .pt or .npz file, or a folder of .npy files, with "
        "x_val and y_val (images as x_train); null: x_val/y_val of a tensors file, the val/ "
        "folder of an imagefolder, else data.val_fraction of the training set",
    )
    mean: list[float] | None = _field(
        None, "per-channel normalisation mean; null: the data set's default"
    )
    std: list[float] | None = _field(
        None, "per-channel normalisation std; null: the data set's default"
    )
    image_size: int | None = _field(None, "imagefolder: resize images to this square size")
    poison: PoisonConfig | None = _field(
        None, "backdoor scenario: {trigger, rate, target, seed, ...}; null: clean data"
    )
    workers: int = _field(
        0, "worker processes that decode image batches ahead (0: decode in the main process)"
    )

    def problems(self) -> list[str]:
        out = []
        if self.dataset not in DATASETS:
            out.append(_choice("data.dataset", self.dataset, DATASETS))
        if self.dataset == "tensors" and not self.path:
            out.append("data.path: the tensors data set needs a .pt or .npz file")
        if not 0.0 <= self.val_fraction < 1.0:
            out.append(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and not values:
                out.append(f"data.{key}: must list one number per channel")
        if self.std is not None and any(s <= 0 for s in self.std):
            out.append("data.std: every entry must be positive")
        if self.image_size is not None and not 1 <= self.image_size <= MAX_IMAGE_SIDE:
            out.append(f"data.image_size: must be in 1..{MAX_IMAGE_SIDE}, got {self.image_size}")
        if self.poison is not None:
            out += self.poison.problems("data.poison")
        if not 0 <= self.workers <= MAX_WORKERS:
            out.append(f"data.workers: must be in 0..{MAX_WORKERS}, got {self.workers}")
        return out


@dataclass
class RandomRemovalConfig:
    """A random removal set, for experiments: a share of the training split, seeded."""

    fraction: float = _field(0.05, "share of the training split to forget, in (0, 1)")
    seed: int = _field(0, "seed of the draw (independent of the config seed)")

    def problems(self, prefix: str) -> list[str]:
        if not 0.0 < self.fraction < 1.0:
            return [f"{prefix}.fraction: must be in (0, 1), got {self.fraction}"]
        return []


@dataclass
class RemovalConfig:
    classes: list[int] = _field([3], "remove-class: the classes to forget")
    trigger: TriggerConfig | str | None = _field(
        None,
        "recover-backdoor: the known trigger, a name or {trigger, ...options}; null: data.poison's",
    )
    target: int | None = _field(
        None, "recover-backdoor: the backdoor's target label; null: data.poison.target"
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
    )
    gradient_samples: int | None = _field(
        1024,
        "removal points (a seeded random subsample) the removal gradient and the selection "
        "statistics are averaged over, as the paper's code does (512-1,024), so that their cost "
        "does not grow with the data; m in m/(n - m) stays the whole removal set's size; "
        "null: every point",
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
    )

    def __post_init__(self) -> None:
        if isinstance(self.trigger, str):
            self.trigger = TriggerConfig(trigger=self.trigger)

    def problems(self, num_classes: int) -> list[str]:
        out = []
        if not self.classes:
            out.append("removal.classes: list at least one class")
        if len(set(self.classes)) != len(self.classes):
            out.append(f"removal.classes: repeated class in {self.classes}")
        for k in self.classes:
            if not 0 <= k < num_classes:
                out.append(f"removal.classes: class {k} is out of range 0..{num_classes - 1}")
        if len(self.classes) >= num_classes:
            out.append("removal.classes: at least one class must be retained")
        if self.target is not None and not 0 <= self.target < num_classes:
            out.append(f"removal.target: {self.target} is out of range 0..{num_classes - 1}")
        if self.synthetic_samples is not None and self.synthetic_samples < 1:
            out.append(f"removal.synthetic_samples: must be positive, got {self.synthetic_samples}")
        if self.gradient_samples is not None and self.gradient_samples < 1:
            out.append(
                f"removal.gradient_samples: must be positive or null, got {self.gradient_samples}"
            )
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
        if self.tolerance < 0:
            out.append(f"removal.tolerance: must be non-negative, got {self.tolerance}")
        return out


@dataclass
class SelectionConfig:
    method: str = _field("top-outputs", " | ".join(SELECTION_METHODS))
    ratio: float = _field(
        0.05, "fraction of each Linear/Conv2d layer's parameters that are targets, in (0, 1]"
    )
    include: list[str] | None = _field(
        None, "glob patterns of layer names to include (also non-Linear/Conv2d layers)"
    )
    exclude: list[str] | None = _field(None, "glob patterns of layer names to exclude")

    def problems(self) -> list[str]:
        out = []
        if self.method not in SELECTION_METHODS:
            out.append(_choice("selection.method", self.method, SELECTION_METHODS))
        if not 0.0 < self.ratio <= 1.0:
            out.append(f"selection.ratio: must be in (0, 1], got {self.ratio}")
        return out


@dataclass
class NeumannConfig:
    scale: float = _field(1.0, "neumann: the starting scale c (the loss is divided by c)")
    scale_step: float = _field(
        0.5, "neumann: added to c at each restart (when the iterate difference grows)"
    )
    max_restarts: int = _field(1000, "neumann: restarts at most before it reports divergence")
    absolute_tol: float | None = _field(
        None,
        "neumann: also stop once the iterate difference is below this, as a root-mean-square "
        "per coordinate (the paper's tol); null: only influence.tol",
    )

    def problems(self) -> list[str]:
        out = []
        for key in ("scale", "scale_step"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                out.append(f"influence.neumann.{key}: must be a finite number > 0, got {value}")
        if self.max_restarts < 0:
            out.append(
                f"influence.neumann.max_restarts: must be 0 or more, got {self.max_restarts}"
            )
        tol = self.absolute_tol
        if tol is not None and not (math.isfinite(tol) and tol > 0):
            out.append(f"influence.neumann.absolute_tol: must be a finite number > 0, got {tol}")
        return out


@dataclass
class InfluenceConfig:
    method: str = _field("gif", " | ".join(INFLUENCE_METHODS))
    curvature: str = _field(
        "ggn",
        "ggn (Gauss-Newton, positive semi-definite; a product runs one forward pass fewer "
        "than the Hessian's double backward: BENCHMARKS.md) "
        "| hessian (the paper's)",
    )
    solver: str = _field("lsqr", " | ".join(SOLVERS))
    hessian_samples: int | str = _field(
        "auto",
        "retained training samples in the Hessian sample; auto: sized by influence.budget",
    )
    batch_size: int = _field(256, "samples per HVP batch; bounds HVP memory")
    cache_mb: int = _field(
        1024,
        "per-process budget (MiB) of the cache that makes repeated curvature products "
        "faster (linearised Hessian batches, kept Gauss-Newton graphs); 0 keeps nothing "
        "between products, "
        "so memory is bounded by batch_size alone",
    )
    max_iter: int | str = _field(
        "auto", "solver iterations at most; auto: sized by influence.budget"
    )
    budget: float = _field(
        0.5,
        "auto hessian_samples / max_iter: the edit's work as a fraction of one retraining's "
        "(train.epochs x retrained samples, in sample passes); the dearest rung of the budget "
        "ladder (64x3, 128x5, 256x5, 512x5, 1024x5, 2048x5, 1024x20 samples x iterations) "
        "that fits is used",
    )
    tol: float = _field(1.0e-6, "solver stopping tolerance (relative)")
    weight_decay: float | None = _field(
        None,
        "wd of the objective the model was trained on, mean loss + (wd/2)|theta|^2: the "
        "curvature is H + wd*I and the gradient has the wd*theta term; null: the one the "
        "checkpoint records (gif train writes it), else train.weight_decay for a model in "
        "memory, else 0 with a note. 0 with curvature: hessian and gradient: removal is the "
        "paper's estimator",
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
    )
    damping: float | str = _field(
        0.0,
        "lambda (see damping_form); 0: none, the weight decay already makes the Gauss-Newton "
        "system positive definite; auto: every tikhonov lambda of the damping grid from one "
        "lsqr run, chosen with the step on the validation split",
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
    damping_points: int = _field(8, "auto: lambdas on the log-spaced damping grid")
    damping_min: float = _field(1.0e-4, "auto: smallest lambda, as a multiple of sigma_max")
    damping_max: float = _field(1.0, "auto: largest lambda, as a multiple of sigma_max")

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
        out = []
        for key, choices in (
            ("method", INFLUENCE_METHODS),
            ("curvature", CURVATURES),
            ("solver", SOLVERS),
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
            elif isinstance(value, int) and value < 1:
                out.append(f"influence.{key}: must be positive, got {value}")
        if self.batch_size < 1:
            out.append(f"influence.batch_size: must be positive, got {self.batch_size}")
        if not 0 < self.budget < float("inf"):
            out.append(f"influence.budget: must be a finite number > 0, got {self.budget}")
        if self.cache_mb < 0:
            out.append(f"influence.cache_mb: must be 0 or more, got {self.cache_mb}")
        if self.tol <= 0:
            out.append(f"influence.tol: must be positive, got {self.tol}")
        if self.weight_decay is not None and self.weight_decay < 0:
            out.append(f"influence.weight_decay: must be 0 or more, got {self.weight_decay}")
        if self.retained_samples is not None and self.retained_samples < 1:
            out.append(
                f"influence.retained_samples: must be positive or null, got {self.retained_samples}"
            )
        out += self._damping_problems()
        return out + self.neumann.problems()

    def solver_options(self) -> dict:
        """Keyword arguments of the chosen solver beyond the shared ones (``neumann``'s)."""
        return dataclasses.asdict(self.neumann) if self.solver == "neumann" else {}

    def _damping_problems(self) -> list[str]:
        out = []
        if self.damping_points < 1:
            out.append(f"influence.damping_points: must be positive, got {self.damping_points}")
        if not 0 < self.damping_min <= self.damping_max:
            out.append(
                "influence.damping_min, influence.damping_max: need 0 < damping_min <= "
                f"damping_max, got {self.damping_min:g} and {self.damping_max:g}"
            )
        if not isinstance(self.damping, str):
            if not 0 <= self.damping < float("inf"):
                out.append(
                    f"influence.damping: must be a finite number >= 0 or 'auto', got {self.damping}"
                )
        elif self.damping != "auto":
            out.append(f"influence.damping: must be 'auto' or a number, got {self.damping!r}")
        else:
            if self.solver != "lsqr":
                out.append(
                    "influence.damping: 'auto' runs the lsqr regularisation path; set "
                    f"influence.solver: lsqr (got {self.solver!r}) or give a number"
                )
            if self.method == "sif":
                out.append(
                    "influence.damping: 'auto' covers the methods with one solve (gif, fif, "
                    "pif, if), not sif; give a number"
                )
        return out


@dataclass
class UpdateConfig:
    scale: float | str | None = _field(
        None,
        "the step s of the edit theta + s*delta, in units of the influence step (1.0: the "
        "Newton step of the retained objective, no search); auto: searched on the validation "
        "split; null: the task's rule, remove-class and recover-backdoor auto (their "
        "validation objectives tell steps apart, and the searched step is at least as close to "
        "retraining), remove-samples 1.0 (its validation objective cannot see the edit and "
        "would return the model unchanged; see BENCHMARKS.md, The influence step)",
    )
    grid_points: int = _field(48, "auto: points of the log-spaced scale grid")
    grid_min: float = _field(1.0e-3, "auto: smallest step, as |s*delta| / |target params|")
    grid_max: float = _field(10.0, "auto: largest step, as |s*delta| / |target params|")
    search_samples: int | None = _field(
        512,
        "auto: samples of each split the step search scores (the validation split; "
        "remove-samples also the removal set), a seeded subsample, so that the search does not "
        "grow with the data; null: all",
    )
    recalibrate_batchnorm: bool = _field(
        True,
        "re-estimate the BatchNorm running statistics of every edited model (in the step "
        "search and the output) on the Hessian sample: an edit moves the activations they "
        "describe (see BENCHMARKS.md, ResNet-18 with BatchNorm); a model without BatchNorm "
        "is unchanged; false: keep the input's statistics",
    )

    def problems(self) -> list[str]:
        out = []
        if isinstance(self.scale, str) and self.scale != "auto":
            out.append(f"update.scale: must be 'auto' or a number, got {self.scale!r}")
        if isinstance(self.scale, float) and self.scale <= 0:
            out.append(f"update.scale: must be positive, got {self.scale}")
        if not 2 <= self.grid_points <= MAX_GRID_POINTS:
            out.append(
                f"update.grid_points: must be in 2..{MAX_GRID_POINTS}, got {self.grid_points}"
            )
        if not 0 < self.grid_min < self.grid_max:
            out.append("update.grid_min, update.grid_max: need 0 < grid_min < grid_max")
        if self.search_samples is not None and self.search_samples < 1:
            out.append(
                f"update.search_samples: must be positive or null, got {self.search_samples}"
            )
        return out


@dataclass
class TrainConfig:
    epochs: int = _field(15, "training epochs")
    lr: float = _field(0.05, "SGD learning rate (cosine schedule)")
    momentum: float = _field(0.9, "SGD momentum")
    weight_decay: float = _field(5.0e-4, "SGD weight decay")
    batch_size: int = _field(128, "training batch size")
    augment: bool = _field(
        False,
        "random crop with 4 pixels of padding and horizontal flip of each training batch (the "
        "standard augmentation of 32x32 colour sets such as cifar10); false: images as they are",
    )

    def problems(self) -> list[str]:
        out = []
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                out.append(f"train.{key}: must be positive, got {getattr(self, key)}")
        if self.lr <= 0:
            out.append(f"train.lr: must be positive, got {self.lr}")
        return out


@dataclass
class MetricsConfig:
    train_samples: int | None = _field(
        None,
        "measure the *_train metrics on a seeded sample of this many training samples (for very "
        "large sets; the report says so); null: the whole training split",
    )

    def problems(self) -> list[str]:
        if self.train_samples is not None and self.train_samples < 1:
            return [f"metrics.train_samples: must be positive or null, got {self.train_samples}"]
        return []


@dataclass
class OutputConfig:
    dir: str = _field("runs/remove-class", "folder the outputs are written to")


@dataclass
class Config:
    seed: int = _field(0, "seed of every random draw (split, selection, training)")
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
    output: OutputConfig = _field(OutputConfig, "outputs")

    source: ClassVar[str] = "CONFIG"
    """The YAML file the config was read from (set by ``load_config``), for messages."""

    def problems(self) -> list[str]:
        out = _seed_problems("seed", self.seed)
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


def _seed_problems(key: str, seed: int) -> list[str]:
    return [] if 0 <= seed <= MAX_SEED else [f"{key}: must be in 0..{MAX_SEED}, got {seed}"]


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
            f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. selection.ratio=0.1"
        )
    try:
        value = safe_yaml(raw, source=f"override {text!r}") if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UsageError(
            f"override {text!r}: the value is not valid YAML ({_first_line(exc)})"
        ) from None
    except GifError as exc:
        raise UsageError(str(exc)) from None
    return key.strip().split("."), value


def safe_yaml(text: str, *, source: str) -> Any:
    """``yaml.safe_load`` within the budget of the module doc; GifError naming ``source``."""
    loader = yaml.SafeLoader(text)
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
    if not path.is_file():
        raise GifError(
            f"{path}: config file not found; pass the path of a YAML config (see configs/)"
        )
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise GifError(
                f"{path}: the config is {size:,} bytes; a config is at most "
                f"{MAX_CONFIG_BYTES:,} bytes"
            )
        raw = safe_yaml(path.read_text(), source=str(path))
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
    """``problem`` with the override that set its key, if one did."""
    key = problem.split(":", 1)[0]
    for text in overrides:
        dotted = text.partition("=")[0].strip()
        if key == dotted or key.startswith((f"{dotted}.", f"{dotted}[")):
            return f"{problem} (from the override {text!r})"
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
