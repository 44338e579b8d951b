"""gif audit: the membership computations against hand-computed cases, the reference cache's
keys, and end-to-end audits on digits (docs/design.md, "Audit")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import gifcli.audit as audit_module
from gifcli.audit import (
    ReferenceCache,
    reference_key,
    reference_seeds,
    run_audit,
    split_digest,
)
from gifcli.cli.main import app
from gifcli.config import load_config
from gifcli.data.splits import TensorSplit
from gifcli.membership import (
    DELTA,
    EPSILON_CAP,
    ReferenceFit,
    auc,
    epsilon,
    forgetting_score,
    logit_confidence,
    tpr_at_fpr,
)
from tests.conftest import DIGITS, MLP

AUDIT = [*MLP, "audit.references=6"]


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


# ------------------------------------------------------------------------------ computations


def test_logit_confidence_is_log_odds_of_the_label_and_exact_when_p_rounds_to_one():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [60.0, 0.0, 0.0]])
    y = torch.tensor([0, 2, 0])
    p = logits.double().softmax(1)[torch.arange(3), y]
    got = logit_confidence(logits, y)
    assert got.dtype == torch.float64
    assert torch.allclose(got[:2], torch.log(p[:2] / (1 - p[:2])))
    assert got[1] == pytest.approx(math.log(1 / 2))  # p = 1/3
    # p rounds to 1 in float64, yet the log-odds is 60 - log(2)
    assert got[2] == pytest.approx(60 - math.log(2), abs=1e-12)


def test_epsilon_hand_computed_and_against_every_threshold():
    rate = 0.25
    z = 0.6744897501960817  # Φ⁻¹(0.75)
    shifts = torch.tensor([0.0, 0.5, 1.0, 2 * z - 1e-9, 2 * z + 1e-3, 5.0])
    got = epsilon(shifts, min_rate=rate)
    assert got[0] == 0.0
    assert got[2] == pytest.approx(math.log((normal_cdf(1 - z) - DELTA) / rate), rel=1e-6)
    assert got[3] == pytest.approx(math.log((0.75 - DELTA) / 0.25), rel=1e-5)
    assert got[4] == EPSILON_CAP and got[5] == EPSILON_CAP
    # dense ground truth: every threshold t, positives N(d, 1) above t, negatives N(0, 1)
    for d in (0.3, 0.5, 1.0):
        best = 0.0
        for t in torch.linspace(-6, 8, 140001).tolist():
            fpr, fnr = 1 - normal_cdf(t), normal_cdf(t - d)
            if fpr >= rate and fnr >= rate:
                best = max(
                    best,
                    math.log(1 - DELTA - fpr) - math.log(fnr),
                    math.log(1 - DELTA - fnr) - math.log(fpr),
                )
        assert float(epsilon(torch.tensor([d]), min_rate=rate)) == pytest.approx(best, abs=1e-4)


def test_forgetting_score_buckets():
    # 4 "out" models: buckets of 0.5 up to ceil(log 3) = 2, worth 1, 1/2, 1/4, 1/8
    eps = torch.tensor([0.2, 0.7, 1.2, 1.7, 2.2])
    assert forgetting_score(eps, models=4) == pytest.approx((1 + 0.5 + 0.25 + 0.125) / 5)
    # 3 models: ceil(log 2) = 1, two buckets
    assert forgetting_score(torch.tensor([0.0, 0.6, 1.0]), models=3) == pytest.approx(0.5)
    assert forgetting_score(torch.tensor([0.0]), models=2) == 0.0  # two models resolve nothing


def test_auc_and_tpr_at_low_fpr_hand_computed():
    # pairs: 3>1, 3>2, 2>1, 2=2 (half): 3.5 of 4
    assert auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert auc(torch.tensor([1.0]), torch.tensor([2.0])) == 0.0
    negative = torch.arange(100) / 100  # 0.00 .. 0.99
    positive = torch.tensor([0.995, 0.985, 0.5])
    # at most one negative (1%) may reach the threshold: t in (0.98, 0.99], two of three hit
    assert tpr_at_fpr(positive, negative) == pytest.approx(200 / 3)
    assert tpr_at_fpr(torch.tensor([0.2]), torch.tensor([0.5])) == 0.0


def test_likelihood_ratio_score_and_pooled_fit():
    conf_in = torch.tensor([[0.0, 2.0], [2.0, 4.0]])  # means 1, 3; variances 2, 2
    conf_out = torch.tensor([[-1.0, 0.0], [1.0, 2.0]])  # means 0, 1; variances 2, 2
    fit = ReferenceFit.fit(conf_in, conf_out)
    assert fit.std == pytest.approx(math.sqrt(2))
    # one spread: the ratio is ((x - μ_out)² - (x - μ_in)²) / (2σ²)
    score = fit.score(torch.tensor([0.5, 3.0]))
    assert score[0] == pytest.approx(0.0)
    assert score[1] == pytest.approx(((3 - 1) ** 2 - 0) / 4)


# ------------------------------------------------------------------------------ cache keys


def test_reference_key_changes_with_recipe_data_and_seed_only():
    config = load_config(DIGITS, AUDIT)
    split = TensorSplit(torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))
    digest = split_digest(split)
    key = reference_key(config, digest, 1)
    assert key == reference_key(
        load_config(DIGITS, AUDIT), split_digest(split.subset([0, 1, 2, 3])), 1
    )
    other_x = split.x.clone()
    other_x[0, 0, 0, 0] = 1e-6
    assert split_digest(TensorSplit(other_x, split.y)) != digest
    assert split_digest(split.subset([0, 1, 2])) != digest
    assert split_digest(TensorSplit(split.x, torch.tensor([0, 1, 2, 4]))) != digest
    assert reference_key(config, digest, 2) != key
    for change in ("train.lr=0.01", "train.epochs=3", "model.kwargs={hidden: 9}"):
        assert reference_key(load_config(DIGITS, [*AUDIT, change]), digest, 1) != key
    # what does not change training leaves the key: the edit's settings, the output folder
    for same in ("influence.damping=0.5", "output.dir=elsewhere", "audit.references=8"):
        assert reference_key(load_config(DIGITS, [*AUDIT, same]), digest, 1) == key
    assert reference_seeds(config) == [1, 2, 3]


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def class_audit(tiny_mlp, tmp_path_factory) -> tuple[dict, Path]:
    """The unedited tiny MLP audited for class 3 (six references trained and cached)."""
    folder = tmp_path_factory.mktemp("audit")
    config = load_config(DIGITS, AUDIT)
    report = run_audit(config=config, checkpoint=tiny_mlp, output_dir=folder / "base-audit")
    return report, folder


@pytest.mark.slow
def test_audit_tells_the_unedited_model_from_retraining(class_audit):
    report, folder = class_audit
    refs = report["references"]
    assert (refs["count"], refs["trained"], refs["cached"]) == (6, 6, 0)
    assert Path(refs["cache"]) == folder / "references"
    assert len(list(Path(refs["cache"]).glob("*.safetensors"))) == 6
    # class 3 is remembered: every removed sample is called a member and told from retraining
    assert report["audit"]["identified"] > 95
    assert report["audit"]["forgetting_score"] < 0.1
    # each retrained reference, against the others: at chance
    assert report["retrained"]["identified"] < 5
    assert report["retrained"]["forgetting_score"] > 0.3
    out = folder / "base-audit"
    assert sorted(p.name for p in out.iterdir()) == sorted(audit_module.AUDIT_FILES.values())
    assert json.loads((out / "report.json").read_text())["audit"] == report["audit"]
    rows = (out / "samples.csv").read_text().splitlines()
    assert rows[0] == "sample,confidence,score,epsilon" and len(rows) == refs["removed"] + 1
    assert "| attack AUC" in (out / "report.md").read_text()


@pytest.mark.slow
def test_a_second_audit_reuses_the_references(class_audit, monkeypatch):
    report, folder = class_audit

    def no_training(*args, **kwargs):
        raise AssertionError("a cached reference was trained again")

    monkeypatch.setattr(audit_module, "train_model", no_training)
    # another model of the same config: one of the retrained references itself
    other = sorted(Path(report["references"]["cache"]).glob("*.safetensors"))[0]
    again = run_audit(
        config=load_config(DIGITS, AUDIT), checkpoint=other, output_dir=folder / "other"
    )
    assert (again["references"]["trained"], again["references"]["cached"]) == (0, 6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "change", ["train.lr=0.04", "data.val_fraction=0.2", "removal.classes=[4]"]
)
def test_a_changed_recipe_or_data_never_reuses_a_reference(class_audit, monkeypatch, change):
    report, folder = class_audit
    calls = []

    def counted(model, split, **kwargs):  # untrained: only the cache's decision is tested
        calls.append(split_digest(split))
        return model.eval()

    monkeypatch.setattr(audit_module, "train_model", counted)
    config = load_config(DIGITS, [*AUDIT, change])
    again = run_audit(
        config=config,
        checkpoint=Path(report["checkpoint"]),
        output_dir=folder / f"changed-{len(list(folder.iterdir()))}",
        removal_given=change.startswith("removal."),
    )
    # a new class changes both sides' data; the recipe or the split, every reference
    assert again["references"]["trained"] == len(calls) == 6


def test_cache_retrains_a_corrupt_reference(tmp_path):
    config = load_config(DIGITS, [*AUDIT, "train.epochs=1"])
    from gifcli.context import prepare

    ctx = prepare(config)
    split = TensorSplit(ctx.data.train.x[:64], ctx.data.train.y[:64])
    notes = []
    cache = ReferenceCache(tmp_path, notes.append)
    key = reference_key(config, split_digest(split), 1)
    cache.path(key).write_bytes(b"not a checkpoint")
    _, cached = cache.get(ctx, split, key, 1)
    assert not cached and notes and "retraining" in notes[0]
    _, cached = cache.get(ctx, split, key, 1)
    assert cached


@pytest.mark.slow
def test_cli_audit_checks_and_refuses_to_overwrite(class_audit, runner):
    report, folder = class_audit
    config = str(DIGITS)
    args = ["audit", config, *AUDIT, "--checkpoint", report["checkpoint"]]
    out = folder / "cli"
    result = runner.invoke(app, [*args, "-o", str(out), "--check", "audit.identified<=50"])
    assert result.exit_code == 3, result.output
    assert "audit.identified" in result.output
    result = runner.invoke(app, [*args, "-o", str(out), "--json"])
    assert result.exit_code == 1 and "--force" in result.output
    result = runner.invoke(app, [*args, "-o", str(out), "--force", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["references"]["trained"] == 0
    result = runner.invoke(app, [*args, "--check", "audit.nope>=1"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["audit", config, "audit.references=5", "-c", "x.safetensors"])
    assert result.exit_code == 1 and "audit.references" in result.output


def test_design_reads_a_streamed_split(tmp_path):
    from gifcli.audit import design
    from gifcli.data import StreamedSplit, load_dataset
    from gifcli.models import TinyNet
    from gifcli.tasks import RemoveClass
    from tests.data.test_streaming import _colour_folder, _folder_config

    _colour_folder(tmp_path)
    data = load_dataset(_folder_config(tmp_path), seed=0)
    assert isinstance(data.train, StreamedSplit)
    task = RemoveClass(classes=[0])
    model = TinyNet(in_channels=3, num_classes=2, image_size=(8, 8))
    plan = design(task, data, model, device=torch.device("cpu"), seed=0)
    forget = data.train.y == 0
    assert torch.equal(plan.removed.x, data.train.x[forget])
    assert torch.equal(plan.removed.y, data.train.y[forget])
    assert (plan.held_out.y == 0).all() and len(plan.held_out) == 4  # the test split's class 0
    assert len(plan.train_in) == len(data.train) + 4
    assert len(plan.train_out) == int((~forget).sum())


@pytest.mark.slow
def test_cli_audits_the_samples_of_a_removed_file(class_audit, runner):
    report, folder = class_audit
    result = runner.invoke(
        app,
        [
            "audit",
            str(DIGITS),
            *AUDIT,
            "-c",
            report["checkpoint"],
            "--removed",
            str(DIGITS.parent / "digits-deletion-request.txt"),
            "-o",
            str(folder / "request"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    audited = json.loads(result.stdout)
    assert (
        audited["task"] == "remove-samples" and "digits-deletion-request.txt" in audited["removal"]
    )
    assert audited["references"]["trained"] == 6  # another removal set: other references
    assert audited["references"]["removed"] == 10


def test_overflowed_outputs_count_as_no_confidence():
    from gifcli.audit import CONFIDENCE_BOUND, confidences

    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[0] = float("nan")
            return out

    split = TensorSplit(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
    got = confidences(Broken(), split, torch.device("cpu"))
    assert got[0] == -CONFIDENCE_BOUND and got[1] == pytest.approx(math.log(1 / 2))
