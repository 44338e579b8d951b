"""Accuracies in percent, the tasks' F1 scores, and the membership-inference efficacy.

Metric names: docs/design.md, "Metrics"; each task lists its own (``Task.metric_keys``).
Everything is computed with the model in ``eval()`` mode.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from gifcli.data import Split

EVAL_BATCH = 512


def _logits(
    model: nn.Module, split: Split, *, device: torch.device, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """float32 logits [B, K] on CPU and labels [B] of each batch, the model in eval()."""
    was_training = model.training
    model.eval()
    try:
        for x, y in split.batches(batch_size, device=device):
            yield model(x).float().cpu(), y.view(-1, 1).cpu()
    finally:
        model.train(was_training)


@torch.no_grad()
def predict(
    model: nn.Module, split: Split, *, device: torch.device, batch_size: int = EVAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels [N] and the softmax probability of the given label [N], on CPU."""
    labels, true_probs = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    for logits, y in _logits(model, split, device=device, batch_size=batch_size):
        labels.append(logits.argmax(1))
        true_probs.append(logits.softmax(1).gather(1, y).squeeze(1))
    return torch.cat(labels), torch.cat(true_probs)


@torch.no_grad()
def predict_loss(
    model: nn.Module, split: Split, *, device: torch.device, batch_size: int = EVAL_BATCH
) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted labels [N] and the cross-entropy of the given label [N] (nats, float64), on
    CPU.

    The loss is taken in float64 from the logits, so confident samples keep distinct losses
    (down to about 1e-15) where their float32 probabilities all round to 1.0.
    """
    labels, losses = [torch.empty(0, dtype=torch.long)], [torch.empty(0, dtype=torch.float64)]
    for logits, y in _logits(model, split, device=device, batch_size=batch_size):
        labels.append(logits.argmax(1))
        losses.append(-logits.double().log_softmax(1).gather(1, y).squeeze(1))
    return torch.cat(labels), torch.cat(losses)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup_x |F_a(x) − F_b(x)|`` of two 1-D samples,
    in [0, 1] (0: the same empirical distribution); NaN when either is empty."""
    if a.numel() == 0 or b.numel() == 0:
        return float("nan")
    a, b = a.double().flatten().sort().values, b.double().flatten().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True).double() / len(a)
    cdf_b = torch.searchsorted(b, points, right=True).double() / len(b)
    return float((cdf_a - cdf_b).abs().max())


def ks_critical(n: int, m: int, *, alpha: float = 0.05) -> float:
    """The two-sample KS distance above which samples of sizes ``n`` and ``m`` differ at level
    ``alpha`` (the asymptotic bound ``sqrt(−ln(α/2) / 2) · sqrt((n + m) / (n m))``; 0.05:
    ``1.358 · ...``)."""
    return math.sqrt(-math.log(alpha / 2) / 2) * math.sqrt((n + m) / (n * m))


def percent(hits: torch.Tensor) -> float:
    """Mean of a boolean tensor, in percent; NaN for an empty tensor."""
    return float(hits.float().mean() * 100) if hits.numel() else float("nan")


def scalar_metrics(metrics: dict) -> dict[str, float]:
    """The scalar metrics of a task's metrics (``per_class_acc_test`` and the like left out)."""
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


def oracle_gap(after: dict, oracle: dict) -> dict[str, float]:
    """``|after − oracle|`` on every scalar metric, and their mean (``mean``)."""
    gap = {k: abs(v - oracle[k]) for k, v in scalar_metrics(after).items() if k in oracle}
    finite = [v for v in gap.values() if math.isfinite(v)]
    gap["mean"] = sum(finite) / len(finite) if finite else float("nan")
    return gap


def harmonic_mean(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def per_class_accuracy(
    predicted: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> list[float]:
    return [percent(predicted[labels == k] == k) for k in range(num_classes)]


def forget_retain(
    predicted: torch.Tensor, labels: torch.Tensor, classes: list[int]
) -> tuple[float, float]:
    """Accuracy (%) on samples of the removed classes, and on the others."""
    forget = torch.isin(labels, torch.tensor(classes))
    return percent(predicted[forget] == labels[forget]), percent(
        predicted[~forget] == labels[~forget]
    )


def remove_class_metrics(
    model: nn.Module,
    *,
    train: Split,
    test: Split,
    classes: list[int],
    num_classes: int,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """The remove-class metrics, in percent."""
    test_pred, test_prob = predict(model, test, device=device)
    train_pred, train_prob = predict(model, train, device=device)
    forget_test, retain_test = forget_retain(test_pred, test.y, classes)
    forget_train, retain_train = forget_retain(train_pred, train.y, classes)
    removed = torch.isin(train.y, torch.tensor(classes))
    retained_test = ~torch.isin(test.y, torch.tensor(classes))
    mia = mia_efficacy(
        member=train_prob[~removed],
        non_member=test_prob[retained_test],
        target=train_prob[removed],
        seed=seed,
    )
    return {
        "forget_acc_test": forget_test,
        "retain_acc_test": retain_test,
        "forget_acc_train": forget_train,
        "retain_acc_train": retain_train,
        "f1": harmonic_mean(100 - forget_test, retain_test),
        "mia_efficacy": mia,
        "acc_test": percent(test_pred == test.y),
        "per_class_acc_test": per_class_accuracy(test_pred, test.y, num_classes),
    }


def remove_samples_metrics(
    model: nn.Module,
    *,
    train: Split,
    test: Split,
    removed: torch.Tensor,
    num_classes: int,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """The remove-samples metrics, in percent. ``removed``: bool [N] over ``train``, True on
    the removal set; the membership attack's non-members are the whole test split."""
    test_pred, test_prob = predict(model, test, device=device)
    train_pred, train_prob = predict(model, train, device=device)
    hits = train_pred == train.y
    return {
        "forget_acc_train": percent(hits[removed]),
        "acc_test": percent(test_pred == test.y),
        "mia_efficacy": mia_efficacy(
            member=train_prob[~removed], non_member=test_prob, target=train_prob[removed], seed=seed
        ),
        "retain_acc_train": percent(hits[~removed]),
        "per_class_acc_test": per_class_accuracy(test_pred, test.y, num_classes),
    }


def backdoor_metrics(
    model: nn.Module,
    *,
    test: Split,
    triggered_test: Split,
    train: Split,
    poisoned: torch.Tensor,
    true_labels: torch.Tensor,
    target: int,
    num_classes: int,
    device: torch.device,
) -> dict:
    """The recover-backdoor metrics, in percent.

    ``triggered_test``: the test inputs whose true class is not ``target``, with the trigger,
    labelled with their true class. ``train`` is the poisoned training split; ``poisoned``
    indexes its poisoned samples, whose true labels are ``true_labels``.
    """
    test_pred, _ = predict(model, test, device=device)
    triggered_pred, _ = predict(model, triggered_test, device=device)
    train_pred, _ = predict(model, train, device=device)
    clean = torch.ones(len(train), dtype=torch.bool)
    clean[poisoned] = False
    clean_test = percent(test_pred == test.y)
    robust = percent(triggered_pred == triggered_test.y)
    return {
        "clean_acc_test": clean_test,
        "asr_test": percent(triggered_pred == target),
        "robust_acc_test": robust,
        "relabel_acc_train": percent(train_pred[poisoned] == true_labels),
        "corrupt_acc_train": percent(train_pred[poisoned] == target),
        "clean_acc_train": percent(train_pred[clean] == train.y[clean]),
        "f1": harmonic_mean(clean_test, robust),
        "acc_test": clean_test,
        "per_class_acc_test": per_class_accuracy(test_pred, test.y, num_classes),
    }


def mia_efficacy(
    *, member: torch.Tensor, non_member: torch.Tensor, target: torch.Tensor, seed: int = 0
) -> float:
    """Confidence-based membership inference efficacy, in percent.

    Feature: the softmax probability of the true label. An RBF SVC (C=3, gamma='auto') is
    trained on retained training samples (members) against test samples of retained classes
    (non-members), equal counts drawn with ``seed``; the score is the percentage of removal-set
    training samples (``target``) predicted non-member. A retrained model scores near 100.
    """
    from sklearn.svm import SVC

    count = min(len(member), len(non_member))
    if count == 0 or len(target) == 0:
        return float("nan")
    rng = np.random.default_rng(seed)
    # a model whose outputs overflowed (an edit at a huge step) gives NaN probabilities: it
    # shows no confidence in the true label, so they count as 0
    member, non_member, target = (
        np.nan_to_num(t.numpy(), nan=0.0) for t in (member, non_member, target)
    )
    members = member[rng.choice(len(member), count, replace=False)]
    non_members = non_member[rng.choice(len(non_member), count, replace=False)]
    features = np.concatenate([members, non_members]).reshape(-1, 1)
    labels = np.concatenate([np.ones(count), np.zeros(count)])
    classifier = SVC(C=3, gamma="auto", kernel="rbf").fit(features, labels)
    predicted = classifier.predict(target.reshape(-1, 1))
    return float((predicted == 0).mean() * 100)
