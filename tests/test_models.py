"""Model registry: every architecture builds and runs; normalisation lives inside the model."""

from __future__ import annotations

import pytest
import torch

from iaat.errors import ConfigError
from iaat.models import MODELS, NormalizedModel, build_model

BIG = {"wideresnet", "wrn-32-10", "wrn-34-10"}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def wrn34():
    torch.manual_seed(0)
    return build_model("wrn-34-10", 10, 3).eval()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_images_to_logits(name, wrn34):
    torch.manual_seed(0)
    model = wrn34 if name == "wrn-34-10" else build_model(name, 10, 3, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    assert isinstance(model, NormalizedModel)
    batch = 1 if name in BIG else 2
    x = torch.rand(batch, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (batch, 10) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(MODELS) - BIG))
def test_small_models_train_step_and_input_gradient(name):
    """Train mode on a batch of two works and the input gradient (what attacks need) is non-zero."""
    torch.manual_seed(0)
    model = build_model(name, 7, 3).train()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    out = model(x)
    assert out.shape == (2, 7)
    out[:, 0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("hw", [8, 5, 4])
def test_small_cnn_single_channel_small_images(hw):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, in_channels=1, width=8).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 1, hw, hw))
    assert out.shape == (2, 10)
    with pytest.raises(RuntimeError):  # a 3-channel image does not fit a 1-channel stem
        model(torch.rand(2, 3, hw, hw))


def test_small_cnn_width_sets_the_size():
    sizes = [_params(build_model("small_cnn", 10, 3, width=w)) for w in (8, 16, 32)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert _params(build_model("small_cnn", 10, 3)) == sizes[2]  # default width 32


@pytest.mark.parametrize("name", ["small_cnn", "resnet18", "preact_resnet18"])
@pytest.mark.parametrize("channels", [1, 3])
def test_normalisation_is_inside_the_model(name, channels):
    mean, std = CIFAR_MEAN[:channels], CIFAR_STD[:channels]
    torch.manual_seed(0)
    normalised = build_model(name, 10, channels, mean=mean, std=std).eval()
    torch.manual_seed(0)
    plain = build_model(name, 10, channels).eval()
    x = torch.rand(2, channels, 32, 32)
    pre = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        a, b = normalised(x), plain(pre)
        assert not torch.allclose(plain(x), b, atol=1e-3)  # normalising does change the output
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # mean/std are buffers: saved with the weights, not trained.
    state = normalised.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.tensor(std))
    assert all("normalize" not in n for n, _ in normalised.named_parameters())


def test_without_mean_std_the_model_sees_raw_pixels():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 3).eval()
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x))


@pytest.mark.parametrize("mean, std, channels, message", [
    ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7), 3, "divide both by 255"),  # 0-255 statistics
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), 3, r"std in \(0, 1\]"),
    ((0.5, 0.5), (0.2, 0.2), 3, "2 values for 3-channel images"),
    ((0.5, 0.5, 0.5), (0.2,), 3, "1 values for 3-channel|got 3 and 1"),
    (("a", 0.5, 0.5), (0.2, 0.2, 0.2), 3, "sequence of numbers"),
])
def test_normalisation_constants_that_cannot_be_right_are_refused(mean, std, channels, message):
    with pytest.raises(ConfigError, match=message):
        build_model("small_cnn", 10, channels, mean=mean, std=std)


def test_an_input_with_other_channels_than_the_normalisation_is_refused():
    model = NormalizedModel(torch.nn.Flatten(), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    with pytest.raises(ConfigError, match=r"normalises 3-channel images .B, 3, H, W., got input of shape \(2, 1, 8, 8\)"):
        model(torch.rand(2, 1, 8, 8))
    one = NormalizedModel(torch.nn.Flatten(), (0.5,), (0.25,))  # one value for every channel
    assert one(torch.rand(2, 3, 4, 4)).shape == (2, 48)


@pytest.mark.parametrize("name", ["resnet34", "WRN-34-10", "", "small-cnn"])
def test_unknown_model_raises_config_error(name):
    with pytest.raises(ConfigError, match="unknown model") as info:
        build_model(name, 10)
    assert "small_cnn" in str(info.value)  # lists the known names


def test_wrn_34_10_has_about_46m_parameters(wrn34):
    assert 45e6 <= _params(wrn34) <= 47e6


def test_wideresnet_defaults_to_wrn_34_10(wrn34):
    torch.manual_seed(0)
    default = build_model("wideresnet", 10, 3)
    assert _params(default) == _params(wrn34)
    torch.manual_seed(0)
    small = build_model("wideresnet", 10, 3, depth=16, width=2)
    assert _params(small) < 1e6


def test_wrn_32_10_has_five_blocks_per_stage_as_documented(wrn34):
    torch.manual_seed(0)
    wrn32 = build_model("wrn-32-10", 10, 3)
    assert len(wrn32.net.blocks) == len(wrn34.net.blocks) == 15


def test_the_names_of_one_wideresnet_are_one_architecture():
    """--init-from compares architectures: WRN-32-10 and WRN-34-10 build the same network."""
    from iaat.models.registry import architecture

    names = [("wrn-32-10", None, None), ("wrn-34-10", None, None), ("wideresnet", None, None),
             ("wideresnet", 32, None), ("wideresnet", 34, 10)]
    assert {architecture(*n) for n in names} == {("wideresnet", 34, 10)}
    assert architecture("wideresnet", 28, 10) != architecture("wideresnet", 34, 10)


@pytest.mark.parametrize("name, num_classes, sizes, phrase", [
    ("small_cnn", 0, {}, "num_classes must be a whole number >= 2"),  # once: Linear(128, 0) and a torch warning
    ("resnet18", 1, {}, "num_classes must be a whole number >= 2"),
    ("wideresnet", 10, {"depth": 11, "width": 1}, r"depth is 6n \+ 4 .* got 11"),  # once: one block per stage
    ("wideresnet", 10, {"depth": 4, "width": 1}, r"depth is 6n \+ 4 .* got 4"),
    ("wideresnet", 10, {"depth": 33, "width": 1}, r"depth is 6n \+ 4 .* got 33")])
def test_sizes_that_build_another_network_than_named_are_refused(name, num_classes, sizes, phrase):
    with pytest.raises(ConfigError, match=phrase):
        build_model(name, num_classes, 3, **sizes)


def test_wideresnet_depths_of_the_form_6n_plus_4_build_n_blocks_per_stage():
    from iaat.models.wide_resnet import WideResNet

    for depth, blocks in ((10, 1), (16, 2), (28, 4), (32, 5)):  # 32: the literature's name of WRN-34
        assert len(WideResNet(depth, 1, 10).blocks) == 3 * blocks
    with pytest.raises(ConfigError, match="width .* must be >= 1, got 0"):
        WideResNet(16, 0, 10)
    with pytest.raises(ConfigError, match="num_classes must be a whole number >= 2"):  # the registry's check
        WideResNet(16, 1, 10.0)


def test_a_wideresnet_depth_of_another_form_is_refused_with_the_config():
    from iaat.config import config_from_dict

    with pytest.raises(ConfigError, match=r"depth is 6n \+ 4"):
        config_from_dict({"model": {"name": "wideresnet", "depth": 11}})
