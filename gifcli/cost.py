"""What an edit costs, against one retraining of the same model: the report's ``cost`` block,
and the budget that sizes the solve before it runs.

Work is counted in *sample passes*: one forward and backward pass of one sample is 1. A
Hessian-vector product over a sample and a forward pass of a sample are converted to passes
by measurement (``Rates``: one gradient, one forward and a few training steps, timed on
batches of the same data and device). The commands measure them once per machine and model
and keep them in a cache file (``rates_cache``), so that the ratio a ``--check`` gates on,
``retrain_ratio`` (the edit's passes over one retraining's: ``train.epochs ×`` the retrained
samples training steps), is the same on every rerun of an edit whatever the machine's load,
and no edit but the first pays for the timing. A training step of a sample counts
``train / gradient`` passes (about two), so the ratio estimates the share of a retraining's
time the edit's work takes at this machine's rates. ``seconds_ratio`` is the edit's seconds
over one retraining's estimated from the timed training steps: information, since it follows
the load.

The budget (``influence.hessian_samples`` / ``max_iter: auto``) works in passes with fixed
conversion factors, so the same config always gives the same edit. See docs/design.md, "Cost".
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from gifcli.config import DampingPath, InfluenceConfig, StepSearch, TrainConfig, UpdateConfig
from gifcli.data import Split
from gifcli.errors import GifError
from gifcli.influence.hvp import CURVATURES_BY_NAME, CurvatureOperator, curvature_kind
from gifcli.records import BudgetRecord, CostRecord, RetrainRecord

BUDGET_LADDER: tuple[tuple[int, int], ...] = (
    (64, 3),
    (128, 5),
    (256, 5),
    (512, 5),
    (1024, 5),
    (2048, 5),
    (1024, 20),
)
"""(Hessian samples, iterations) from cheapest to dearest: the budget takes the dearest rung
that fits. Chosen from the cost-quality frontier (BENCHMARKS.md, "Cost against retraining"):
beyond 5 iterations a larger Hessian sample buys more than more iterations; the top rung is
the solve the tool used before the budget."""
HVP_PASSES: dict[str, float] = {name: c.passes for name, c in CURVATURES_BY_NAME.items()}
"""Sample passes of one curvature product over one sample, for the budget, per
``influence.curvature`` (each ``Curvature``'s ``passes``)."""
FORWARD_PASSES = 0.2
"""Sample passes of one forward pass of one sample, for the budget (measured likewise)."""
STEP_PASSES = 2.0
"""Sample passes of one training step of one sample (forward, backward, optimiser), for the
budget: a retraining is ``train.epochs × samples × STEP_PASSES`` passes, the unit of the
reports' ``cost.retrain_ratio``, which takes it from the measured rates
(``retrain.step_passes``); at the lower end of what they measure, so the prediction errs on
the dear side."""


TIMED_TRAINING_STEPS = 3


@dataclass
class Rates:
    """Seconds per sample on this device: a gradient (forward + backward), a forward pass,
    and a training step (forward, backward, optimiser) at the config's training batch size."""

    gradient: float
    forward: float
    train: float
    hvp: float
    """Seconds per sample of one curvature product (the Hessian's double backward, or the
    Gauss-Newton product through the kept graph)."""

    @property
    def forward_passes(self) -> float:
        return self.forward / self.gradient

    @property
    def step_passes(self) -> float:
        """A training step of one sample (train mode, optimiser), in sample passes."""
        return self.train / self.gradient

    @property
    def hvp_passes(self) -> float:
        return self.hvp / self.gradient


def _timed(run, repeats: int = 1) -> float:
    run()  # warm-up: allocations, kernels, lazy initialisation
    started = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - started) / repeats


@dataclass(frozen=True)
class Probe:
    """How the rates are timed: the training settings (a training step's batch size, momentum,
    learning rate and weight decay), the batch size of the gradient, forward pass and
    curvature product, the device, and the curvature and HVP path of the product."""

    train: TrainConfig
    batch_size: int
    device: torch.device
    curvature: str = "hessian"
    hvp_mode: str = "double-backward"


def measure_rates(model: nn.Module, sample: Split, probe: Probe) -> Rates:
    """Time one gradient, one forward pass and one curvature product (by ``hvp_mode``, once
    its batch is cached, as a solve's later products run) over a batch of ``sample``
    (``batch_size``) and ``TIMED_TRAINING_STEPS`` training steps as ``gif train`` takes them
    (train mode, a batch of ``train.batch_size``, forward, backward and the momentum update,
    computed into scratch tensors). ``model`` is left exactly as it was: its parameters are
    not updated and its buffers (BatchNorm statistics) are restored. The optimiser object
    itself is not used: its first construction imports torch's compiler, seconds that no edit
    needs."""
    if len(sample) == 0:
        raise GifError(
            "removal: no retained training sample is left to measure on or to take the "
            "Hessian sample from; remove fewer samples"
        )
    train, device = probe.train, probe.device
    params = [p for p in model.parameters() if p.requires_grad]
    x, y = _batch(sample, probe.batch_size, device)
    train_x, train_y = _batch(sample, train.batch_size, device)
    momenta = [torch.zeros_like(p) for p in params]

    def gradient() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    operator = CurvatureOperator(
        model=model,
        x=x,
        y=y,
        batch_size=len(y),
        curvature=probe.curvature,
        hvp_mode=probe.hvp_mode,
    )
    direction = torch.ones(operator.dim, dtype=operator.dtype, device=operator.device)

    def product() -> None:
        operator.matvec(direction)

    def training_step() -> None:
        grads = torch.autograd.grad(F.cross_entropy(model(train_x), train_y), params)
        with torch.no_grad():
            for p, g, m in zip(params, grads, momenta, strict=True):
                m.mul_(train.momentum).add_(g).add_(p, alpha=train.weight_decay)
                torch.add(p, m, alpha=-train.lr)

    buffers = [b.clone() for b in model.buffers()]
    was_training = model.training
    model.train()
    try:
        step = _timed(training_step, TIMED_TRAINING_STEPS) / len(train_y)
    finally:
        model.train(was_training)
        with torch.no_grad():
            for b, saved in zip(model.buffers(), buffers, strict=True):
                b.copy_(saved)
    return Rates(
        gradient=_timed(gradient, 2) / len(y),
        forward=_timed(forward, 2) / len(y),
        train=step,
        hvp=_timed(product) / len(y),
    )


def rates_cache() -> Path:
    """The cache file of measured rates: ``$XDG_CACHE_HOME/gif/rates.json`` (by default
    ``~/.cache/gif/rates.json``). Delete it to measure again."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "gif" / "rates.json"


def cached_rates(
    cache: Path | None, model: nn.Module, sample: Split, probe: Probe
) -> tuple[Rates, bool]:
    """``measure_rates``, once per machine and model: the rates ``cache`` holds under this
    device, torch version, model (its class and every parameter's and buffer's shape), input
    shape, batch sizes, curvature and HVP path, else measured now and stored there. Returns
    the rates and whether they came from the cache; ``cache`` None: always measured, nothing
    stored. A cache that cannot be read or written is measured around, never an error."""
    if cache is None:
        return measure_rates(model, sample, probe), False
    key = _rates_key(model, sample, probe)
    entries = _read_cache(cache)
    try:
        return Rates(**entries[key]), True
    except (KeyError, TypeError):
        rates = measure_rates(model, sample, probe)
    entries[key] = asdict(rates)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache.parent, prefix=f".{cache.name}.")
        with os.fdopen(fd, "w") as file:
            json.dump(entries, file, indent=1, sort_keys=True)
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only home: the next edit measures again
    return rates, False


def _read_cache(cache: Path) -> dict:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _rates_key(model: nn.Module, sample: Split, probe: Probe) -> str:
    """What the rates depend on: the machine, torch, the model's shape, the batches, the
    curvature product."""
    device = probe.device
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    else:
        machine = f"{_cpu_name()} x{torch.get_num_threads()} threads"
    shapes = [
        (name, tuple(t.shape), str(t.dtype))
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    ]
    described = repr((type(model).__module__, type(model).__qualname__, shapes))
    model_hash = hashlib.sha256(described.encode()).hexdigest()[:16]
    inputs = tuple(sample.inputs.shape[1:])
    mode = f" {probe.hvp_mode}" if curvature_kind(probe.curvature).takes_hvp_mode else ""
    return (
        f"{device.type}:{machine}|torch {torch.__version__}|{model_hash}|inputs {inputs}|"
        f"batch {probe.batch_size}|train batch {probe.train.batch_size}|{probe.curvature}{mode}"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _batch(sample: Split, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` samples of ``sample`` (repeated when it holds fewer), on ``device``."""
    rows = torch.arange(max(1, size)) % len(sample)
    return sample.take(rows).to(device), sample.y[rows].to(device)


@contextmanager
def counted_forwards(model: nn.Module) -> Iterator[list[int]]:
    """Count the samples ``model``'s forward sees inside the block (``count[0]``)."""
    count = [0]

    def hook(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor):
            count[0] += int(args[0].shape[0])

    handle = model.register_forward_pre_hook(hook)
    try:
        yield count
    finally:
        handle.remove()


class Stages:
    """The seconds and sample passes of an edit's stages, each recorded by ``with
    stages.timed(name):`` around its work. A stage whose work is not forward passes (a
    gradient, a solve) has its passes set by the caller."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.passes: dict[str, float] = {}

    @contextmanager
    def timed(
        self, name: str, *, model: nn.Module | None = None, forward_passes: float = 1.0
    ) -> Iterator[None]:
        """Time the block as stage ``name``; with ``model``, also count the samples its forward
        sees in the block, each ``forward_passes`` sample passes."""
        started = time.perf_counter()
        with counted_forwards(model) if model is not None else nullcontext([0]) as forwards:
            yield
        self.seconds[name] = time.perf_counter() - started
        if model is not None:
            self.passes[name] = forwards[0] * forward_passes


def plan_budget(
    influence: InfluenceConfig,
    update: UpdateConfig,
    *,
    retrain_passes: float,
    fixed_passes: float,
    validation: int,
    products: Callable[[int], int],
) -> BudgetRecord:
    """The Hessian sample and iterations of the solve: the config's numbers, or (``auto``) the
    dearest rung of ``BUDGET_LADDER`` whose predicted passes fit ``influence.budget`` of one
    retraining (always at least the cheapest rung). ``retrain_passes``: ``train.epochs ×``
    retrained samples (each a training step of ``STEP_PASSES``); ``fixed_passes``: the
    selection and the right-hand side; ``validation``: samples of the validation split the step
    search scores; ``products(iterations)``: the curvature products of the estimator's solve
    run to ``iterations`` (``Estimator.products``)."""
    step, damping = update.step, influence.damping_setting
    evaluations = step.points if isinstance(step, StepSearch) else 1
    if isinstance(damping, DampingPath):
        evaluations *= damping.points
    fixed = fixed_passes + FORWARD_PASSES * evaluations * validation

    def predicted(samples: int, iterations: int) -> float:
        return fixed + HVP_PASSES[influence.curvature] * samples * products(iterations)

    retraining = retrain_passes * STEP_PASSES
    allowed = influence.budget * retraining

    def sized(rung: tuple[int, int]) -> tuple[int, int]:
        return _given(influence.hessian_samples, rung[0]), _given(influence.max_iter, rung[1])

    chosen = BUDGET_LADDER[0]
    for rung in BUDGET_LADDER[1:]:  # dearer rungs predict more passes: stop at the first over
        if predicted(*sized(rung)) > allowed:
            break
        chosen = rung
    samples, iterations = sized(chosen)
    auto = "auto" in (influence.hessian_samples, influence.max_iter)
    return BudgetRecord(
        fraction=influence.budget,
        hessian_samples=samples,
        max_iter=iterations,
        chosen_by="budget" if auto else "config",
        predicted_passes=predicted(samples, iterations),
        allowed_passes=allowed,
        predicted_ratio=predicted(samples, iterations) / retraining,
    )


def _given(value: int | str, auto: int) -> int:
    """``value`` of a key that is a number or ``auto``."""
    return int(value) if isinstance(value, int) else auto


def retrain_record(*, epochs: int, samples: int, rates: Rates) -> RetrainRecord:
    """One retraining of the model: ``epochs × samples`` sample passes (the budget's unit),
    each a training step of ``rates.step_passes`` passes; seconds from the timed steps."""
    return RetrainRecord(
        epochs=epochs,
        samples=samples,
        passes=float(epochs * samples),
        step_passes=rates.step_passes,
        seconds=epochs * samples * rates.train,
        seconds_per_sample=rates.train,
        timed_steps=TIMED_TRAINING_STEPS,
    )


def cost_record(
    *,
    stages: Stages,
    rates: Rates,
    retrain: RetrainRecord,
    budget: BudgetRecord,
    rates_cached: bool = False,
) -> CostRecord:
    """The ``cost`` block: the edit is every stage but ``metrics`` (the evaluation, which a
    retraining would need as well)."""
    seconds, passes = stages.seconds, stages.passes
    edit_seconds = sum(v for k, v in seconds.items() if k != "metrics")
    edit_passes = sum(v for k, v in passes.items() if k != "metrics")
    return CostRecord(
        seconds={**seconds, "edit": edit_seconds},
        passes={**passes, "edit": edit_passes},
        hvp_passes=rates.hvp_passes,
        forward_passes=rates.forward_passes,
        gradient_seconds_per_sample=rates.gradient,
        rates_cached=rates_cached,
        retrain=retrain,
        retrain_ratio=_ratio(edit_passes, retrain.passes * retrain.step_passes),
        seconds_ratio=_ratio(edit_seconds, retrain.seconds),
        budget=budget,
    )


def _ratio(edit: float, retrain: float) -> float | None:
    return edit / retrain if retrain > 0 else None


def with_load(cost: CostRecord, seconds: float) -> CostRecord:
    """``cost`` with the seconds of loading the model and data (a run from a config) counted
    in the edit, and the seconds ratio to retraining updated."""
    edit_seconds = cost.seconds["edit"] + seconds
    return replace(
        cost,
        seconds={"load": seconds, **cost.seconds, "edit": edit_seconds},
        seconds_ratio=_ratio(edit_seconds, cost.retrain.seconds),
    )
