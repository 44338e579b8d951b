"""The field's unlearning baselines, for ``benchmarks/audit.py`` (not commands of the tool).

Each takes the trained model, the removal set ``U`` and the retained data and returns an
edited copy and its seconds; every one runs SGD with momentum at ``lr`` times the training
learning rate (default a tenth, as ``common.finetuned``) on CPU, one pass over the retained
data per epoch.

- **NegGrad+** (Kurmanji et al., NeurIPS 2023, "Towards unbounded machine unlearning"):
  each step descends ``β · CE(retained batch) − (1 − β) · CE(removal batch)``.
- **SalUn** (Fan et al., ICLR 2024): the saliency ``|∇θ CE(U)|`` at the trained model keeps
  the top ``ratio`` of the weights; only they are trained, one pass per epoch over ``U``
  with a random wrong label each together with the retained data.
- **l1-sparse** (Jia et al., NeurIPS 2023, "Model sparsity can simplify machine unlearning"):
  fine-tuning on the retained data with ``γ_t · ‖θ‖₁`` added, ``γ_t`` decaying linearly from
  ``γ`` to 0 over the run.
- Plain fine-tuning on the retained data: ``common.finetuned``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import torch
from common import FINETUNE_LR_FRACTION
from torch import nn
from torch.nn import functional as F

from gifcli.config import TrainConfig
from gifcli.data.splits import TensorSplit

CPU = torch.device("cpu")


def _cycle(split: TensorSplit, batch_size: int, generator: torch.Generator) -> Iterator:
    while True:
        yield from split.batches(batch_size, order=torch.randperm(len(split), generator=generator))


def _fine_tune(
    model: nn.Module,
    retained: TensorSplit,
    train: TrainConfig,
    *,
    epochs: int,
    seed: int,
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor],
    mask: dict[str, torch.Tensor] | None = None,
    lr: float = FINETUNE_LR_FRACTION,
) -> tuple[nn.Module, float]:
    """A copy of ``model`` trained ``epochs`` passes over ``retained`` (or any split) with
    ``loss(model, x, y, progress)`` (``progress`` in [0, 1)); ``mask``: the only weights
    trained. Returns it (eval mode) and the seconds."""
    tuned = copy.deepcopy(model).to(CPU).train()
    started = time.perf_counter()
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(tuned.parameters(), lr=train.lr * lr, momentum=train.momentum)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(retained) // train.batch_size)
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(retained), generator=generator)
        for x, y in retained.batches(train.batch_size, order=order):
            value = loss(tuned, x, y, step / steps)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            if mask is not None:
                for name, p in tuned.named_parameters():
                    if p.grad is not None:
                        p.grad.mul_(mask[name])
            optimizer.step()
            step += 1
    return tuned.eval(), time.perf_counter() - started


def neggrad_plus(
    model: nn.Module,
    removed: TensorSplit,
    retained: TensorSplit,
    train: TrainConfig,
    *,
    beta: float,
    epochs: int,
    seed: int,
    lr: float = FINETUNE_LR_FRACTION,
) -> tuple[nn.Module, float]:
    forget = _cycle(removed, train.batch_size, torch.Generator().manual_seed(seed + 1))

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, _: float) -> torch.Tensor:
        fx, fy = next(forget)
        return beta * F.cross_entropy(m(x), y) - (1 - beta) * F.cross_entropy(m(fx), fy)

    return _fine_tune(model, retained, train, epochs=epochs, seed=seed, loss=loss, lr=lr)


def saliency_mask(model: nn.Module, removed: TensorSplit, ratio: float) -> dict[str, torch.Tensor]:
    """1 on the ``ratio`` of all weights with the largest ``|∇θ CE(U)|``, 0 elsewhere."""
    probe = copy.deepcopy(model).to(CPU).eval()
    probe.zero_grad(set_to_none=True)
    for x, y in removed.batches(512):
        (F.cross_entropy(probe(x), y, reduction="sum") / len(removed)).backward()
    grads = {n: p.grad.abs() for n, p in probe.named_parameters() if p.grad is not None}
    flat = torch.cat([g.flatten() for g in grads.values()])
    k = max(1, int(ratio * len(flat)))
    threshold = flat.topk(k).values.min()
    return {
        n: (grads[n] >= threshold).float() if n in grads else torch.zeros_like(p)
        for n, p in probe.named_parameters()
    }


def salun(
    model: nn.Module,
    removed: TensorSplit,
    retained: TensorSplit,
    train: TrainConfig,
    *,
    ratio: float,
    epochs: int,
    seed: int,
    num_classes: int,
) -> tuple[nn.Module, float]:
    started = time.perf_counter()
    mask = saliency_mask(model, removed, ratio)
    generator = torch.Generator().manual_seed(seed + 2)
    shift = torch.randint(1, num_classes, (len(removed),), generator=generator)
    # the removal set with a random wrong label each, trained on with the retained data
    mixed = TensorSplit(
        torch.cat([removed.x, retained.x]),
        torch.cat([(removed.y + shift) % num_classes, retained.y]),
    )

    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, _: float) -> torch.Tensor:
        return F.cross_entropy(m(x), y)

    tuned, _ = _fine_tune(model, mixed, train, epochs=epochs, seed=seed, loss=loss, mask=mask)
    return tuned, time.perf_counter() - started  # the saliency pass included


def l1_sparse(
    model: nn.Module,
    retained: TensorSplit,
    train: TrainConfig,
    *,
    gamma: float,
    epochs: int,
    seed: int,
    lr: float = FINETUNE_LR_FRACTION,
) -> tuple[nn.Module, float]:
    def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> torch.Tensor:
        l1 = sum(p.abs().sum() for p in m.parameters())
        return F.cross_entropy(m(x), y) + gamma * (1 - progress) * l1

    return _fine_tune(model, retained, train, epochs=epochs, seed=seed, loss=loss, lr=lr)
