"""The training step and six-crop prediction on a CPU: channels-last changes the speed, not what is computed; bf16
autocast covers training steps only, where the CPU multiplies bf16 in hardware."""

import copy

import pytest
import torch

from raybone.core import engine
from raybone.core.engine import predict_probs, to_layout, train_step
from raybone.core.loss import create_loss
from raybone.core.model import create_model
from raybone.spec import TrainConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 40, 40), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 5, (8,), generator=generator)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("googlenet", 5)


def _conv_dtypes(model) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """The dtype each forward pass of the first convolution runs in, and the hook's handle."""
    seen = []
    return seen, model.conv1.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))


def _step(model, images, labels, optimizer=torch.optim.Adam, **settings) -> float:
    """One training step from a seeded augmentation; returns its loss."""
    cfg = TrainConfig(model="googlenet", input_size=32, batch_size=len(labels), **settings)
    torch.manual_seed(1)
    loss = train_step(model, optimizer(model.parameters(), 1e-2), create_loss("l2ce", 1.0), images, labels, cfg)
    return loss.item()


@pytest.mark.parametrize("has_bf16", [True, False])
@pytest.mark.parametrize("amp", [True, False])
def test_training_step_runs_in_bf16_only_with_amp_on_a_cpu_that_has_it(batch, model, monkeypatch, amp, has_bf16):
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: has_bf16)
    seen, hook = _conv_dtypes(model)
    loss = _step(to_layout(model, True), *batch, amp=amp, channels_last=True)
    hook.remove()
    assert seen == [torch.bfloat16 if amp and has_bf16 else torch.float32]
    assert torch.isfinite(torch.tensor(loss))


def test_cpu_prediction_stays_fp32_with_amp(batch, model, monkeypatch):
    """Validation on a CPU must score what the exported model (and its fp32 ONNX copy) predicts."""
    monkeypatch.setattr(engine, "cpu_has_bf16", lambda: True)
    seen, hook = _conv_dtypes(model)
    predict_probs(to_layout(model, True), batch[0], 32, 4, CPU, amp=True)
    hook.remove()
    assert seen and set(seen) == {torch.float32}


def test_channels_last_trains_the_same_step(batch, model):
    nchw, nhwc = copy.deepcopy(model), to_layout(model, True)
    assert nhwc.conv3.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nhwc.conv3.conv.weight.is_contiguous() and nchw.conv3.conv.weight.is_contiguous()
    # SGD moves each weight by its gradient (Adam's first step by +-lr whatever a tiny gradient's rounding).
    losses = [_step(m, *batch, torch.optim.SGD, amp=False, channels_last=cl) for m, cl in ((nchw, False), (nhwc, True))]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (name, before), after in zip(nchw.named_parameters(), nhwc.parameters(), strict=True):
        torch.testing.assert_close(after, before, atol=1e-4, rtol=0, msg=name)  # the steps move weights by ~1e-2
