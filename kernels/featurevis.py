"""Pure tensor primitives of feature visualization (Olah et al. 2017, Distill "Feature Visualization"), in the
manner of lucid and lucent, and of MACO (Fel et al. 2023, "Unlocking feature visualization for deeper networks
with magnitude constrained optimization").

Images are (B, 3, H, W) float tensors. Spectra are those of `torch.fft.rfft2` with norm="ortho" over the last
two axes: (..., H, W // 2 + 1) bins, bin (ky, kx) having the frequency (fftfreq(H)[ky], rfftfreq(W)[kx]) in
cycles per pixel, so the DC bin is (0, 0) and the highest radial frequency is sqrt(0.5² + 0.5²). A real
spectrum parameter stores the real and imaginary parts in a trailing axis of 2, as `torch.view_as_complex`
reads them.

Every function works on the device of its tensor arguments. Nothing here uses the global random number
generator: the random draws take a CPU `torch.Generator`, are made on the CPU and then moved to the device, so
a seed gives the same draws on every device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# lucid's `color_correlation_svd_sqrt`: a square root of ImageNet's RGB colour covariance as lucid estimated it,
# i.e. IMAGENET_COLOR_SQRT @ IMAGENET_COLOR_SQRT.T is that covariance. Its first column is luminance.
IMAGENET_COLOR_SQRT = torch.tensor([[0.26, 0.09, 0.02],
                                    [0.27, 0.00, -0.05],
                                    [0.27, -0.09, 0.03]], dtype=torch.float32)

# lucent's default transformation robustness: scales near 1 and rotations of up to 5 degrees either way
SCALES: tuple[float, ...] = (1.0, 0.975, 1.025, 0.95, 1.05)
ANGLES: tuple[float, ...] = tuple(float(angle) for angle in range(-5, 6))

# lucid divides the image of its Fourier parametrization by this constant so that the initial pixels have
# roughly unit scale; it has no deeper meaning ("magic" in lucid's source).
_LUCID_MAGIC = 4.0


# ---------------------------------------------------------------------------------------------------------------
# Fourier parametrization (lucid's `fft_image`)


def rfft2d_freqs(height: int, width: int) -> torch.Tensor:
    """(height, width // 2 + 1) float32: the radial frequency sqrt(fy² + fx²) of each rfft2 bin, in cycles per
    pixel."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)  # (H,)
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)  # (W // 2 + 1,)
    return torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2).float()  # (H, W // 2 + 1)


def spectrum_scale(height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """(height, width // 2 + 1) float32: lucid's per-bin scale 1 / max(f, 1 / max(H, W)) ** decay_power, which
    gives the image a 1 / f**decay_power amplitude spectrum when the parameters are white. (lucid's TensorFlow
    version also multiplies by sqrt(H·W) because it inverts without normalization; with `norm="ortho"`, as here
    and in lucent, that factor is left out and the image is the same.)

    Frequencies below one cycle per image (the DC bin) are clamped to one, so the DC bin is not infinite.
    """
    freqs = rfft2d_freqs(height, width).double()  # (H, W // 2 + 1)
    floor = 1.0 / max(height, width)
    return (1.0 / freqs.clamp_min(floor) ** decay_power).float()


def fourier_init(batch: int, height: int, width: int, sd: float = 0.01,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, 3, height, width // 2 + 1, 2) float32 drawn from normal(0, sd): the real and imaginary parts of
    the spectra that `fourier_image` turns into images.

    The draw is made on the CPU with `generator` (None: a fresh, default-seeded CPU generator, so the result is
    still deterministic and the global generator is left alone). The result is a contiguous leaf without
    gradient; move it to its device, then `requires_grad_()` it for the optimizer.
    """
    if generator is None:
        generator = torch.Generator()
    shape = (batch, 3, height, width // 2 + 1, 2)
    return torch.randn(shape, generator=generator, dtype=torch.float32) * sd


def fourier_image(spectrum: torch.Tensor, height: int, width: int, decay_power: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W // 2 + 1, 2) spectrum parameters -> (B, 3, H, W) float32 images, differentiably:
    irfft2(spectrum · spectrum_scale, s=(H, W), norm="ortho") / 4, as lucid's `fft_image`.

    The result is unbounded (decorrelate and squash it with `decorrelated_to_rgb`).
    """
    bins = (height, width // 2 + 1)
    if spectrum.ndim != 5 or spectrum.shape[-1] != 2 or tuple(spectrum.shape[2:4]) != bins:
        raise ValueError(f"expected a (B, C, {bins[0]}, {bins[1]}, 2) spectrum for {height}x{width} images, "
                         f"got shape {tuple(spectrum.shape)}")
    scale = spectrum_scale(height, width, decay_power).to(spectrum.device)  # (H, W // 2 + 1)
    # view_as_complex needs a float32/float64 tensor with a unit-stride last axis
    complex_spectrum = torch.view_as_complex(spectrum.float().contiguous())  # (B, 3, H, W // 2 + 1) complex
    image = torch.fft.irfft2(complex_spectrum * scale, s=(height, width), norm="ortho")  # (B, 3, H, W)
    return image / _LUCID_MAGIC


# ---------------------------------------------------------------------------------------------------------------
# Colour decorrelation (lucid's `to_valid_rgb(decorrelate=True, sigmoid=True)`)


def colour_covariance(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images -> (3, 3) float64 covariance of their RGB values over all pixels of all images
    (unbiased, as `np.cov`). uint8 images are scaled to [0, 1]; floating images are taken to be in [0, 1]."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(pixels.shape)}")
    values = pixels.double()
    if pixels.dtype == torch.uint8:
        values = values / 255.0
    samples = values.transpose(0, 1).reshape(3, -1)  # (3, N·H·W)
    return torch.cov(samples)  # (3, 3)


def decorrelation_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """(3, 3) colour covariance -> (3, 3) float32 square root S of it, divided by its largest column norm as
    lucid normalizes `color_correlation_svd_sqrt`.

    Before the division S @ S.T equals the covariance: S = U diag(sqrt(max(λ, 0))) from its eigendecomposition,
    whose columns are orthogonal, so the largest column norm is sqrt(λ_max) and the result's S Sᵀ is
    covariance / λ_max. A square root is unique only up to a rotation; this one orders its columns
    by decreasing eigenvalue (the first is luminance for natural images) and makes each column sum >= 0.
    """
    if covariance.shape != (3, 3):
        raise ValueError(f"expected a (3, 3) covariance, got shape {tuple(covariance.shape)}")
    symmetric = covariance.double()
    symmetric = (symmetric + symmetric.T) / 2
    eigenvalues, eigenvectors = torch.linalg.eigh(symmetric)  # (3,) ascending, (3, 3) columns
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    signs = torch.where(eigenvectors.sum(dim=0) < 0, -1.0, 1.0).to(eigenvectors)  # (3,)
    root = eigenvectors * signs * eigenvalues.clamp_min(0).sqrt()  # (3, 3): column j is U_j · sqrt(λ_j)
    largest = root.norm(dim=0).max()
    if largest <= 0:
        raise ValueError("the colour covariance is zero: the images have no colour variation")
    return (root / largest).float()


def decorrelated_to_rgb(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) decorrelated colours -> (B, 3, H, W) RGB in (0, 1): rgb = matrix @ x at each pixel, then a
    sigmoid. Differentiable with respect to both."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) batch, got shape {tuple(x.shape)}")
    rgb = torch.einsum("ij,bjhw->bihw", matrix.to(x.device, x.dtype), x)  # (3, 3) x (B, 3, H, W) -> (B, 3, H, W)
    return torch.sigmoid(rgb)


# ---------------------------------------------------------------------------------------------------------------
# MACO: optimize the phase of a fixed, natural magnitude spectrum


def maco_image(phase: torch.Tensor, magnitude: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, H, W // 2 + 1) phases and a fixed (3, H, W // 2 + 1) magnitude -> (B, 3, H, W) float32 images,
    irfft2(magnitude · exp(i · phase), s=(H, W), norm="ortho"), each standardized to zero mean and unit
    (population) standard deviation over its channels and pixels. Differentiable with respect to the phase.

    The caller maps the standardized values to pixels (e.g. with a sigmoid).
    """
    bins = (height, width // 2 + 1)
    if phase.ndim != 4 or tuple(phase.shape[2:]) != bins:
        raise ValueError(f"expected (B, C, {bins[0]}, {bins[1]}) phases for {height}x{width} images, "
                         f"got shape {tuple(phase.shape)}")
    magnitude = magnitude.to(phase.device, phase.dtype)  # (3, H, W // 2 + 1)
    spectrum = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))  # (B, 3, H, W//2+1)
    image = torch.fft.irfft2(spectrum, s=(height, width), norm="ortho").float()  # (B, 3, H, W)
    mean = image.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    std = image.std(dim=(1, 2, 3), keepdim=True, correction=0)  # (B, 1, 1, 1)
    # a zero magnitude gives a constant image: leave it at zero instead of dividing by zero
    return (image - mean) / std.clamp_min(torch.finfo(image.dtype).tiny)


def average_magnitude(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) images -> (3, H, W // 2 + 1) float32 mean |rfft2(norm="ortho")| over the images, after
    subtracting the mean of each channel of each image (so the DC bin is 0). uint8 images are scaled to [0, 1];
    floating images are taken to be in [0, 1]."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(pixels.shape)}")
    values = pixels.double()
    if pixels.dtype == torch.uint8:
        values = values / 255.0
    centred = values - values.mean(dim=(2, 3), keepdim=True)  # (N, 3, H, W)
    return torch.fft.rfft2(centred, norm="ortho").abs().mean(dim=0).float()  # (3, H, W // 2 + 1)


# ---------------------------------------------------------------------------------------------------------------
# Transformation robustness and diversity


def random_transform(x: torch.Tensor, generator: torch.Generator, jitter: int = 8,
                     scales: Sequence[float] = SCALES, angles: Sequence[float] = ANGLES) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): each image scaled by a random choice of `scales` and rotated by one of
    `angles` (degrees, counter-clockwise as displayed) about its centre, then shifted by a random whole number
    of pixels in [-jitter, jitter] on each axis, all in one bilinear resampling with reflected borders.

    Differentiable with respect to `x` and run on its device; the draws (scale, angle, then shift, for the
    whole batch) are made on the CPU with `generator`, which must be a CPU generator. jitter=0, scales=(1,)
    and angles=(0,) give `x` back (to rounding).
    """
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if not scales or not angles or jitter < 0:
        raise ValueError(f"need at least one scale and one angle and jitter >= 0, got scales={tuple(scales)}, "
                         f"angles={tuple(angles)}, jitter={jitter}")
    batch, _, height, width = x.shape
    scale_table = torch.tensor(list(scales), dtype=torch.float64)
    angle_table = torch.tensor(list(angles), dtype=torch.float64)
    scale = scale_table[torch.randint(len(scale_table), (batch,), generator=generator)]  # (B,)
    angle = torch.deg2rad(angle_table[torch.randint(len(angle_table), (batch,), generator=generator)])  # (B,)
    shift = torch.randint(-jitter, jitter + 1, (batch, 2), generator=generator).double()  # (B, 2) as (dx, dy)
    theta = _affine_theta(scale, angle, shift, height, width).to(x.device, x.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _affine_theta(scale: torch.Tensor, angle: torch.Tensor, shift: torch.Tensor, height: int,
                  width: int) -> torch.Tensor:
    """(B, 2, 3) float64 `F.affine_grid` matrices for the output = shift + scale · rotate(input) of
    `random_transform`, about the image centre.

    affine_grid maps each output location to the input location it samples, in coordinates normalized to
    [-1, 1] across each axis, so the pixel-space inverse p_in = Rᵀ (p_out - shift) / scale is conjugated by
    D = diag(W / 2, H / 2); doing it in pixels keeps a rotation of a non-square image a rotation.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)  # (B,)
    # R rotates counter-clockwise on screen, where y points down: R = [[cos, sin], [-sin, cos]]; Rᵀ undoes it
    inverse = torch.stack([torch.stack([cos, -sin], dim=-1), torch.stack([sin, cos], dim=-1)], dim=-2)  # (B, 2, 2)
    inverse = inverse / scale[:, None, None]
    half = torch.tensor([width / 2, height / 2], dtype=torch.float64)  # (2,) pixels per normalized unit
    linear = inverse * half[None, None, :] / half[None, :, None]  # D⁻¹ · inverse · D
    offset = -(inverse @ shift[:, :, None])[:, :, 0] / half  # (B, 2): -D⁻¹ · inverse · shift
    return torch.cat([linear, offset[:, :, None]], dim=2)  # (B, 2, 3)


def gram_dissimilarity(features: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) or (B, C) features -> scalar mean of 1 - cosine(G_b, G_b') over the ordered pairs b != b'
    of the images' Gram matrices G_b = F_b F_bᵀ / (H·W), F_b being (C, H·W) (for (B, C), the outer product).

    0 for identical images and for a batch of one, positive otherwise; differentiable, so a visualization can
    maximize it to make the images of a batch differ in style (lucid's diversity objective).
    """
    if features.ndim not in (2, 4):
        raise ValueError(f"expected (B, C, H, W) or (B, C) features, got shape {tuple(features.shape)}")
    batch, channels = features.shape[:2]
    if batch < 2:
        return features.new_zeros(())
    flat = features.reshape(batch, channels, -1)  # (B, C, H·W)
    gram = flat @ flat.transpose(1, 2) / flat.shape[2]  # (B, C, C)
    vectors = gram.reshape(batch, -1)  # (B, C·C)
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)  # (B, C·C)
    cosine = unit @ unit.T  # (B, B)
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=features.device)  # (B, B)
    return (1 - cosine)[off_diagonal].mean().clamp_min(0)
