"""Classifier-free guidance wrapper: eps = eps_u + w (eps_c - eps_u), network time input 999 t."""

import pytest
import torch

from diffdistill.diffusion import guidance, uvit

K = 5  # classes; the null label is index K


class Counting(torch.nn.Module):
    """Wraps a network and records every call's batch size, time input and labels."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, timesteps, y=None):
        self.calls.append((x.shape[0], timesteps.clone(), None if y is None else y.clone()))
        return self.net(x, timesteps, y)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = uvit.build("uvit_tiny_test", num_classes=K).eval()
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.02, 0.5, 0.97])
    y = torch.tensor([0, 3, 4])
    return model, x, t, y


def test_w1_is_exactly_conditional(setup):
    model, x, t, y = setup
    spy = Counting(model)
    with torch.no_grad():
        got = guidance.guided_noise_fn(spy, y, 1.0, null_label=K)(x, t)
        expected = model(x, 999 * t, y)
    assert torch.equal(got, expected)
    assert len(spy.calls) == 1 and spy.calls[0][0] == 3


def test_w0_is_exactly_unconditional(setup):
    model, x, t, y = setup
    with torch.no_grad():
        got = guidance.guided_noise_fn(model, y, 0.0, null_label=K)(x, t)
        expected = model(x, 999 * t, torch.full_like(y, K))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("w", [2.0, 3.5])
def test_guided_combination_in_one_batch(setup, w):
    model, x, t, y = setup
    spy = Counting(model)
    with torch.no_grad():
        got = guidance.guided_noise_fn(spy, y, w, null_label=K)(x, t)
        eps_c = model(x, 999 * t, y)
        eps_u = model(x, 999 * t, torch.full_like(y, K))
    assert torch.allclose(got, eps_u + w * (eps_c - eps_u), atol=1e-5)
    assert len(spy.calls) == 1  # one forward of batch 2B
    batch, timesteps, labels = spy.calls[0]
    assert batch == 6
    assert sorted(labels.tolist()) == sorted(y.tolist() + [K] * 3)


def test_network_gets_999_t(setup):
    model, x, t, y = setup
    spy = Counting(model)
    with torch.no_grad():
        guidance.guided_noise_fn(spy, y, 1.0, null_label=K)(x, t)
        guidance.guided_noise_fn(spy, y, 2.0, null_label=K)(x, t)
    assert torch.allclose(spy.calls[0][1], torch.tensor([19.98, 499.5, 969.03]))
    assert torch.allclose(spy.calls[1][1], torch.tensor([19.98, 499.5, 969.03] * 2))


def test_output_dtype_follows_x_under_bf16(setup):
    model, x, t, y = setup
    seen = []
    model.decoder_pred.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.no_grad():
        got = guidance.guided_noise_fn(model, y, 2.0, null_label=K, autocast_dtype=torch.bfloat16)(x, t)
        reference = guidance.guided_noise_fn(model, y, 2.0, null_label=K)(x, t)
    assert seen[0] == torch.bfloat16  # the network really ran under autocast
    assert got.dtype == x.dtype == torch.float32
    assert torch.allclose(got, reference, atol=0.1 * reference.abs().max().item())


def test_unconditional_model_without_labels():
    torch.manual_seed(1)
    model = uvit.build("uvit_tiny_test").eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.3, 0.8])
    with torch.no_grad():
        got = guidance.guided_noise_fn(model, None, 3.0)(x, t)
        expected = model(x, 999 * t)
    assert torch.equal(got, expected)


def test_guidance_needs_null_label(setup):
    model, _, _, y = setup
    with pytest.raises(Exception, match="null"):
        guidance.guided_noise_fn(model, y, 2.0, null_label=None)
