"""Model factory: torchvision VGG16 / GoogLeNet adapted to 1-channel radiographs (Chen, §4.1)."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raybone.core.catalog import MODELS
from raybone.core.inputs import sex_values
from raybone.errors import WeightsError, WeightsMismatchError, one_line

FINETUNE = ("full", "head")


@dataclass(frozen=True)
class _Arch:
    # torchvision is imported when a network is built, not with this module: the spec, the Train controller and
    # the Tune trial import it for the names alone (torchvision pulls in torch._dynamo, seconds per process).
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised 3-channel model
    imagenet: Callable[[], object]  # -> torchvision's ImageNet weights enum member
    stem: str  # first conv, rebuilt for one grey input channel
    classifier: str  # fully connected part: the only part trained with finetune="head"
    head: str  # final Linear, whose 1000 ImageNet classes are replaced by num_classes
    unused: tuple[str, ...] = ()  # checkpoint key prefixes of layers this model leaves out
    saliency: tuple[str, ...] = ()  # Grad-CAM candidate layers, deepest first


_ARCHS: dict[str, _Arch] = {
    "vgg16": _Arch(
        build=lambda n: _models().vgg16(weights=None, num_classes=n),
        imagenet=lambda: _models().VGG16_Weights.IMAGENET1K_V1,
        stem="features.0",
        classifier="classifier",
        head="classifier.6",
        saliency=("features.29", "features.22", "features.15"),  # ReLUs after conv5_3, conv4_3, conv3_3
    ),
    "googlenet": _Arch(
        build=lambda n: _models().googlenet(
            weights=None, num_classes=n, aux_logits=False, transform_input=False, init_weights=True
        ),
        imagenet=lambda: _models().GoogLeNet_Weights.IMAGENET1K_V1,
        stem="conv1.conv",
        classifier="fc",
        head="fc",
        unused=("aux1.", "aux2."),
        saliency=("inception5b", "inception4e", "inception3b"),
    ),
}
assert tuple(_ARCHS) == MODELS, "core/catalog.py names the networks model.py builds"


def _models():
    from torchvision import models

    return models


def create_model(
    name: str, num_classes: int = 20, weights: str = "none", finetune: str = "full", sex_input: bool = False
) -> nn.Module:
    """Build `name` for 1-channel input; `weights` is "none", "imagenet" or a state-dict path.

    With `sex_input` the model is called as model(images, sex) and the patient's sex joins the
    features the final layer sees (as BoneXpert and the RSNA 2017 winners use it).
    """
    _check_choice("model", name, MODELS)
    _check_choice("finetune", finetune, FINETUNE)
    arch = _ARCHS[name]
    # Fetch weights before the (slow) build so that a bad file or an offline machine fails at once.
    pretrained = None if weights == "none" else _fetch_state(name, arch, weights)
    model = arch.build(num_classes)
    model.set_submodule(arch.stem, _grey_conv(model.get_submodule(arch.stem)))
    if pretrained is not None:
        _load_pretrained(model, name, arch, *pretrained)
    if finetune == "head":
        model.requires_grad_(False)
        model.get_submodule(arch.classifier).requires_grad_(True)
    return SexConditioned(model, arch.head) if sex_input else model


def saliency_layers(model: nn.Module, name: str) -> list[nn.Module]:
    """The layers Grad-CAM may look at in model `name` (a create_model result), deepest first."""
    backbone = model.backbone if isinstance(model, SexConditioned) else model
    return [backbone.get_submodule(layer) for layer in _ARCHS[name].saliency]


class SexConditioned(nn.Module):
    """A backbone whose final layer also sees the patient's sex: +1 male, -1 female, 0 unknown."""

    def __init__(self, backbone: nn.Module, head: str):
        super().__init__()
        final = backbone.get_submodule(head)
        backbone.set_submodule(head, nn.Identity())
        self.backbone = backbone
        self.head = nn.Linear(final.in_features + 1, final.out_features)
        with torch.no_grad():  # start as the plain model: the sex column begins at zero
            self.head.weight[:, :-1].copy_(final.weight)
            self.head.weight[:, -1].zero_()
            self.head.bias.copy_(final.bias)

    def forward(self, images: torch.Tensor, sex: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return self.head(torch.cat([features, sex.to(features.dtype).unsqueeze(1)], dim=1))


def sex_feature(sex_code) -> torch.Tensor:
    """Prepared sex codes (1 male, 0 female, -1 unknown) as the model's input: +1, -1, 0."""
    return torch.from_numpy(sex_values(sex_code))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Optimizer groups: `weight_decay` on the class layer's weights (the last Linear) only, the rest undecayed.

    Adam adds the decay to the gradient before scaling it, so a weight whose own gradient is far smaller than
    weight_decay * weight is pulled to zero at the learning rate per step. VGG16's two hidden fully connected
    layers (120 M weights) are such: at the recipe's 0.1 their mean size fell from 8e-3 to 1e-5 by iteration 1,000,
    too small to pass a signal (bench/regime.py --model vgg16). GoogLeNet's only Linear is its class layer, so it
    trains as before.
    """
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p is head], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p is not head], "weight_decay": 0.0},
    ]


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of: {', '.join(choices)}")


def _grey_conv(conv: nn.Conv2d) -> nn.Conv2d:
    grey = nn.Conv2d(
        1,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        # Keep torchvision's own random init (kaiming fan-out / truncated normal): its scale does
        # not depend on the number of input channels, so one channel of it is still correct.
        grey.weight.copy_(conv.weight[:, :1])
        if conv.bias is not None:
            grey.bias.copy_(conv.bias)
    return grey


def _fetch_state(name: str, arch: _Arch, weights: str) -> tuple[dict, str]:
    """(torchvision-format state dict, where it came from, for error messages)."""
    if weights == "imagenet":
        try:
            state = arch.imagenet().get_state_dict(progress=False)
        except OSError as e:  # urllib's URLError is an OSError
            raise WeightsError(
                f"could not download ImageNet weights for {name} ({one_line(e)}); on an offline "
                "machine download them elsewhere and pass weights: /path/to/state_dict.pth, "
                "or use weights: none"
            ) from e
        return state, f"ImageNet weights {arch.imagenet().url}"
    path = Path(weights)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, unreadable or not a weights-only pickle: all mean "bad file"
        raise WeightsError(f"cannot read weights file {path}: {one_line(e)}") from e
    if not isinstance(state, dict):
        raise WeightsMismatchError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    return state, str(path)


def _load_pretrained(model: nn.Module, name: str, arch: _Arch, state: dict, source: str) -> None:
    head = f"{arch.head}."
    adapted = {k: v for k, v in state.items() if not k.startswith((head, *arch.unused))}
    stem = f"{arch.stem}.weight"
    if stem in adapted:
        # Paper §4.1: the grey filter is the average of the pretrained R, G and B filters.
        adapted[stem] = adapted[stem].mean(dim=1, keepdim=True)
    problems = _mismatches(model, adapted, skip=head)
    if problems:
        raise WeightsMismatchError(
            f"weights from {source} do not fit {name}: {len(problems)} mismatches, e.g. {'; '.join(problems[:3])}"
        )
    model.load_state_dict(adapted, strict=False)  # strict apart from the new head, checked above


def _mismatches(model: nn.Module, state: dict, skip: str) -> list[str]:
    own = {k: v.shape for k, v in model.state_dict().items() if not k.startswith(skip)}
    problems = [f"missing {k}" for k in sorted(own.keys() - state.keys())]
    problems += [f"unexpected {k}" for k in sorted(state.keys() - own.keys())]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, model has {tuple(own[k])}"
        for k in sorted(own.keys() & state.keys())
        if state[k].shape != own[k]
    ]
    return problems


def train_mode(model: nn.Module) -> nn.Module:
    """model.train(), except batch norms whose parameters are frozen (finetune: head) keep their statistics."""
    model.train()
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and params and not any(p.requires_grad for p in params):
            module.eval()
    return model
