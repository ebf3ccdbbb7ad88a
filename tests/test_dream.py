"""Activation maximization on a tiny CNN, and the Gaussian blur it uses against a dense 2-D reference."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD
from actindex.kernels.blur import gaussian_blur, gaussian_kernel1d, high_frequency_energy
from actindex.kernels.errors import UserError
from actindex.query.dream import DreamConfig, DreamResult, clip_small_contribution, clip_small_norm, dream

SIZE = 40
FAST = DreamConfig(parameterization="pixel", steps=12, input_size=SIZE, jitter=2, blur_every=4)


def tiny_cnn() -> nn.Module:
    """conv1 -> ReLU -> conv2 (stride 2) -> BN -> ReLU -> conv3 -> mean -> fc; fixed random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            relu1=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1),
            bn=nn.BatchNorm2d(16),
            relu2=nn.ReLU(inplace=True),
            conv3=nn.Conv2d(16, 16, 3, padding=1),
            pool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(),
            fc=nn.Linear(16, 10),
        ))
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_cnn()


def run(model: nn.Module, layer: str | None = "conv3", unit: int = 3, **settings: object) -> DreamResult:
    return dream(model, layer, unit, IMAGENET_MEAN, IMAGENET_STD, replace(FAST, **settings))


def as_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255


# --------------------------------------------------------------------------------------------------
# Blur


def dense_reference(x: torch.Tensor, sigma: float, mode: str = "reflect") -> torch.Tensor:
    """2-D Gaussian built here from its formula, applied as one dense depthwise convolution."""
    radius = math.ceil(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    kernel = torch.exp(-(yy**2 + xx**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).float()  # (K, K)
    channels = x.shape[1]
    padded = F.pad(x, (radius,) * 4, mode=mode)
    return F.conv2d(padded, kernel.expand(channels, 1, -1, -1), groups=channels)


def test_kernel_is_normalized_symmetric_with_default_radius() -> None:
    for sigma in (0.5, 0.8, 1.0, 2.3):
        kernel = gaussian_kernel1d(sigma)
        assert kernel.numel() == 2 * math.ceil(3 * sigma) + 1
        assert float(kernel.sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.equal(kernel, kernel.flip(0))
        assert int(kernel.argmax()) == kernel.numel() // 2
    assert gaussian_kernel1d(1.0, radius=1).numel() == 3
    assert torch.equal(gaussian_kernel1d(0.0), torch.ones(1))


def test_blur_matches_dense_reference_with_reflect_padding() -> None:
    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(1))
    for sigma in (0.5, 1.0, 1.7):
        torch.testing.assert_close(gaussian_blur(x, sigma), dense_reference(x, sigma), atol=1e-5, rtol=1e-5)


def test_blur_falls_back_to_replicate_on_tiny_images() -> None:
    x = torch.rand(1, 2, 2, 2, generator=torch.Generator().manual_seed(2))  # radius 3 > 2 px: cannot reflect
    torch.testing.assert_close(gaussian_blur(x, 1.0), dense_reference(x, 1.0, mode="replicate"))


def test_blur_keeps_constant_images_and_sigma_zero_is_identity() -> None:
    x = torch.full((1, 3, 9, 12), 0.37)
    blurred = gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape
    torch.testing.assert_close(blurred, x)
    assert float(blurred.mean()) == pytest.approx(0.37, abs=1e-6)
    assert gaussian_blur(x, 0.0) is x


def test_high_frequency_energy() -> None:
    noise = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    before, after = high_frequency_energy(noise), high_frequency_energy(gaussian_blur(noise, 1.0))
    assert before.shape == (2,)
    assert (after < 0.7 * before).all()
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    checkerboard = ((y + x) % 2).expand(1, 3, 32, 32)  # Nyquist on both axes: radial frequency sqrt(2)
    smooth = torch.cos(2 * math.pi * x / 32).expand(1, 3, 32, 32) + 5  # one cycle per image
    assert float(high_frequency_energy(checkerboard)[0]) == pytest.approx(1.0)
    assert float(high_frequency_energy(smooth)[0]) == pytest.approx(0.0, abs=1e-9)
    assert float(high_frequency_energy(torch.full((1, 3, 8, 8), 0.5))[0]) == 0.0


# --------------------------------------------------------------------------------------------------
# Dream


def test_same_seed_same_image_other_seed_other_image(model: nn.Module) -> None:
    first, again, other = run(model), run(model), run(model, seed=1)
    assert first.image.shape == (SIZE, SIZE, 3) and first.image.dtype == np.uint8
    assert np.array_equal(first.image, again.image)
    assert first.history == again.history and first.activation == again.activation
    assert not np.array_equal(first.image, other.image)


# A 3x3 conv1 unit reads a different patch under each jitter offset, and the tiny net's logits barely react to
# the blurred low frequencies: both are checked without those regularizers.
@pytest.mark.parametrize(("objective", "layer", "unit", "settings"), [
    ("center", "conv3", 3, {}),
    ("mean", "conv3", 5, {}),
    ("center", "conv1", 0, {"jitter": 0}),
    ("logit", None, 7, {"jitter": 0, "blur_every": 0, "lr": 0.3}),
])
def test_objective_rises(model: nn.Module, objective: str, layer: str | None, unit: int,
                         settings: dict[str, object]) -> None:
    result = run(model, layer, unit, objective=objective, **settings)
    assert len(result.history) == FAST.steps
    if settings.get("jitter") == 0:  # no shift: the first step reads the initial image
        assert result.history[0] == pytest.approx(result.start_activation, abs=1e-6)
    assert result.activation > result.start_activation + 0.3 * abs(result.start_activation)


def test_objectives_read_the_right_value(model: nn.Module) -> None:
    """The start value of each objective equals the matching number of a plain forward pass."""
    generator = torch.Generator().manual_seed(FAST.seed)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (torch.randn((1, 3, SIZE, SIZE), generator=generator) * 0.1).clamp((0 - mean) / std, (1 - mean) / std)
    with torch.no_grad():
        features = model[:6](x)  # conv3's output (1, 16, 20, 20)
        logits = model(x)
    assert run(model, "conv3", 2, steps=0).start_activation == pytest.approx(float(features[0, 2, 10, 10]))
    assert run(model, "conv3", 2, objective="mean", steps=0).start_activation == pytest.approx(
        float(features[0, 2].mean()))
    assert run(model, None, 4, objective="logit", steps=0).start_activation == pytest.approx(float(logits[0, 4]))


def test_pixels_stay_in_range_and_blur_lowers_high_frequencies(model: nn.Module) -> None:
    settings = dict(steps=12, lr=0.3, jitter=0, l2_decay=0.0)
    sharp = run(model, "conv3", 1, blur_every=0, **settings)
    smooth = run(model, "conv3", 1, blur_every=1, blur_sigma=1.0, **settings)
    assert sharp.image.min() == 0 and sharp.image.max() == 255  # a large step reaches the clamp at both ends
    hf_sharp = float(high_frequency_energy(as_tensor(sharp.image))[0])
    hf_smooth = float(high_frequency_energy(as_tensor(smooth.image))[0])
    assert hf_smooth < 0.5 * hf_sharp


def test_l2_decay_shrinks_towards_the_mean_colour(model: nn.Module) -> None:
    free = run(model, l2_decay=0.0)
    decayed = run(model, l2_decay=0.3)
    mean_colour = np.round(np.array(IMAGENET_MEAN) * 255)
    assert np.abs(decayed.image - mean_colour).mean() < np.abs(free.image - mean_colour).mean()


@pytest.mark.parametrize("option", ["clip_norm_percentile", "clip_contribution_percentile"])
def test_clipping_sets_the_expected_fraction_to_the_mean_colour(model: nn.Module, option: str) -> None:
    """Clipped pixels are 0 in normalized space: exactly the mean colour. The "mean" objective moves every
    pixel, so no other pixel stays at the mean colour by chance."""
    mean_colour = np.round(np.array(IMAGENET_MEAN) * 255).astype(np.uint8)
    assert (run(model, objective="mean", lr=0.3).image == mean_colour).all(axis=2).sum() == 0
    result = run(model, objective="mean", lr=0.3, **{option: 30.0})
    assert (result.image == mean_colour).all(axis=2).sum() == round(0.3 * SIZE * SIZE)


def test_clip_helpers_zero_exactly_the_smallest() -> None:
    x = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(1, 3, 10, 10, generator=torch.Generator().manual_seed(6))
    clipped = clip_small_norm(x, 25.0)
    zeroed = (clipped == 0).all(dim=1).flatten()
    assert int(zeroed.sum()) == 25
    norms = x.norm(dim=1).flatten()
    assert float(norms[zeroed].max()) < float(norms[~zeroed].min())
    assert torch.equal(clipped[0, :, ~zeroed.view(10, 10)], x[0, :, ~zeroed.view(10, 10)])
    contribution = (x * grad).sum(dim=1).abs().flatten()
    zeroed = (clip_small_contribution(x, grad, 10.0) == 0).all(dim=1).flatten()
    assert int(zeroed.sum()) == 10
    assert float(contribution[zeroed].max()) < float(contribution[~zeroed].min())
    assert clip_small_norm(x, 0.0) is x


def test_global_rng_untouched(model: nn.Module) -> None:
    state = torch.get_rng_state()
    run(model, seed=11)
    assert torch.equal(torch.get_rng_state(), state)


def test_model_flags_restored_and_eval_mode_during_run() -> None:
    model = tiny_cnn().train()
    model.conv1.weight.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    running_mean = model.bn.running_mean.clone()
    seen: list[bool] = []
    model.conv3.register_forward_pre_hook(lambda module, _inputs: seen.append(module.training))
    run(model, "conv3", 0)
    assert seen and not any(seen)  # eval mode throughout
    assert torch.equal(model.bn.running_mean, running_mean)  # a training-mode BN would have updated it
    assert model.training and model.bn.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks for m in model.modules())


def test_unknown_layer_lists_valid_names(model: nn.Module) -> None:
    with pytest.raises(UserError, match=r"unknown layer 'conv4'; did you mean .*conv[13].*valid layers: conv1, relu1"):
        run(model, "conv4", 0)


def test_unit_out_of_range(model: nn.Module) -> None:
    with pytest.raises(UserError, match=r"^unit 16 is out of range: conv3 has 16 units \(0-15\)$"):
        run(model, "conv3", 16)
    with pytest.raises(UserError, match=r"unit -1 is out of range: conv1 has 8 units \(0-7\)"):
        run(model, "conv1", -1)
    with pytest.raises(UserError, match=r"unit 600 is out of range: the model output has 10 units \(0-9\)"):
        run(model, None, 600, objective="logit")
    assert no_hooks_left(model)


def test_bad_settings(model: nn.Module) -> None:
    with pytest.raises(UserError, match="leave the layer unset"):
        run(model, "conv3", 0, objective="logit")
    with pytest.raises(UserError, match="needs a layer"):
        run(model, None, 0)
    with pytest.raises(UserError, match="unknown objective 'max'"):
        run(model, objective="max")
    with pytest.raises(UserError, match="clip_norm_percentile must lie in"):
        run(model, clip_norm_percentile=100.0)
    assert no_hooks_left(model)


# --------------------------------------------------------------------------------------------------
# Fourier parameterization, directions, negative objectives, diverse batches

FOURIER = replace(FAST, parameterization="fourier", steps=16, jitter=2)


def fourier(model: nn.Module, layer: str | None = "conv3", unit: int = 3, **settings: object) -> DreamResult:
    return dream(model, layer, unit, IMAGENET_MEAN, IMAGENET_STD, replace(FOURIER, **settings))


@pytest.mark.parametrize("parameterization", ["fourier", "maco"])
def test_fourier_is_seeded_deterministic_and_leaves_the_global_rng(model: nn.Module, parameterization: str) -> None:
    state = torch.get_rng_state()
    first, again, other = (fourier(model, parameterization=parameterization, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), state)
    assert first.image.shape == (SIZE, SIZE, 3) and first.image.dtype == np.uint8
    assert np.array_equal(first.image, again.image) and first.history == again.history
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("parameterization", ["fourier", "maco"])
@pytest.mark.parametrize(("objective", "layer", "unit", "gain"), [
    ("center", "conv3", 3, 0.3), ("mean", "conv3", 5, 0.3), ("logit", None, 7, 0.01)])
def test_fourier_objective_rises(model: nn.Module, objective: str, layer: str | None, unit: int, gain: float,
                                 parameterization: str) -> None:
    """The tiny net's logits hardly react to the smooth images a sigmoid-bounded 1/f spectrum makes: a smaller
    gain for them, and a run the other way must fall."""
    if parameterization == "maco":  # its image keeps a fixed magnitude and a zero mean: a unit's mean moves less
        gain /= 2
    result = fourier(model, layer, unit, objective=objective, steps=24, parameterization=parameterization)
    assert result.activation > result.start_activation + gain * abs(result.start_activation)
    lowered = fourier(model, layer, unit, objective=objective, steps=24, negative=True,
                      parameterization=parameterization)
    assert lowered.activation < lowered.start_activation - gain * abs(lowered.start_activation)


def test_a_direction_is_the_weighted_sum_of_its_units(model: nn.Module) -> None:
    """Same seed, same initial image: the direction's start value is the weighted sum of each unit's."""
    direction = ((2, 0.5), (5, -1.0), (9, 2.0))
    for parameterization in ("pixel", "fourier", "maco"):
        for objective in ("center", "mean"):
            settings = dict(parameterization=parameterization, objective=objective, steps=0)
            combined = run(model, "conv3", 0, direction=direction, **settings).start_activation
            parts = sum(w * run(model, "conv3", u, **settings).start_activation for u, w in direction)
            assert combined == pytest.approx(parts, rel=1e-5, abs=1e-6)
    logits = run(model, None, 0, objective="logit", direction=((1, 1.0), (4, 3.0)), steps=0).start_activation
    assert logits == pytest.approx(run(model, None, 1, objective="logit", steps=0).start_activation
                                   + 3 * run(model, None, 4, objective="logit", steps=0).start_activation, rel=1e-5)
    with pytest.raises(UserError, match=r"unit 16 is out of range: conv3 has 16 units"):
        run(model, "conv3", 0, direction=((16, 1.0),))


@pytest.mark.parametrize("parameterization", ["pixel", "fourier"])
def test_negative_lowers_the_objective(model: nn.Module, parameterization: str) -> None:
    result = run(model, "conv3", 3, parameterization=parameterization, negative=True, steps=16)
    assert result.activation < result.start_activation - 0.3 * abs(result.start_activation)


def test_a_diverse_batch_differs_more_than_an_independent_one(model: nn.Module) -> None:
    from actindex.kernels.featurevis import gram_dissimilarity

    def spread(result: DreamResult) -> float:
        x = torch.stack([as_tensor(image)[0] for image in result.images])  # (B, 3, S, S)
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        with torch.no_grad():
            return float(gram_dissimilarity(model[:6](x)))

    plain = fourier(model, batch=3, steps=24)
    diverse = fourier(model, batch=3, steps=24, diversity=5.0)
    assert len(diverse.images) == len(diverse.activations) == 3 and diverse.image is diverse.images[0]
    assert spread(diverse) > 1.5 * spread(plain)


def test_new_settings_are_checked(model: nn.Module) -> None:
    with pytest.raises(UserError, match="unknown parameterization 'wavelet'"):
        run(model, parameterization="wavelet")
    with pytest.raises(UserError, match="batch must be at least 1"):
        run(model, batch=0)
    with pytest.raises(UserError, match="diversity must not be negative"):
        run(model, diversity=-1.0)


def test_a_32_pixel_model_dreams_with_a_jitter_in_proportion() -> None:
    """Small-input models (lucent issue 10): the default jitter scales with the input (1 px at 32, 8 at 224), and
    a CIFAR-sized network's unit and logit rise in both parameterizations."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        small = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(3, 16, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, stride=2, padding=1),
            relu2=nn.ReLU(), conv3=nn.Conv2d(32, 32, 3, stride=2, padding=1), relu3=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(32, 10))).eval()
    assert DreamConfig(input_size=32).shift == 1 and DreamConfig().shift == 8 and DreamConfig(jitter=3).shift == 3
    for parameterization in ("fourier", "pixel", "maco"):
        config = DreamConfig(parameterization=parameterization, input_size=32, steps=30)
        unit = dream(small, "conv3", 4, IMAGENET_MEAN, IMAGENET_STD, config)
        assert unit.image.shape == (32, 32, 3)
        assert unit.activation > unit.start_activation + 0.3 * abs(unit.start_activation), parameterization
        logit = dream(small, None, 2, IMAGENET_MEAN, IMAGENET_STD, replace(config, objective="logit"))
        assert logit.activation > logit.start_activation, parameterization
