import math

import pytest
import torch
from torch import nn

from gifcli.data import TensorSplit
from gifcli.metrics import (
    forget_retain,
    harmonic_mean,
    ks_critical,
    ks_distance,
    mia_efficacy,
    oracle_gap,
    per_class_accuracy,
    predict,
    predict_loss,
    remove_class_metrics,
    remove_samples_metrics,
)


class Fixed(nn.Module):
    """Predicts the logits stored in the input itself (x[:, 0, 0, :])."""

    def forward(self, x):
        return x[:, 0, 0, :]


def split(logits, labels):
    return TensorSplit(
        x=torch.tensor(logits, dtype=torch.float32).view(len(labels), 1, 1, -1),
        y=torch.tensor(labels),
    )


def test_predict_returns_labels_and_true_label_probabilities():
    data = split([[2.0, 0.0], [0.0, 0.0]], [0, 1])
    labels, probs = predict(Fixed(), data, device=torch.device("cpu"), batch_size=1)
    assert labels.tolist() == [0, 0]
    assert probs[0].item() == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    assert probs[1].item() == pytest.approx(0.5)


def test_forget_retain_and_per_class():
    predicted = torch.tensor([0, 1, 1, 2, 2, 0])
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    assert forget_retain(predicted, labels, [2]) == (50.0, 75.0)
    assert per_class_accuracy(predicted, labels, 4)[:3] == [100.0, 50.0, 50.0]
    assert math.isnan(per_class_accuracy(predicted, labels, 4)[3])


def test_harmonic_mean():
    assert harmonic_mean(100, 100) == 100
    assert harmonic_mean(0, 100) == 0
    assert harmonic_mean(50, 100) == pytest.approx(200 / 3)


def test_mia_efficacy_flags_low_confidence_removal_samples_as_non_members():
    generator = torch.Generator().manual_seed(0)
    member = 0.95 + 0.05 * torch.rand(200, generator=generator)
    non_member = 0.3 + 0.6 * torch.rand(200, generator=generator)
    forgotten = 0.3 + 0.3 * torch.rand(50, generator=generator)
    remembered = 0.97 + 0.03 * torch.rand(50, generator=generator)
    assert mia_efficacy(member=member, non_member=non_member, target=forgotten) >= 95
    assert mia_efficacy(member=member, non_member=non_member, target=remembered) <= 5


def test_remove_class_metrics_on_a_fixed_model():
    train = split([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], [0, 1, 2, 2])
    test = split([[5, 0, 0], [0, 5, 0], [5, 0, 0]], [0, 1, 2])
    metrics = remove_class_metrics(
        Fixed(), train=train, test=test, classes=[2], num_classes=3, device=torch.device("cpu")
    )
    assert metrics["forget_acc_test"] == 0.0 and metrics["retain_acc_test"] == 100.0
    assert metrics["forget_acc_train"] == 50.0 and metrics["retain_acc_train"] == 100.0
    assert metrics["f1"] == 100.0
    assert metrics["acc_test"] == pytest.approx(200 / 3)


def test_oracle_gap_is_absolute_with_a_mean():
    gap = oracle_gap({"a": 1.0, "b": 5.0, "per_class": [1]}, {"a": 3.0, "b": 4.0})
    assert gap == {"a": 2.0, "b": 1.0, "mean": 1.5}


def test_mia_counts_nan_probabilities_as_no_confidence():
    member = torch.tensor([0.99, 0.98, float("nan"), 0.97] * 5)
    non_member = torch.tensor([0.2, float("nan"), 0.1, 0.3] * 5)
    target = torch.full((6,), float("nan"))
    score = mia_efficacy(member=member, non_member=non_member, target=target)
    assert score == 100.0, "no confidence at all looks like a non-member"


def test_predict_loss_is_the_cross_entropy_and_keeps_confident_samples_apart():
    data = split([[2.0, 0.0], [0.0, 0.0], [20.0, 0.0], [30.0, 0.0]], [0, 1, 0, 0])
    labels, losses = predict_loss(Fixed(), data, device=torch.device("cpu"), batch_size=3)
    _, probs = predict(Fixed(), data, device=torch.device("cpu"))
    assert labels.tolist() == [0, 0, 0, 0]
    logits = data.x[:, 0, 0, :].double()
    expected = nn.functional.cross_entropy(logits, data.y, reduction="none")
    assert torch.allclose(losses, expected, rtol=1e-12, atol=0)
    assert torch.allclose(torch.exp(-losses[:2]).float(), probs[:2])
    assert probs[2] == probs[3] == 1.0  # float32 softmax cannot tell them apart
    assert losses[2] > losses[3] > 0  # the loss can


def test_ks_distance_equals_scipy_with_and_without_ties():
    from scipy.stats import ks_2samp

    generator = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(50, generator=generator), torch.randn(80, generator=generator) + 0.3),
        (
            torch.randint(0, 5, (40,), generator=generator).float(),
            torch.randint(0, 7, (30,)).float(),
        ),
        (torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])),
        (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])),
    ]
    for a, b in pairs:
        assert ks_distance(a, b) == pytest.approx(ks_2samp(a.numpy(), b.numpy()).statistic)
    assert math.isnan(ks_distance(torch.tensor([]), torch.tensor([1.0])))


def test_ks_critical_is_the_asymptotic_5_percent_bound():
    from scipy.special import kolmogi

    for n, m in [(65, 144), (13, 144), (1000, 1000)]:
        # the one-term bound differs from the exact quantile by about 2e-6 relative
        expected = kolmogi(0.05) * math.sqrt((n + m) / (n * m))
        assert ks_critical(n, m) == pytest.approx(expected, rel=1e-5)
    assert ks_critical(65, 144) == pytest.approx(0.2029, abs=1e-4)


def test_remove_samples_metrics_on_a_fixed_model():
    train = split([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], [0, 1, 2, 2])
    test = split([[5, 0, 0], [0, 5, 0], [5, 0, 0]], [0, 1, 2])
    removed = torch.tensor([False, False, True, True])
    metrics = remove_samples_metrics(
        Fixed(), train=train, test=test, removed=removed, num_classes=3, device=torch.device("cpu")
    )
    assert metrics["forget_acc_train"] == 50.0 and metrics["retain_acc_train"] == 100.0
    assert metrics["acc_test"] == pytest.approx(200 / 3)
    assert metrics["per_class_acc_test"] == [100.0, 100.0, 0.0]
    assert 0 <= metrics["mia_efficacy"] <= 100
    assert "f1" not in metrics
