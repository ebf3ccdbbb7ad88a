"""Feature-visualization primitives (`kernels.featurevis`): the Fourier parametrization against numpy's FFT and
lucid's formulas, colour decorrelation against lucid's matrix and np.cov, the MACO image against its own
spectrum, random transforms for determinism and gradients, and the Gram diversity against a plain double loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from actindex.kernels.featurevis import (
    IMAGENET_COLOR_SQRT,
    average_magnitude,
    colour_covariance,
    decorrelated_to_rgb,
    decorrelation_matrix,
    fourier_image,
    fourier_init,
    gram_dissimilarity,
    maco_image,
    random_transform,
    rfft2d_freqs,
    spectrum_scale,
)

SIZES = [(7, 9), (8, 8), (9, 6), (1, 5)]


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- Fourier parametrization -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_rfft2d_freqs_is_the_radial_frequency_of_each_bin(height: int, width: int) -> None:
    expected = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    freqs = rfft2d_freqs(height, width)
    assert freqs.shape == (height, width // 2 + 1) and freqs.dtype == torch.float32
    np.testing.assert_allclose(freqs.numpy(), expected, rtol=1e-6, atol=0)


def test_spectrum_scale_follows_lucids_formula() -> None:
    """lucent's `fft_image` scale, 1 / max(f, 1 / max(H, W)) ** decay with an orthonormal inverse FFT (lucid's
    TensorFlow code multiplies by sqrt(H·W) because its inverse FFT is not normalized: the same image)."""
    height, width = 6, 10
    scale = spectrum_scale(height, width).double()
    assert scale.shape == (6, 6) and spectrum_scale(height, width).dtype == torch.float32
    root = 1.0
    assert scale[0, 0].item() == pytest.approx(root * max(height, width), rel=1e-6)  # DC: f clamped to 1 / 10
    assert scale[0, 1].item() == pytest.approx(root / 0.1, rel=1e-6)  # f = 1/10 sits exactly at the floor
    assert scale[1, 0].item() == pytest.approx(root * 6, rel=1e-6)  # f = 1/6
    assert scale[3, 5].item() == pytest.approx(root / math.sqrt(0.5**2 + 0.5**2), rel=1e-6)  # both Nyquist
    squared = spectrum_scale(height, width, decay_power=2.0).double()
    assert squared[2, 3].item() == pytest.approx(root / (1 / 3**2 + 0.3**2), rel=1e-6)
    flat = spectrum_scale(height, width, decay_power=0.0)
    torch.testing.assert_close(flat, torch.full((6, 6), root, dtype=torch.float32))


@pytest.mark.parametrize(("batch", "height", "width"), [(2, 7, 9), (3, 8, 8), (1, 9, 6), (2, 224, 224)])
def test_fourier_image_equals_numpy(batch: int, height: int, width: int) -> None:
    spectrum = fourier_init(batch, height, width, sd=0.5, generator=generator(0))
    assert spectrum.shape == (batch, 3, height, width // 2 + 1, 2) and spectrum.dtype == torch.float32
    image = fourier_image(spectrum, height, width)
    assert image.shape == (batch, 3, height, width) and image.dtype == torch.float32
    values = spectrum.double().numpy()
    scale = spectrum_scale(height, width).double().numpy()
    expected = np.fft.irfft2((values[..., 0] + 1j * values[..., 1]) * scale, s=(height, width), norm="ortho") / 4
    np.testing.assert_allclose(image.numpy(), expected, rtol=0, atol=1e-5 * max(1.0, np.abs(expected).max()))


def test_fourier_image_is_differentiable_and_init_is_seeded() -> None:
    spectrum = fourier_init(2, 8, 6, generator=generator(1)).requires_grad_()
    assert spectrum.is_leaf and torch.equal(spectrum, fourier_init(2, 8, 6, generator=generator(1)))
    assert not torch.equal(spectrum, fourier_init(2, 8, 6, generator=generator(2)))
    assert spectrum.std().item() == pytest.approx(0.01, rel=0.25)
    fourier_image(spectrum, 8, 6)[:, 0, 3, 2].sum().backward()
    assert spectrum.grad is not None and spectrum.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="spectrum"):
        fourier_image(spectrum.detach(), 8, 8)


def test_fourier_init_leaves_the_global_generator_alone() -> None:
    state = torch.random.get_rng_state()
    first = fourier_init(1, 4, 4)
    assert torch.equal(first, fourier_init(1, 4, 4))  # None: a fresh default-seeded generator, deterministic
    assert torch.equal(torch.random.get_rng_state(), state)


# --- colour decorrelation --------------------------------------------------------------------------------------


def random_covariance(seed: int) -> torch.Tensor:
    a = torch.randn(3, 3, generator=generator(seed), dtype=torch.float64)
    return a @ a.T + 0.05 * torch.eye(3, dtype=torch.float64)


@pytest.mark.parametrize("name", ["imagenet", "random"])
def test_decorrelation_matrix_is_a_normalized_square_root(name: str) -> None:
    sqrt = IMAGENET_COLOR_SQRT.double()
    covariance = sqrt @ sqrt.T if name == "imagenet" else random_covariance(3)
    matrix = decorrelation_matrix(covariance)
    assert matrix.shape == (3, 3) and matrix.dtype == torch.float32
    assert matrix.double().norm(dim=0).max().item() == pytest.approx(1.0, abs=1e-6)
    # S's columns are orthogonal with norms sqrt(eigenvalue), so the largest column norm removed is sqrt(λ_max)
    largest = torch.linalg.eigvalsh(covariance).max().sqrt()
    root = matrix.double() * largest
    torch.testing.assert_close(root @ root.T, covariance, rtol=0, atol=1e-5 * covariance.abs().max().item())


def test_decorrelation_matrix_reproduces_lucids_normalized_matrix() -> None:
    lucid = IMAGENET_COLOR_SQRT.double()
    normalized = lucid / lucid.norm(dim=0).max()  # lucid's color_correlation_normalized
    matrix = decorrelation_matrix(lucid @ lucid.T).double()
    # a square root is unique only up to a rotation, so compare M Mᵀ; lucid's matrix is rounded to two decimals,
    # so its columns are not quite orthogonal and its largest column norm² (0.21340) is not quite λ_max
    # (0.213404): the two normalizations differ by 2e-5 relative
    torch.testing.assert_close(matrix @ matrix.T, normalized @ normalized.T, rtol=0, atol=2e-5)
    assert (matrix[:, 0] > 0).all()  # first column: luminance, positive, as lucid's


def test_colour_covariance_equals_numpy() -> None:
    pixels = torch.randint(0, 256, (3, 3, 5, 7), generator=generator(4), dtype=torch.uint8)
    pixels[:, 1] = (pixels[:, 0] // 2 + pixels[:, 1] // 2)  # correlate green with red
    covariance = colour_covariance(pixels)
    assert covariance.shape == (3, 3) and covariance.dtype == torch.float64
    samples = pixels.numpy().transpose(1, 0, 2, 3).reshape(3, -1) / 255.0
    np.testing.assert_allclose(covariance.numpy(), np.cov(samples), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(colour_covariance(pixels.double() / 255), covariance)


def test_decorrelated_to_rgb_equals_einsum_and_sigmoid() -> None:
    x = torch.randn(2, 3, 5, 4, generator=generator(5)) * 3
    matrix = decorrelation_matrix(IMAGENET_COLOR_SQRT @ IMAGENET_COLOR_SQRT.T)
    rgb = decorrelated_to_rgb(x, matrix)
    assert rgb.shape == x.shape and rgb.dtype == torch.float32
    assert (rgb > 0).all() and (rgb < 1).all()
    expected = 1 / (1 + np.exp(-np.einsum("ij,bjhw->bihw", matrix.double().numpy(), x.double().numpy())))
    np.testing.assert_allclose(rgb.numpy(), expected, rtol=0, atol=1e-6)
    # one pixel by hand: rgb = matrix @ x
    pixel = torch.sigmoid(matrix @ x[1, :, 2, 3])
    torch.testing.assert_close(rgb[1, :, 2, 3], pixel)


# --- MACO ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(8, 8), (7, 9), (16, 10)])
def test_maco_image_is_standardized_and_keeps_the_magnitude(height: int, width: int) -> None:
    bins = width // 2 + 1
    magnitude = torch.rand(3, height, bins, generator=generator(6)) + 0.1
    phase = (torch.rand(2, 3, height, bins, generator=generator(7)) * 2 - 1) * math.pi
    image = maco_image(phase, magnitude, height, width)
    assert image.shape == (2, 3, height, width) and image.dtype == torch.float32
    torch.testing.assert_close(image.mean(dim=(1, 2, 3)), torch.zeros(2), rtol=0, atol=1e-6)
    torch.testing.assert_close(image.std(dim=(1, 2, 3), correction=0), torch.ones(2), rtol=0, atol=1e-5)
    # Standardizing subtracts a constant (only the DC bin changes) and divides by a number per image, so
    # |rfft2(image)| / magnitude is one constant per image. Only the columns 0 < kx < W / 2 hold free
    # coefficients: the irfft2 of the DC column (and the Nyquist column of an even width) keeps only its
    # Hermitian-symmetric part, so those columns do not come back as they went in.
    interior = slice(1, (width - 1) // 2 + 1)
    ratio = torch.fft.rfft2(image.double(), norm="ortho").abs()[..., interior] / magnitude.double()[..., interior]
    per_image = ratio.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(ratio, per_image.expand_as(ratio), rtol=1e-4, atol=0)


def test_maco_image_is_differentiable_in_the_phase() -> None:
    magnitude = torch.rand(3, 6, 4, generator=generator(8))
    phase = torch.rand(1, 3, 6, 4, generator=generator(9)).requires_grad_()
    maco_image(phase, magnitude, 6, 6)[0, 1, 2, 3].backward()
    assert phase.grad is not None and phase.grad.abs().sum() > 0


def test_average_magnitude_is_the_mean_spectrum_without_dc() -> None:
    pixels = torch.randint(0, 256, (4, 3, 6, 7), generator=generator(10), dtype=torch.uint8)
    magnitude = average_magnitude(pixels)
    assert magnitude.shape == (3, 6, 4) and magnitude.dtype == torch.float32
    values = pixels.numpy() / 255.0
    centred = values - values.mean(axis=(2, 3), keepdims=True)
    expected = np.abs(np.fft.rfft2(centred, norm="ortho")).mean(axis=0)
    np.testing.assert_allclose(magnitude.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert magnitude[:, 0, 0].abs().max() < 1e-6
    torch.testing.assert_close(average_magnitude(pixels.float() / 255), magnitude)


# --- transformation robustness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(16, 16), (15, 22), (32, 9), (5, 5)])
def test_random_transform_keeps_the_shape(height: int, width: int) -> None:
    x = torch.rand(3, 3, height, width, generator=generator(11))
    out = random_transform(x, generator(12), jitter=4)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)


def test_random_transform_identity_settings_give_x_back() -> None:
    x = torch.rand(2, 3, 13, 10, generator=generator(13))
    out = random_transform(x, generator(14), jitter=0, scales=(1.0,), angles=(0,))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_random_transform_shift_moves_whole_pixels_and_reflects_the_border() -> None:
    # jitter without scaling or rotation: every image is x shifted by whole pixels on each axis, the pixels
    # brought in at a border mirroring those inside it (reflection about the image's edge, numpy's "symmetric")
    x = torch.rand(12, 1, 9, 11, generator=generator(15))
    out = random_transform(x, generator(16), jitter=2, scales=(1.0,), angles=(0.0,))
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="symmetric")  # (12, 1, 13, 15)
    shifts = set()
    for b in range(12):
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if np.allclose(out[b].numpy(), padded[b, :, 2 - dy:11 - dy, 2 - dx:13 - dx], atol=1e-5)]
        assert len(found) == 1
        shifts.add(found[0])
    assert len(shifts) > 3


def test_random_transform_shifts_after_scaling_and_rotating() -> None:
    # the shift is in output pixels: jittered = the unjittered transform moved by whole pixels, whatever the
    # scale and angle
    x = torch.rand(6, 1, 12, 12, generator=generator(25))
    still = random_transform(x, generator(0), jitter=0, scales=(2.0,), angles=(90.0,))[:, 0].numpy()
    moved = random_transform(x, generator(26), jitter=1, scales=(2.0,), angles=(90.0,))[:, 0].numpy()
    for b in range(6):
        assert any(np.allclose(moved[b, 2:-2, 2:-2], still[b, 2 - dy:10 - dy, 2 - dx:10 - dx], atol=1e-5)
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


@pytest.mark.parametrize(("height", "width"), [(11, 11), (11, 15), (15, 11)])
def test_random_transform_rotates_counter_clockwise(height: int, width: int) -> None:
    # a bright segment right of the centre, turned by 90 degrees counter-clockwise, lies above the centre, as
    # long, also in a non-square image (the rotation is done in pixels, not in normalized coordinates)
    cy, cx = height // 2, width // 2
    x = torch.zeros(1, 1, height, width)
    x[0, 0, cy, cx + 1:cx + 4] = 1.0
    out = random_transform(x, generator(0), jitter=0, scales=(1.0,), angles=(90.0,))
    expected = torch.zeros(1, 1, height, width)
    expected[0, 0, cy - 3:cy, cx] = 1.0
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_random_transform_scales_about_the_centre() -> None:
    # scale 2 about the centre of a 9x9 image: output pixel (4 + d) samples input (4 + d / 2)
    x = torch.arange(81, dtype=torch.float32).reshape(1, 1, 9, 9)
    out = random_transform(x, generator(0), jitter=0, scales=(2.0,), angles=(0.0,))
    torch.testing.assert_close(out[0, 0, 4, 4], x[0, 0, 4, 4])
    torch.testing.assert_close(out[0, 0, 6, 4], x[0, 0, 5, 4])
    torch.testing.assert_close(out[0, 0, 4, 3], (x[0, 0, 4, 3] + x[0, 0, 4, 4]) / 2)


def test_random_transform_is_seeded_by_its_generator_only() -> None:
    x = torch.rand(4, 3, 20, 24, generator=generator(17))
    state = torch.random.get_rng_state()
    first = random_transform(x, generator(18))
    assert torch.equal(first, random_transform(x, generator(18)))
    assert not torch.allclose(first, random_transform(x, generator(19)))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_random_transform_passes_gradients_to_x() -> None:
    x = torch.rand(2, 3, 12, 12, generator=generator(20)).requires_grad_()
    random_transform(x, generator(21)).square().sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="scale"):
        random_transform(x, generator(21), scales=())


# --- diversity -------------------------------------------------------------------------------------------------


def numpy_dissimilarity(features: np.ndarray) -> float:
    batch, channels = features.shape[:2]
    grams = []
    for b in range(batch):
        flat = features[b].reshape(channels, -1)
        grams.append((flat @ flat.T / flat.shape[1]).ravel())
    total, pairs = 0.0, 0
    for i in range(batch):
        for j in range(batch):
            if i != j:
                total += 1 - grams[i] @ grams[j] / (np.linalg.norm(grams[i]) * np.linalg.norm(grams[j]))
                pairs += 1
    return total / pairs


def test_gram_dissimilarity_is_zero_for_identical_images_and_a_batch_of_one() -> None:
    one = torch.randn(1, 5, 6, 7, generator=generator(22))
    assert gram_dissimilarity(one.expand(4, -1, -1, -1)).abs().item() < 1e-6
    assert gram_dissimilarity(one).item() == 0.0
    assert gram_dissimilarity(one[:, :, 0, 0]).item() == 0.0


@pytest.mark.parametrize("shape", [(4, 5, 6, 7), (3, 8, 1, 1), (5, 6)])
def test_gram_dissimilarity_equals_a_double_loop(shape: tuple[int, ...]) -> None:
    features = torch.randn(*shape, generator=generator(23), dtype=torch.float64)
    value = gram_dissimilarity(features)
    assert value.shape == () and value.item() > 0
    assert value.item() == pytest.approx(numpy_dissimilarity(features.numpy()), rel=1e-10)
    reversed_value = gram_dissimilarity(features.flip(0))
    assert reversed_value.item() == pytest.approx(value.item(), rel=1e-12)


def test_gram_dissimilarity_is_differentiable() -> None:
    features = torch.randn(3, 4, 5, 5, generator=generator(24)).requires_grad_()
    value = gram_dissimilarity(features)
    assert value.item() > 0
    value.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_the_initial_fourier_image_is_a_faint_texture_as_lucents() -> None:
    """sd 0.01 at 224 px gives lucent's start: a linear image of standard deviation about 0.01 (its sigmoid is
    mid-grey), not a saturated one (a sqrt(H·W) too many, with an orthonormal FFT, gives about 4.5)."""
    image = fourier_image(fourier_init(1, 224, 224, generator=generator(0)), 224, 224)
    assert 0.002 < float(image.std()) < 0.05
