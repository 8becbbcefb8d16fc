import socket

import pytest
import torch
import torchvision
from torch import nn

from raybone.core.model import MODELS, create_model, parameter_groups
from raybone.errors import WeightsError

# (first conv weight, final classifier layer prefix, fully connected part prefix) per model
LAYOUT = {
    "vgg16": ("features.0.weight", "classifier.6.", "classifier."),
    "googlenet": ("conv1.conv.weight", "fc.", "fc."),
}
TORCHVISION_BUILDERS = {
    "vgg16": lambda: torchvision.models.vgg16(weights=None),
    "googlenet": lambda: torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True),
}


@pytest.fixture(scope="module")
def saved_weights(tmp_path_factory):
    """Fake torchvision checkpoints (3-channel, 1000 classes, as torchvision saves them)."""
    folder = tmp_path_factory.mktemp("weights")
    paths = {}
    for name, build in TORCHVISION_BUILDERS.items():
        paths[name] = folder / f"{name}.pth"
        torch.save(build().state_dict(), paths[name])
    return paths


@pytest.fixture(scope="module")
def random_models():
    return {name: create_model(name, num_classes=7) for name in MODELS}


@pytest.fixture
def short_socket_timeout():
    # Offline, DNS fails at once; where a firewall drops packets instead, don't wait minutes.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(previous)


@pytest.mark.parametrize("name", MODELS)
def test_local_weights_average_rgb_filters_and_replace_head(name, saved_weights):
    stem, head, _ = LAYOUT[name]
    saved = torch.load(saved_weights[name], weights_only=True)
    loaded = create_model(name, num_classes=5, weights=str(saved_weights[name])).state_dict()

    assert loaded[stem].shape[1] == 1
    torch.testing.assert_close(loaded[stem], saved[stem].mean(dim=1, keepdim=True))
    assert loaded[f"{head}weight"].shape[0] == 5 and loaded[f"{head}bias"].shape == (5,)
    for key, value in loaded.items():
        if key != stem and not key.startswith(head):
            assert torch.equal(value, saved[key]), key


@pytest.mark.parametrize("name", MODELS)
def test_forward_one_channel_64px(name, random_models):
    model = random_models[name]
    assert model.training  # GoogLeNet must return plain logits, not aux outputs, while training
    with torch.no_grad():
        assert model(torch.randn(2, 1, 64, 64)).shape == (2, 7)


@pytest.mark.parametrize("name", MODELS)
def test_finetune_head_trains_only_fully_connected_layers(name):
    _, _, classifier = LAYOUT[name]
    model = create_model(name, num_classes=3, finetune="head")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(classifier) for n in trainable)
    assert len(trainable) < len(list(model.parameters()))


@pytest.mark.parametrize(
    ("name", "sex_input", "head"),
    [("vgg16", False, "classifier.6.weight"), ("googlenet", False, "fc.weight"), ("vgg16", True, "head.weight")],
)
def test_parameter_groups_decay_only_the_class_layer(name, sex_input, head):
    # VGG16's hidden fully connected layers are left undecayed: Adam's coupled decay zeroed them (bench/regime.py).
    model = create_model(name, num_classes=3, sex_input=sex_input)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, rest = parameter_groups(model, weight_decay=0.01)

    assert decay["weight_decay"] == 0.01 and rest["weight_decay"] == 0.0
    assert [names[id(p)] for p in decay["params"]] == [head]
    assert len(decay["params"]) + len(rest["params"]) == len(names)


def test_adam_with_weight_decay_keeps_vgg16_hidden_layers():
    # Adam adds the decay to the gradient before scaling it: where it outweighs a weight's own gradient, as in
    # VGG16's 25088 x 4096 layer, each step moves the weight lr towards zero (8e-3 on average at the start).
    torch.manual_seed(0)
    model = create_model("vgg16", num_classes=3)
    optimizer = torch.optim.Adam(parameter_groups(model, weight_decay=0.1), lr=1e-3)
    hidden = model.classifier[0].weight
    start = hidden.detach().abs().mean()
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(torch.randn(2, 1, 32, 32)), torch.tensor([0, 2]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert hidden.detach().abs().mean() > 0.5 * start


def test_parameter_groups_skip_frozen_parameters():
    model = create_model("googlenet", num_classes=3, finetune="head")
    decay, rest = parameter_groups(model, weight_decay=0.1)
    assert decay["params"] == [model.fc.weight] and rest["params"] == [model.fc.bias]


def test_imagenet_offline_without_cache_explains_fix(tmp_path, monkeypatch, short_socket_timeout):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    fix = "could not download ImageNet weights for vgg16.*weights: none"
    with pytest.raises(WeightsError, match=fix):
        create_model("vgg16", weights="imagenet")


def test_missing_or_unreadable_file_names_it(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    for path in (tmp_path / "missing.pth", garbage):
        with pytest.raises(WeightsError, match=path.name):
            create_model("googlenet", weights=str(path))


def test_weights_of_another_model_are_rejected(saved_weights):
    with pytest.raises(WeightsError, match="vgg16.pth.*do not fit googlenet"):
        create_model("googlenet", weights=str(saved_weights["vgg16"]))


def test_unknown_choices_list_valid_ones():
    with pytest.raises(ValueError, match="vgg16, googlenet"):
        create_model("resnet50")
    with pytest.raises(ValueError, match="full, head"):
        create_model("googlenet", finetune="last")


def test_train_mode_keeps_frozen_batch_norm_statistics():
    from raybone.core.model import train_mode

    model = create_model("googlenet", num_classes=5, finetune="head")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = norms[0].running_mean.clone()
    train_mode(model)(torch.rand(2, 1, 64, 64))
    assert model.fc.training and not any(m.training for m in norms)
    assert torch.equal(norms[0].running_mean, before)
    full = train_mode(create_model("googlenet", num_classes=5, finetune="full"))
    assert all(m.training for m in full.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("name", MODELS)
def test_sex_input_reaches_the_final_layer(name):
    from raybone.core.model import sex_feature

    torch.manual_seed(0)
    model = create_model(name, num_classes=5, sex_input=True).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        model.head.weight[:, -1] = torch.arange(5.0)
        male, female = model(images, sex_feature([1, 1])), model(images, sex_feature([0, 0]))
    # Only the sex column differs: logits shift by twice its weights, class by class.
    assert torch.allclose(male - female, 2 * torch.arange(5.0).expand(2, 5), atol=1e-5)
    assert sex_feature([1, 0, -1]).tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(TypeError):
        model(images)


def test_sex_conditioned_model_starts_as_the_plain_one():
    torch.manual_seed(0)
    plain = create_model("googlenet", num_classes=5).eval()
    torch.manual_seed(0)
    conditioned = create_model("googlenet", num_classes=5, sex_input=True).eval()
    images = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(plain(images), conditioned(images, torch.tensor([1.0, -1.0])), atol=1e-5)
