"""Tiny float64 models and the dense ground truth the influence engine is checked against.

The references are built here without the engine: the Hessian by
``torch.autograd.functional.hessian`` of the risk as a function of one flat parameter vector,
the Gauss-Newton matrix from the logits' Jacobian, solutions by ``torch.linalg.lstsq`` /
``pinv``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


class TinyMLP(nn.Module):
    """6 -> 10 (tanh) -> 4: 114 parameters, smooth, indefinite Hessian away from a minimum."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class TinyCNN(nn.Module):
    """1×6×6 images -> 3 classes: conv, BatchNorm, ReLU, strided conv, dropout, linear.

    435 parameters. BatchNorm (with non-trivial running statistics) and dropout make the
    ``eval()`` requirement observable: in train mode the products would differ.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.25), nn.Linear(54, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Problem:
    """A model at ``θ̂`` with a Hessian sample and a removal set (inputs float32, model float64)."""

    model: nn.Module
    x: Tensor
    y: Tensor
    removal_x: Tensor
    removal_y: Tensor
    n_train: int

    @property
    def theta(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    @functools.cached_property
    def hessian(self) -> Tensor:
        """Dense ``H`` of the mean loss over ``(x, y)``, ``[P, P]``."""
        return dense_hessian(self.model, self.x, self.y)

    @functools.cached_property
    def removal_hessian(self) -> Tensor:
        """Dense ``H_U`` of the mean loss over the removal set."""
        return dense_hessian(self.model, self.removal_x, self.removal_y)

    @functools.cached_property
    def removal_gradient(self) -> Tensor:
        """``g = m/(n − m) · ∇L_U``."""
        m = len(self.removal_x)
        return m / (self.n_train - m) * dense_gradient(self.model, self.removal_x, self.removal_y)


def make_mlp(seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    model = TinyMLP().double()
    x, removal_x = torch.randn(40, 6), torch.randn(9, 6)
    return Problem(model, x, torch.randint(0, 4, (40,)), removal_x, torch.randint(0, 4, (9,)), 60)


def make_cnn(seed: int = 0) -> Problem:
    torch.manual_seed(seed)
    model = TinyCNN().double()
    bn = model.features[1]
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    x, removal_x = torch.randn(24, 1, 6, 6), torch.randn(6, 1, 6, 6)
    return Problem(model, x, torch.randint(0, 3, (24,)), removal_x, torch.randint(0, 3, (6,)), 40)


# --------------------------------------------------------------------------- dense references


def _as_params(model: nn.Module, theta: Tensor) -> dict[str, Tensor]:
    params, start = {}, 0
    for name, p in model.named_parameters():
        params[name] = theta[start : start + p.numel()].view_as(p)
        start += p.numel()
    return params


def _logits(model: nn.Module, theta: Tensor, x: Tensor) -> Tensor:
    model.eval()
    return functional_call(model, _as_params(model, theta), (x.to(theta.dtype),))


def risk_fn(model: nn.Module, x: Tensor, y: Tensor, scale: float = 1.0):
    """``θ ↦ scale · mean CE`` as a function of the flat parameter vector."""
    return lambda theta: scale * F.cross_entropy(_logits(model, theta, x), y)


def dense_hessian(model: nn.Module, x: Tensor, y: Tensor, scale: float = 1.0) -> Tensor:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return torch.autograd.functional.hessian(risk_fn(model, x, y, scale), theta)


def dense_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    return torch.autograd.grad(risk_fn(model, x, y)(theta), theta)[0]


def dense_ggn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``(1/N) Σ_i J_iᵀ (diag(p_i) − p_i p_iᵀ) J_i``."""
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    jac = torch.autograd.functional.jacobian(lambda t: _logits(model, t, x), theta)  # [N, C, P]
    probs = torch.softmax(_logits(model, theta, x), dim=-1)
    h_out = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)  # [N, C, C]
    return torch.einsum("ncp,ncd,ndq->pq", jac, h_out, jac) / len(x)


def damped_lstsq(a: Tensor, b: Tensor, damping: float) -> Tensor:
    """``argmin ‖A x − b‖² + λ²‖x‖²``: pinv for λ = 0, else the stacked system by lstsq."""
    if damping == 0:
        return torch.linalg.pinv(a) @ b
    stacked = torch.cat([a, damping * torch.eye(a.shape[1], dtype=a.dtype)])
    rhs = torch.cat([b, torch.zeros(a.shape[1], dtype=b.dtype)])
    return torch.linalg.lstsq(stacked, rhs.unsqueeze(1), driver="gelsd").solution.squeeze(1)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these tiny models run several times faster than with threads
    competing for shared cores. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mlp() -> Problem:
    return make_mlp()


@pytest.fixture(scope="module")
def cnn() -> Problem:
    return make_cnn()


@pytest.fixture
def reference() -> SimpleNamespace:
    """The dense ground-truth helpers, for tests (conftest functions are not importable)."""
    return SimpleNamespace(
        hessian=dense_hessian,
        gradient=dense_gradient,
        ggn=dense_ggn,
        damped_lstsq=damped_lstsq,
        relative_error=relative_error,
        risk_fn=risk_fn,
        make_mlp=make_mlp,
        make_cnn=make_cnn,
    )
