"""The search-space schema: every mistake is one line naming the file and the key."""

from pathlib import Path

import pytest

from raybone.errors import SpecError
from raybone.spec import Choice, Range, load_spec

SPACES = Path(__file__).resolve().parents[1] / "search_spaces"


@pytest.mark.parametrize("path", sorted(SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_spaces_are_valid(path):
    spec = load_spec(path)
    assert spec.searched(), f"{path.name} searches nothing"
    assert spec.iterations > 0


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bogus: 1\n", "bogus"),
        ("train:\n  lrate: 0.1\n", "unknown key 'lrate'"),
        ("train:\n  model: resnet9\n", "unknown model 'resnet9'"),
        ("train:\n  loss: mse\n", "unknown loss 'mse'"),
        ("train:\n  lr: {distribution: loguniform, low: 1.0e-3, high: 1.0e-5}\n", "lr: low (0.001) must be below high"),
        ("train:\n  lr: {distribution: loguniform, low: 0, high: 1.0e-3}\n", "needs low > 0"),
        ("train:\n  lr: {distribution: cubic, low: 1, high: 2}\n", "lr.distribution"),
        ("train:\n  lr: {distribution: uniform, low: 1.0e-4, high: 5}\n", "lr"),
        ("train:\n  model: {choices: [vgg16, alexnet]}\n", "unknown model 'alexnet'"),
        ("train:\n  model: {choices: []}\n", "model.choices"),
        ("metric: val_speed\n", "metric"),
        ("scheduler: {type: hyperband}\n", "scheduler.type"),
        ("resources: {num_workers: 0}\n", "resources.num_workers"),
        ("train: {iterations: 10}\nscheduler: {grace_period: 50}\n", "grace_period (50) exceeds"),
        (
            "train: {iterations: 10, lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}}\n"
            "scheduler: {type: pbt, burn_in_period: 10}\n",
            "burn_in_period (10) is not below train.iterations (10): PBT would exploit nothing",
        ),
        ("train: [1, 2]\n", "train"),
        ("- a\n- b\n", "expected a mapping"),
        ("train: {lr: [unclosed\n", "not valid YAML"),
    ],
)
def test_schema_errors_are_one_line_and_name_file_and_key(tmp_path, text, expected):
    path = _write(tmp_path, text)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    message = str(err.value)
    assert message.startswith(str(path)), message
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="no such search-space file"):
        load_spec(tmp_path / "nope.yaml")


def test_overrides_reach_bare_hyperparameters_and_top_level(tmp_path):
    path = _write(
        tmp_path,
        "train:\n  lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-4}\n  iterations: 50\n"
        "scheduler: {type: none}\n",
    )
    spec = load_spec(path, ["lr.high=1e-3", "num_samples=64", "train.iterations=80", "model={choices: [vgg16]}"])
    assert spec.num_samples == 64
    assert spec.train["lr"] == Range(distribution="loguniform", low=1e-5, high=1e-3)
    assert spec.train["model"] == Choice(choices=["vgg16"])
    assert spec.iterations == 80


def test_override_errors(tmp_path):
    path = _write(tmp_path, "train:\n  lr: 0.001\n")
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        load_spec(path, ["lr"])
    with pytest.raises(SpecError, match="fixed value"):
        load_spec(path, ["lr.high=1e-3"])
    with pytest.raises(SpecError, match="train: lr: low"):
        load_spec(path, ["lr={distribution: loguniform, low: 1.0e-3, high: 1.0e-4}"])


def test_train_config_resolves_fixed_then_sampled(tmp_path):
    path = _write(tmp_path, "train:\n  model: vgg16\n  lr: {distribution: loguniform, low: 1.0e-5, high: 1.0e-3}\n")
    spec = load_spec(path)
    cfg = spec.train_config({"lr": 3e-4})
    assert (cfg.model, cfg.lr, cfg.batch_size) == ("vgg16", 3e-4, 32)
    assert list(spec.searched()) == ["lr"] and spec.fixed() == {"model": "vgg16"}


def test_spec_round_trips_through_its_saved_yaml(tmp_path):
    import json

    import yaml

    spec = load_spec(SPACES / "paper.yaml")
    saved = _write(tmp_path, yaml.safe_dump(json.loads(spec.model_dump_json())))
    assert load_spec(saved) == spec


@pytest.mark.parametrize(
    "metric, mode", [("val_rmse", "min"), ("val_mae_expected", "min"), ("val_top1", "max"), ("val_top2", "max")]
)
def test_the_mode_follows_the_metric(tmp_path, metric, mode):
    assert load_spec(_write(tmp_path, f"metric: {metric}\n")).mode == mode
    assert load_spec(_write(tmp_path, f"metric: {metric}\nmode: {mode}\n")).mode == mode


def test_a_mode_that_contradicts_the_metric_is_refused(tmp_path):
    path = _write(tmp_path, "metric: val_top1\nmode: min\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert str(caught.value) == (
        f"{path}: mode: min contradicts metric val_top1, which is better when higher; drop mode or set it to max"
    )


@pytest.mark.parametrize(
    "override, message",
    [
        ("num_sample=2", "--set 'num_sample=2': no key 'num_sample'; did you mean num_samples?"),
        ("lrr.high=1e-3", "--set 'lrr.high=1e-3': no key 'lrr'; did you mean lr?"),
        ("zzz=1", "--set 'zzz=1': no key 'zzz'"),
    ],
)
def test_an_unknown_override_key_is_named_as_the_users_with_the_nearest_key(override, message):
    with pytest.raises(SpecError) as raised:
        load_spec(SPACES / "quick.yaml", [override])
    assert str(raised.value) == message
