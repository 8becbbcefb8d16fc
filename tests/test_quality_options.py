"""The quality levers a search can choose: sex input, contrast jitter, class balance, readout, input size."""

import math

import pytest
import torch
from torch import nn

from raybone.core.augment import train_augment
from raybone.core.engine import resize
from raybone.core.loss import balanced_class_weights, create_loss
from raybone.spec import TrainConfig
from raybone.tuning.worker import _sampler, _Split, validate


def test_contrast_jitter_changes_exposure_only_when_asked():
    images = torch.randint(0, 256, (64, 48, 48), dtype=torch.uint8)
    torch.manual_seed(0)
    plain = train_augment(images, 40)
    torch.manual_seed(0)
    same = train_augment(images, 40, contrast=0.0)
    torch.manual_seed(0)
    jittered = train_augment(images, 40, contrast=0.4)
    assert torch.equal(plain, same)
    spread = lambda x: x.flatten(1).std(1)  # noqa: E731
    ratio = spread(jittered) / spread(plain)
    assert ratio.min() < 0.9 and ratio.max() > 1.1  # some films flatter, some harsher
    assert jittered.mean(dim=(1, 2, 3)).abs().max() < 1e-5  # still mean-subtracted


def test_balanced_class_weights_and_weighted_loss_by_hand():
    labels = torch.tensor([0, 0, 0, 1])
    weights = balanced_class_weights(labels, num_classes=3)
    assert weights.tolist() == pytest.approx([0.5, 1.5, 0.0])  # inverse frequency, mean 1 over present classes
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    target = torch.tensor([0, 1])
    ce = [math.log(1 + math.exp(-2)), math.log(2)]
    loss = create_loss("ce", class_weights=torch.tensor([1.0, 3.0]))(logits, target)
    assert loss.item() == pytest.approx((ce[0] + 3 * ce[1]) / 4)


def test_class_balanced_sampling_draws_rare_years_as_often_as_common_ones():
    labels = torch.tensor([0] * 90 + [1] * 9 + [2])
    uniform = _sampler(labels, None, 3000, seed=0)()
    balanced = _sampler(labels, balanced_class_weights(labels, 3), 3000, seed=0)()
    assert torch.bincount(labels[uniform], minlength=3)[2] < 100
    counts = torch.bincount(labels[balanced], minlength=3)
    assert counts.min() > 850 and counts.max() < 1150


def test_resize_rewarps_uint8_images():
    images = torch.full((2, 40, 40), 200, dtype=torch.uint8)
    out = resize(images, 37)
    assert out.shape == (2, 37, 37) and out.dtype == torch.uint8 and (out == 200).all()
    assert resize(images, 40) is images
    assert (
        TrainConfig(input_size=224).resize_to == 256 and TrainConfig(input_size=88, crop_fraction=0.88).resize_to == 100
    )


class _Fixed(nn.Module):
    """Always the same class probabilities: 0.5 on year 1, 0.5 on year 3."""

    def forward(self, x):
        logits = torch.full((len(x), 5), -1e4)
        logits[:, [1, 3]] = 0.0
        return logits


@pytest.mark.parametrize("readout, rmse", [("argmax", 1.0), ("expected", 0.0)])
def test_readout_decides_what_val_rmse_scores(readout, rmse):
    val = _Split(torch.randint(0, 256, (4, 40, 40), dtype=torch.uint8), torch.tensor([2, 2, 2, 2]), None)
    cfg = TrainConfig(input_size=32, readout=readout, eval_batch_size=2)
    metrics = validate(_Fixed(), val, cfg, torch.device("cpu"))
    assert metrics["val_rmse"] == pytest.approx(rmse, abs=1e-6)
    assert metrics["val_rmse_argmax"] == pytest.approx(1.0) and metrics["val_rmse_expected"] == pytest.approx(
        0.0, abs=1e-6
    )
    assert metrics["val_mae_months"] == pytest.approx(12 * metrics["val_mae"])


def test_validation_feeds_sex_to_sex_input_models():
    class BySex(nn.Module):
        def forward(self, x, sex):
            return torch.stack([sex, -sex], dim=1) * 50

    sex = torch.tensor([1.0, -1.0, 1.0])
    val = _Split(torch.zeros(3, 40, 40, dtype=torch.uint8), torch.tensor([0, 1, 0]), sex)
    metrics = validate(BySex(), val, TrainConfig(input_size=32, sex_input=True), torch.device("cpu"))
    assert metrics["val_top1"] == 1.0


def test_new_options_are_searchable_and_validated(tmp_path):
    from raybone.errors import SpecError
    from raybone.spec import load_spec

    path = tmp_path / "space.yaml"
    path.write_text(
        "scheduler: {type: none}\ntrain:\n  sex_input: {choices: [true, false]}\n"
        "  contrast: {distribution: uniform, low: 0.0, high: 0.4}\n"
        "  class_balance: {choices: [none, sampling, loss]}\n  readout: expected\n"
        "  input_size: {choices: [96, 128, 224]}\n"
    )
    spec = load_spec(path)
    assert set(spec.searched()) == {"sex_input", "contrast", "class_balance", "input_size"}
    path.write_text("train:\n  class_balance: {choices: [none, oversample]}\n")
    with pytest.raises(SpecError, match="class_balance"):
        load_spec(path)


def test_weight_averaging_follows_the_ema_formula_and_is_what_is_evaluated():
    from raybone.tuning.worker import _average, _evaluated

    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert _average(model, TrainConfig(ema=0.0)) is None and _evaluated(model, None) is model
    average = _average(model, TrainConfig(ema=0.9))
    history = []
    for step in range(3):
        with torch.no_grad():
            model[0].weight.fill_(float(step + 1))
            model[1].running_mean.fill_(float(step + 1))  # batch-norm statistics are averaged too
        average.update_parameters(model)
        history.append(float(step + 1))
    expected = history[0]  # the first update copies, each later one moves 10 % of the way
    for value in history[1:]:
        expected = 0.9 * expected + 0.1 * value
    evaluated = _evaluated(model, average)
    assert evaluated is average.module and evaluated is not model
    assert torch.allclose(evaluated[0].weight, torch.full((2, 2), expected))
    assert torch.allclose(evaluated[1].running_mean, torch.full((2,), expected))
    assert set(evaluated.state_dict()) == set(model.state_dict())  # loads into a fresh model, as export does
