"""How alike two maps are, as Adebayo et al. 2018 ("Sanity Checks for Saliency Maps") measure it: the Spearman
rank correlation of their values and the structural similarity (SSIM, Wang et al. 2004) of the two maps as
images.

Maps are (B, H, W) float tensors compared row by row (b with b). SSIM here is the standard one: an 11-tap
Gaussian window of sigma 1.5, constants (0.01 L)² and (0.03 L)² for data range L = 1, population (not sample)
variances, the mean over the positions where the whole window fits (`skimage.metrics.structural_similarity`
with gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1 gives the same). Signed maps
are brought to [0, 1] by their own largest magnitude first (`scaled`): a saliency map's scale carries no meaning
across networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .blur import gaussian_kernel1d


def ranks(values: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) float64 ranks 1..N along each row, ties given their average rank."""
    order = values.argsort(dim=1, stable=True)
    sorted_values = values.gather(1, order)
    first = torch.ones_like(sorted_values, dtype=torch.bool)
    first[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]  # start of a run of equal values
    run = first.cumsum(1)  # (B, N) run number of each sorted position
    position = torch.arange(1, values.shape[1] + 1, dtype=torch.float64, device=values.device).expand_as(run)
    total = torch.zeros_like(position).scatter_add_(1, run - 1, position)
    count = torch.zeros_like(position).scatter_add_(1, run - 1, torch.ones_like(position))
    average = (total / count.clamp_min(1)).gather(1, run - 1)  # (B, N) average rank of each sorted position
    return torch.empty_like(average).scatter_(1, order, average)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, ...) and (B, ...) -> (B,) float64 Spearman rank correlation of each pair; NaN where one is constant."""
    ra, rb = ranks(a.flatten(1).double()), ranks(b.flatten(1).double())
    ra, rb = ra - ra.mean(1, keepdim=True), rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.square().sum(1) * rb.square().sum(1)).sqrt()


def scaled(maps: torch.Tensor) -> torch.Tensor:
    """(B, H, W) signed maps -> [0, 1], 0.5 at 0 and 0 or 1 at each map's own largest magnitude (as a signed map
    is drawn; all-zero maps become 0.5)."""
    peak = maps.abs().flatten(1).amax(1).clamp_min(torch.finfo(maps.dtype).tiny)
    return 0.5 + 0.5 * maps / peak[:, None, None]


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, H, W) and (B, H, W) maps in [0, 1] -> (B,) float64 mean SSIM (see the module docstring); maps smaller
    than the 11-pixel window are compared with a window cut to their size."""
    a, b = a.double()[:, None], b.double()[:, None]  # (B, 1, H, W)
    radius = min(5, (min(a.shape[-2:]) - 1) // 2)
    kernel = gaussian_kernel1d(1.5, radius).double().to(a.device)

    def blur(x: torch.Tensor) -> torch.Tensor:  # "valid" positions only, as skimage crops them
        x = F.conv2d(x, kernel.view(1, 1, -1, 1))
        return F.conv2d(x, kernel.view(1, 1, 1, -1))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)
