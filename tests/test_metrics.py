import math

import pytest
import torch
from torch import nn

from gifcli.data import TensorSplit
from gifcli.metrics import (
    fidelity,
    fidelity_metrics,
    forget_retain,
    harmonic_mean,
    kl_agreement,
    ks_critical,
    ks_distance,
    mia_efficacy,
    oracle_gap,
    per_class_accuracy,
    predict,
    predict_loss,
    remove_class_metrics,
    remove_samples_metrics,
    salun_metrics,
    salun_protocol,
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


# -- fidelity to the oracle ----------------------------------------------------------------------


def logits_of(probabilities):
    return torch.tensor(probabilities, dtype=torch.float64).log()


def test_kl_and_agreement_by_hand():
    """KL(p ‖ q) = Σ p log(p/q), with 0·log 0 = 0 where the reference p gives a class no mass."""
    reference = logits_of([[0.8, 0.2], [0.1, 0.9], [1.0, 0.0]])
    model = logits_of([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
    kl, agree = kl_agreement(model, reference)
    expected = [
        0.8 * math.log(0.8 / 0.6) + 0.2 * math.log(0.2 / 0.4),
        0.1 * math.log(0.1 / 0.9) + 0.9 * math.log(0.9 / 0.1),
        math.log(2.0),
    ]
    assert kl.dtype == torch.float64
    assert kl.tolist() == pytest.approx(expected, rel=1e-12)
    assert agree.tolist() == [True, False, True]
    same, all_agree = kl_agreement(reference, reference)
    assert same.tolist() == [0.0, 0.0, 0.0] and all_agree.all()


class Doubled(nn.Module):
    """Twice the logits stored in the input: the same top-1 class, sharper distributions."""

    def forward(self, x):
        return 2 * x[:, 0, 0, :]


def test_fidelity_is_the_mean_over_batches_on_the_same_samples():
    data = split([[1.0, 0.0], [0.0, 2.0], [0.5, 0.0]], [0, 1, 0])
    cpu = torch.device("cpu")
    kl, agree = kl_agreement(2 * data.x[:, 0, 0, :], data.x[:, 0, 0, :])  # KL(Fixed ‖ Doubled)
    for batch_size in (1, 2, 512):
        mean_kl, agreement = fidelity(Doubled(), Fixed(), data, device=cpu, batch_size=batch_size)
        assert mean_kl == pytest.approx(float(kl.mean()), rel=1e-12)
        assert agreement == 100.0
    assert fidelity(Fixed(), Fixed(), data, device=cpu) == (0.0, 100.0)
    empty = fidelity(
        Fixed(), Doubled(), data.subset(torch.tensor([], dtype=torch.long)), device=cpu
    )
    assert all(math.isnan(v) for v in empty)


def test_fidelity_metrics_name_the_test_split_and_the_removal_set():
    cpu = torch.device("cpu")
    test = split([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    removed = split([[0.0, 1.0]], [1])

    class Swapped(nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :].flip(1)

    metrics = fidelity_metrics(Fixed(), Swapped(), test=test, removed=removed, device=cpu)
    assert set(metrics) == {
        "kl_oracle_test",
        "kl_oracle_removed",
        "agree_oracle_test",
        "agree_oracle_removed",
    }
    assert metrics["agree_oracle_test"] == 0.0 and metrics["agree_oracle_removed"] == 0.0
    # p = softmax(1, 0) against q = softmax(0, 1): KL = (p0 − p1)·1 = tanh(1/2)
    assert metrics["kl_oracle_test"] == pytest.approx(math.tanh(0.5), rel=1e-6)
    assert metrics["kl_oracle_removed"] == pytest.approx(math.tanh(0.5), rel=1e-6)


def test_oracle_gap_mean_leaves_the_fidelity_metrics_out():
    after = {"a": 1.0, "kl_oracle_test": 0.5, "agree_oracle_test": 90.0}
    oracle = {"a": 3.0, "kl_oracle_test": 0.0, "agree_oracle_test": 100.0}
    gap = oracle_gap(after, oracle)
    assert gap == {"a": 2.0, "kl_oracle_test": 0.5, "agree_oracle_test": 10.0, "mean": 2.0}


# -- the SalUn protocol ---------------------------------------------------------------------------


SOURCES = ("forget_acc_train", "retain_acc_train", "acc_test", "mia_efficacy")


def test_salun_protocol_reads_the_task_metrics():
    before = {
        "forget_acc_train": 100.0,
        "retain_acc_train": 100.0,
        "acc_test": 98.0,
        "mia_efficacy": 2.0,
    }
    after = {
        "forget_acc_train": 97.0,
        "retain_acc_train": 99.0,
        "acc_test": 97.5,
        "mia_efficacy": 6.0,
    }
    oracle = {
        "forget_acc_train": 95.0,
        "retain_acc_train": 100.0,
        "acc_test": 97.0,
        "mia_efficacy": 12.0,
    }
    assert salun_metrics(after, SOURCES) == {"ua": 3.0, "ra": 99.0, "ta": 97.5, "mia_efficacy": 6.0}
    protocol = salun_protocol({"before": before, "after": after, "oracle": oracle}, SOURCES)
    assert protocol["before"] == {"ua": 0.0, "ra": 100.0, "ta": 98.0, "mia_efficacy": 2.0}
    assert protocol["oracle"]["ua"] == 5.0
    # |3 − 5|, |99 − 100|, |97.5 − 97|, |6 − 12|: average (2 + 1 + 0.5 + 6) / 4
    assert protocol["gap"] == {"ua": 2.0, "ra": 1.0, "ta": 0.5, "mia_efficacy": 6.0, "mean": 2.375}
    without = salun_protocol({"before": before, "after": after, "oracle": None}, SOURCES)
    assert set(without) == {"before", "after"}
