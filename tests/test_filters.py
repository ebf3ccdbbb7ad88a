"""Filter pictures from hand-set weights whose expected pixels can be written down, and the stem finder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from actindex.kernels.errors import UserError
from actindex.query.filters import BACKGROUND, filter_grid, first_conv, layer_weight


def pixels(weight: torch.Tensor, **options: int) -> np.ndarray:
    return np.asarray(filter_grid(weight, **options))  # (H, W, 3) uint8


def test_rgb_tiles_are_scaled_symmetrically_per_filter() -> None:
    weight = torch.zeros(3, 3, 2, 2)  # (O, I, kh, kw)
    weight[0] = -0.5
    weight[0, 0, 0, 0] = 1.0  # filter 0: +1 on red at its top-left pixel, -0.5 elsewhere
    weight[2, 2] = 0.25  # filter 2: small, blue only; filter 1 stays all zero
    image = pixels(weight, scale=1, gap=0, columns=3)
    assert image.shape == (2, 6, 3)
    # 128 + 127 · (-0.5) = 64.5, rounded half to even
    expected0 = np.full((2, 2, 3), 64, np.uint8)
    expected0[0, 0] = (255, 64, 64)
    assert np.array_equal(image[:, 0:2], expected0)
    assert np.array_equal(image[:, 2:4], np.full((2, 2, 3), 128, np.uint8))  # all-zero filter: flat grey
    # scaled by its own max |w|, so a small filter still reaches full blue; red and green weights are 0
    assert np.array_equal(image[:, 4:6], np.broadcast_to(np.array([128, 128, 255], np.uint8), (2, 2, 3)))


def test_sign_reads_as_colour() -> None:
    weight = torch.zeros(1, 3, 1, 2)
    weight[0, 0, 0, 0] = -2.0  # negative red: less red than grey, reads as cyan
    weight[0, 1, 0, 1] = 1.0  # positive green at half the peak
    image = pixels(weight, scale=1, gap=0)
    assert tuple(image[0, 0]) == (1, 128, 128)
    assert tuple(image[0, 1]) == (128, 192, 128)  # 128 + 63.5 rounds half to even


def test_nearest_upsampling_has_no_intermediate_values() -> None:
    weight = torch.randn(5, 3, 3, 4, generator=torch.Generator().manual_seed(0))
    small = pixels(weight, scale=1, gap=0, columns=5)
    big = pixels(weight, scale=6, gap=0, columns=5)
    assert np.array_equal(big, small.repeat(6, axis=0).repeat(6, axis=1))  # every weight a 6x6 block
    assert set(np.unique(big)) == set(np.unique(small))


@pytest.mark.parametrize(("outputs", "columns", "grid"), [(10, None, (3, 4)), (10, 5, (2, 5)), (64, None, (8, 8)),
                                                          (1, None, (1, 1)), (3, 10, (1, 3))])
def test_grid_size(outputs: int, columns: int | None, grid: tuple[int, int]) -> None:
    kh, kw, scale, gap = 7, 5, 3, 2
    image = filter_grid(torch.randn(outputs, 3, kh, kw), scale=scale, gap=gap, columns=columns)
    rows, cols = grid
    assert image.size == (gap + cols * (kw * scale + gap), gap + rows * (kh * scale + gap))  # (width, height)
    array = np.asarray(image)
    assert (array[:gap] == BACKGROUND).all() and (array[:, :gap] == BACKGROUND).all()
    assert (array[:, gap + kw * scale:2 * gap + kw * scale] == BACKGROUND).all() or cols == 1


def test_deeper_layer_one_grey_tile_per_output_and_input() -> None:
    weight = torch.zeros(2, 4, 1, 1)
    weight[0, :, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # filter 0: largest |w| on input 3
    weight[1, :, 0, 0] = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    image = pixels(weight, scale=2, gap=1)
    assert image.shape == (1 + 2 * 3, 1 + 4 * 3, 3)  # rows = outputs, columns = inputs
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()  # grey
    tiles = image[1::3, 1::3, 0]  # top-left pixel of each tile, (O, I)
    # 128 + 127 · w / max|w| per output filter: 127/3 = 42.33, 2·127/3 = 84.67; 127/4 = 31.75, 63.5, 95.25
    assert tiles.tolist() == [[128, 170, 213, 255], [96, 64, 33, 1]]


def test_depthwise_layer_one_grey_tile_per_output() -> None:
    conv = nn.Conv2d(9, 9, 3, groups=9)
    image = pixels(conv.weight.detach(), scale=2, gap=1)  # (9, 1, 3, 3): 3 x 3 grid
    assert image.shape == (1 + 3 * 7, 1 + 3 * 7, 3)
    assert (image[..., 0] == image[..., 2]).all()


def test_too_many_tiles_refused() -> None:
    with pytest.raises(UserError, match=r"128 filters x 64 input channels = 8192 tiles, more than 4096; show the "
                                        r"first layer"):
        filter_grid(torch.zeros(128, 64, 3, 3))
    assert filter_grid(torch.zeros(64, 64, 1, 1)).size == (1 + 64 * 9, 1 + 64 * 9)  # 4096 is allowed
    with pytest.raises(UserError, match="8 filters x 1 input channels = 8 tiles, more than 4"):
        filter_grid(torch.zeros(8, 1, 3, 3), max_tiles=4)


class Named(nn.Module):
    """conv1 (the stem) -> relu -> conv2 -> pool -> fc; `aux` is registered first but runs after the stem."""

    def __init__(self) -> None:
        super().__init__()
        self.aux = nn.Conv2d(3, 2, 1)
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.fc(y.mean(dim=(2, 3))) + self.aux(x).mean()


def test_layer_weight_and_refusals() -> None:
    model = Named()
    assert torch.equal(layer_weight(model, "conv1"), model.conv1.weight.detach())
    assert layer_weight(model, "conv2").shape == (4, 2, 3, 3)
    with pytest.raises(UserError, match=r"unknown layer 'conv3'; did you mean .*valid layers: aux, conv1, bn"):
        layer_weight(model, "conv3")
    with pytest.raises(UserError, match=r"^layer 'fc' has no convolution filters; choose a Conv2d layer, "
                                        r"e.g. 'aux'$"):
        layer_weight(model, "fc")
    with pytest.raises(UserError, match="layer 'bn' has no convolution filters"):
        layer_weight(model, "bn")


def test_first_conv_follows_the_forward_pass() -> None:
    model = Named().train()
    assert first_conv(model) == "conv1"  # not `aux`, first in registration order
    assert model.training and model.bn.training
    assert int(model.bn.num_batches_tracked) == 0  # the probe stopped at the stem, before BN
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert first_conv(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))) == "0"


def test_first_conv_falls_back_to_module_order() -> None:
    class NeedsFourChannels(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix = nn.Conv2d(4, 3, 1)
            self.stem = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(self.mix(x))  # a 3-channel probe fails inside `mix`

    assert first_conv(NeedsFourChannels()) == "stem"
    with pytest.raises(UserError, match="no Conv2d layer with 3 input channels"):
        first_conv(nn.Sequential(nn.Conv2d(1, 4, 3)))


@pytest.mark.parametrize(("name", "stem", "shape"), [("resnet18", "conv1", (64, 3, 7, 7)),
                                                     ("alexnet", "features.0", (64, 3, 11, 11))])
def test_torchvision_stems(name: str, stem: str, shape: tuple[int, ...]) -> None:
    model = torchvision.models.get_model(name, weights=None)
    assert first_conv(model) == stem
    weight = layer_weight(model, stem)
    assert weight.shape == shape
    image = filter_grid(weight)  # 8 x 8 grid
    assert image.size == (1 + 8 * (shape[3] * 8 + 1),) * 2
