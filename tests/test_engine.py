"""The training step and six-crop prediction on a CPU: channels-last and bf16 change speed, not what is computed."""

import copy

import pytest
import torch

from raybone.core.engine import cpu_has_bf16, predict_probs, train_step
from raybone.core.loss import create_loss
from raybone.core.model import create_model
from raybone.spec import TrainConfig

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, 40, 40), dtype=torch.uint8, generator=generator)
    return images, torch.randint(0, 5, (8,), generator=generator)


def _step(model, images, labels, **settings) -> tuple[float, torch.dtype]:
    """One training step from a seeded augmentation; returns its loss and the dtype the first convolution ran in."""
    cfg = TrainConfig(model="googlenet", input_size=32, batch_size=len(labels), **settings)
    seen = []
    hook = model.conv1.conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    torch.manual_seed(1)
    loss = train_step(model, torch.optim.Adam(model.parameters(), 1e-4), create_loss("l2ce", 1.0), images, labels, cfg)
    hook.remove()
    return loss.item(), seen[0]


@pytest.mark.parametrize("amp", [True, False])
def test_training_step_runs_in_bf16_only_with_amp_on_a_cpu_that_has_it(batch, amp):
    expected = torch.bfloat16 if amp and cpu_has_bf16() else torch.float32
    loss, dtype = _step(create_model("googlenet", 5), *batch, amp=amp, channels_last=True)
    assert dtype == expected
    assert torch.isfinite(torch.tensor(loss))


def test_channels_last_trains_the_same_step(batch):
    model = create_model("googlenet", 5)
    nchw = _step(copy.deepcopy(model), *batch, amp=False, channels_last=False)[0]
    nhwc = _step(model.to(memory_format=torch.channels_last), *batch, amp=False, channels_last=True)[0]
    assert nhwc == pytest.approx(nchw, rel=1e-4)


def test_cpu_prediction_stays_fp32_whatever_the_settings(batch):
    """Validation on a CPU must score what the exported model (and its fp32 ONNX copy) predicts."""
    model = create_model("googlenet", 5).eval()
    plain = predict_probs(model, batch[0], 32, 4, CPU, amp=False, channels_last=False)
    fast = predict_probs(
        model.to(memory_format=torch.channels_last), batch[0], 32, 4, CPU, amp=True, channels_last=True
    )
    torch.testing.assert_close(torch.from_numpy(fast), torch.from_numpy(plain), atol=1e-5, rtol=0)
