"""Receptive fields from trace_geometry against an independent gradient measurement.

Reference: in a copy of the model with positive weights, identity batch norm and average pools in place
of max pools (a max passes gradient to one pixel only), every input pixel a unit reads gets a positive
gradient, so the bounding box of nonzero input gradient is the unit's receptive field box.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from actindex.kernels.errors import UserError
from actindex.kernels.receptive_field import AxisField, LayerGeometry, boxes, trace_geometry

Box = tuple[int, int, int, int]
Probe = tuple[str, int, int]  # (layer, y, x)


# --------------------------------------------------------------------------------------------------
# Gradient reference


class _Stop(Exception):
    """Raised by a hook once every probed layer has run: deeper layers cost time and add nothing."""


def positive_copy(model: nn.Module) -> nn.Module:
    """A float64 copy in which a unit's input gradient is positive exactly on the pixels it reads."""
    ref = copy.deepcopy(model).double().eval()
    for name, module in list(ref.named_modules()):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            # 1 / fan_in keeps activations near 1 through 50 layers (no overflow, no underflow to 0).
            module.weight.data.fill_(1.0 / module.weight[0].numel())
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # running mean 0, var 1, weight 1, bias 0: identity up to eps
        elif isinstance(module, nn.MaxPool2d):
            assert module.dilation in (1, (1, 1)), "average pooling has no dilation"
            parent_name, _, child = name.rpartition(".")
            pool = nn.AvgPool2d(
                module.kernel_size, module.stride, module.padding, module.ceil_mode, count_include_pad=True
            )
            setattr(ref.get_submodule(parent_name), child, pool)
    if hasattr(ref, "pool2d"):
        ref.pool2d = F.avg_pool2d  # test models that call a functional max pool expose it as `pool2d`
    return ref


def gradient_boxes(model: nn.Module, probes: Sequence[Probe], hw: tuple[int, int]) -> list[Box | None]:
    """Bounding box of nonzero input gradient of channel 0 at each probe, one batch row per probe.

    None for a unit that reads no pixel at all (a position inside padding added by F.pad).
    """
    ref = positive_copy(model).requires_grad_(False)  # only the input gradient is needed
    layers = {layer for layer, _, _ in probes}
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str, module: nn.Module, inputs: object, output: object) -> None:
        first = output if isinstance(output, torch.Tensor) else output[0]
        outputs[name] = first.clone()  # the value now: later in-place ops (out += identity) change it
        if set(outputs) == layers:
            raise _Stop

    handles = [ref.get_submodule(n).register_forward_hook(functools.partial(keep, n)) for n in layers]
    image = torch.ones(len(probes), 3, *hw, dtype=torch.float64, requires_grad=True)  # (B, 3, H, W)
    try:
        ref(image)
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    units = []
    for b, (layer, y, x) in enumerate(probes):
        out = outputs[layer]
        units.append(out[b, 0, y, x] if out.ndim == 4 else out[b, 0])
    torch.stack(units).sum().backward()
    reached = image.grad.abs().sum(1) > 0  # (B, H, W)
    result: list[Box | None] = []
    for b in range(len(probes)):
        rows = reached[b].any(1).nonzero().flatten()  # (n_rows,)
        cols = reached[b].any(0).nonzero().flatten()  # (n_cols,)
        if rows.numel() == 0:
            result.append(None)
        else:
            result.append((int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1))
    return result


def spread_positions(geometry: LayerGeometry) -> list[tuple[int, int]]:
    """Corners, centre and an off-centre position of a feature map."""
    h, w = geometry.height, geometry.width
    spots = [(0, 0), (h - 1, w - 1), (0, w - 1), (h - 1, 0), (h // 2, w // 2), (min(1, h - 1), 2 * w // 3)]
    return list(dict.fromkeys(spots))


def assert_boxes_match(model: nn.Module, layers: Sequence[str], hw: tuple[int, int]) -> None:
    geometry = trace_geometry(model, hw, names=layers)
    probes = [(layer, y, x) for layer in layers for y, x in spread_positions(geometry[layer])]
    measured = gradient_boxes(model, probes, hw)
    traced = [geometry[layer].box(y, x, hw) for layer, y, x in probes]
    wrong = [(p, t, m) for p, t, m in zip(probes, traced, measured, strict=True) if t != m]
    assert not wrong, f"(layer, y, x), traced, gradient: {wrong}"


def fields(size_y: tuple[int, int, int], size_x: tuple[int, int, int] | None = None) -> tuple:
    return AxisField(*size_y), AxisField(*(size_x or size_y))


# --------------------------------------------------------------------------------------------------
# torchvision models


@pytest.mark.parametrize(
    ("arch", "layer", "expected", "chw"),
    [
        ("alexnet", "features.10", (163, 16, 66), (256, 13, 13)),
        ("vgg16", "features.30", (212, 32, 90), (512, 7, 7)),
        ("resnet18", "layer4", (435, 32, 217), (512, 7, 7)),
        ("resnet50", "layer3", (267, 16, 133), (1024, 14, 14)),
    ],
)
def test_known_fields_at_224(arch: str, layer: str, expected: tuple, chw: tuple) -> None:
    model = getattr(torchvision.models, arch)(weights=None)
    geometry = trace_geometry(model, 224, names=[layer])[layer]
    assert geometry.field == fields(expected)
    assert (geometry.channels, geometry.height, geometry.width) == chw
    assert geometry.note == ""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "layers", "hw"),
    [
        ("alexnet", ["features.0", "features.2", "features.5", "features.10", "features.12"], (127, 127)),
        ("vgg16", ["features.4", "features.16"], (56, 64)),
        # layer2.0.bn2 is read before `out += identity` changes its output in place.
        ("resnet18", ["maxpool", "layer1.1", "layer2.0.bn2", "layer2", "layer3.0.downsample"], (96, 112)),
        ("resnet50", ["layer1.0", "layer2.0.conv2", "layer2"], (96, 112)),
    ],
)
def test_torchvision_boxes_match_gradient(arch: str, layers: list[str], hw: tuple[int, int]) -> None:
    assert_boxes_match(getattr(torchvision.models, arch)(weights=None), layers, hw)


def test_resnet_head_covers_whole_input() -> None:
    geometry = trace_geometry(torchvision.models.resnet18(weights=None), (96, 128), names=["avgpool", "fc"])
    for name in ("avgpool", "fc"):
        assert geometry[name].field == fields((96, 96, 0), (128, 128, 0))
        assert (geometry[name].height, geometry[name].width) == (1, 1)
        assert geometry[name].box(0, 0, (96, 128)) == (0, 0, 96, 128)
    assert geometry["fc"].channels == 1000


# --------------------------------------------------------------------------------------------------
# A model built to exercise every rule the torchvision models do not


class Branches(nn.Module):
    """Residual sum of two branches whose fields differ in size and in centre."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)  # sees [y - 1, y + 2)
        self.b = nn.Sequential(nn.ZeroPad2d((2, 0, 2, 0)), nn.Conv2d(channels, channels, 3))  # [y - 2, y + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.a(x) + self.b(x))


class Geometric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pool2d: Callable[..., torch.Tensor] = F.max_pool2d  # functional; the reference swaps it
        self.stem = nn.Conv2d(3, 4, kernel_size=(3, 5), stride=(1, 2), padding=(1, 2))
        self.pad = nn.ZeroPad2d((2, 0, 1, 0))  # left 2, top 1: moves the field
        self.dilated = nn.Conv2d(4, 4, kernel_size=3, dilation=(2, 3))
        self.block = Branches(4)
        self.gappy = nn.Conv2d(4, 4, kernel_size=1, stride=3)  # stride > kernel: gaps between pixels read
        self.head = nn.Conv2d(4, 4, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.pad(self.pad(x), (0, 3, 0, 1))  # right/bottom only: must not move the field
        x = self.pool2d(self.dilated(x), 3, 2, 1)
        return self.head(self.gappy(self.block(x)))


GEOMETRIC_HW = (48, 64)


def test_geometric_fields_by_hand() -> None:
    """Each value composed by hand from the rules in the module docstring, y and x separately."""
    geometry = trace_geometry(Geometric(), GEOMETRIC_HW)
    expected = {
        "stem": ((3, 1, 1), (5, 2, 2), 48, 32),
        "pad": ((3, 1, 2), (5, 2, 6), 49, 34),
        "dilated": ((7, 1, 2), (17, 2, 6), 46, 31),  # after F.pad(0, 3, 0, 1): 50 x 37 in
        "block.a": ((13, 2, 5), (29, 4, 12), 23, 16),  # after max pool 3 / 2 / 1: (9, 2, 3), (21, 4, 8)
        "block.b": ((13, 2, 7), (29, 4, 16), 23, 16),
        "block": ((15, 2, 7), (33, 4, 16), 23, 16),  # union: [-7, 8) and [-16, 17)
        "gappy": ((15, 6, 7), (33, 12, 16), 8, 6),
        "head": ((27, 6, 13), (57, 12, 28), 8, 6),
    }
    for name, (fy, fx, h, w) in expected.items():
        assert geometry[name].field == fields(fy, fx), name
        assert (geometry[name].height, geometry[name].width) == (h, w), name


def assert_exact_inside_contained_at_border(
    model: nn.Module,
    layers: Sequence[str],
    hw: tuple[int, int],
    reads_nothing: Callable[[str, int, int], bool] = lambda layer, y, x: False,
) -> None:
    """Boxes equal the gradient's where the field lies inside the input, and contain it near the border.

    The field is a bounding interval clipped to the input, so at the border it cannot be tighter than
    the pixels really read (see the module docstring). `reads_nothing` names the positions expected to see
    no pixel at all; most probes must still match exactly.
    """
    geometry = trace_geometry(model, hw, names=layers)
    probes = []
    for layer in layers:
        h, w = geometry[layer].height, geometry[layer].width
        rows = sorted({0, 1, 2, h // 2, h - 3, h - 2, h - 1} & set(range(h)))
        cols = sorted({0, 1, 2, w // 3, w - 3, w - 2, w - 1} & set(range(w)))
        probes += [(layer, y, x) for y in rows for x in cols]
    exact = 0
    for (layer, y, x), got in zip(probes, gradient_boxes(model, probes, hw), strict=True):
        if got is None:
            assert reads_nothing(layer, y, x), (layer, y, x)
            continue
        traced = geometry[layer].box(y, x, hw)
        fy, fx = geometry[layer].field
        if fy.span(y) == fy.span(y, hw[0]) and fx.span(x) == fx.span(x, hw[1]):
            assert traced == got, (layer, y, x, traced, got)
        else:
            assert traced[:2] <= got[:2] and got[2:] <= traced[2:], (layer, y, x, traced, got)
        exact += traced == got
    assert exact > 0.75 * len(probes)


@pytest.mark.parametrize("hw", [GEOMETRIC_HW, (61, 45)])
def test_geometric_boxes_against_gradient(hw: tuple[int, int]) -> None:
    """`dilated` at x = 1 reads columns 2, 5, 8 ... and never 0 or 1, which its clipped box includes."""
    torch.manual_seed(0)
    layers = ["stem", "pad", "dilated", "block.b", "block", "gappy", "head"]
    # ZeroPad2d((2, 0, 1, 0)) adds row 0 and columns 0 and 1, which read no pixel.
    assert_exact_inside_contained_at_border(
        Geometric(), layers, hw, lambda layer, y, x: layer == "pad" and (y == 0 or x < 2)
    )


@pytest.mark.slow
def test_alexnet_rounding_down_is_conservative() -> None:
    """At 100 px conv1 makes 24 rows and the 3 / 2 max pool uses 23: rows 97-99 feed no deeper unit."""
    layers = ["features.2", "features.5", "features.12"]
    assert_exact_inside_contained_at_border(torchvision.models.alexnet(weights=None), layers, (100, 127))


class Pool(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fn(x)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(
    "pool",
    [
        lambda x: F.max_pool2d(x, 3, 2, 1),
        lambda x: F.max_pool2d(x, kernel_size=3, stride=2, padding=1, return_indices=True),
        lambda x: torch.max_pool2d(x, [3, 3], [2, 2], [1, 1]),
        lambda x: torch.nn.functional.max_pool2d(x, 3, stride=(2, 2), padding=1, ceil_mode=True),
        lambda x: torch._C._nn.max_pool2d_with_indices(x, [3, 3], [2, 2], [1, 1]),
        nn.MaxPool2d(3, 2, 1),
        nn.MaxPool2d(3, 2, 1, return_indices=True),
        lambda x: F.avg_pool2d(x, 3, 2, 1),
        nn.AvgPool2d(3, 2, 1),
        lambda x: F.conv2d(x, torch.ones(4, 1, 3, 3), stride=2, padding=1, groups=4),
    ],
    ids=[
        "F.max_pool2d",
        "F.max_pool2d-indices",
        "torch.max_pool2d",
        "F.max_pool2d-ceil",
        "_C._nn.max_pool2d_with_indices",
        "nn.MaxPool2d",
        "nn.MaxPool2d-indices",
        "F.avg_pool2d",
        "nn.AvgPool2d",
        "F.conv2d",
    ],
)
def test_every_pool_dispatch_path_reaches_the_window_rule(pool: Callable) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Pool(pool))
    assert trace_geometry(model, 20)["1"].field == fields((5, 2, 2))


def test_adaptive_pools() -> None:
    def adaptive(fn: Callable, size: int | tuple[int, int]) -> nn.Module:
        return Pool(lambda x: fn(x, size))

    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        adaptive(F.adaptive_avg_pool2d, (7, 3)),  # 14 -> 7 is a pool 2 / 2; 21 -> 3 is a pool 7 / 7
        adaptive(F.adaptive_max_pool2d, (3, 2)),  # uneven: 7 -> 3 and 3 -> 2
        nn.AdaptiveAvgPool2d(1),
    )
    geometry = trace_geometry(model, (14, 21))
    assert geometry["1"].field == fields((4, 2, 1), (9, 7, 1))
    # 7 -> 3 has windows [0, 3), [2, 5), [4, 7): exactly a pool 3 / 2 / 0.
    # 3 -> 2 has windows [0, 2), [1, 3): a pool 2 / 1 / 0.
    assert geometry["2"].field == fields((4 + 2 * 2, 4, 1), (9 + 1 * 7, 7, 1))
    assert geometry["3"].field == fields((14, 14, 0), (21, 21, 0))


def test_uneven_adaptive_pool_is_conservative() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.AdaptiveAvgPool2d((4, 3)))
    hw = (10, 11)
    geometry = trace_geometry(model, hw)["1"]
    probes = [("1", y, x) for y in range(4) for x in range(3)]
    for (_, y, x), got in zip(probes, gradient_boxes(model, probes, hw), strict=True):
        y0, x0, y1, x1 = geometry.box(y, x, hw)
        assert y0 <= got[0] and x0 <= got[1] and got[2] <= y1 and got[3] <= x1, (y, x)


# --------------------------------------------------------------------------------------------------
# Documented special cases


class Gated(nn.Module):
    """Squeeze-excitation: a gate from the spatial mean, broadcast over the map."""

    def __init__(self, channels: int, use_module_pool: bool) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1) if use_module_pool else None
        self.gate = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.pool(x) if self.pool is not None else x.mean((2, 3), keepdim=True)  # (N, C, 1, 1)
        return x * self.gate(context)


@pytest.mark.parametrize("use_module_pool", [True, False])
def test_one_by_one_gate_is_not_counted(use_module_pool: bool) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Gated(4, use_module_pool), nn.Conv2d(4, 4, 3))
    geometry = trace_geometry(model, 16)
    assert geometry["1"].field == geometry["0"].field == fields((3, 1, 1))  # not the whole image
    assert geometry["2"].field == fields((5, 1, 1))
    gate = geometry["1.gate"]
    assert (gate.height, gate.width) == (1, 1)
    assert gate.field == fields((16, 16, 0))  # the gate itself sees everything


def test_full_size_global_tensor_makes_the_union_whole() -> None:
    """A full-size map computed from a reshape that mixes positions (self-attention style) is counted."""

    class Mix(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, c, h, w = x.shape
            mixed = x.flatten(2).softmax(-1).reshape(n, c, h, w)  # every position sees every position
            return x + mixed

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), Mix())
    geometry = trace_geometry(model, 16)["1"]
    assert geometry.field is not None and geometry.field[0].stride == 2
    assert all(geometry.box(y, x, (16, 16)) == (0, 0, 16, 16) for y in range(8) for x in range(8))


def test_upsample_has_no_field_and_nothing_after_it() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Upsample(scale_factor=2),
        nn.Conv2d(4, 4, 3),
        nn.Flatten(),
        nn.Linear(4 * 22 * 22, 5),
    )
    geometry = trace_geometry(model, 12)
    assert geometry["0"].field is not None
    for name in ("1", "2", "4"):
        assert geometry[name].field is None
        assert "interpolate" in geometry[name].note and "spatial size" in geometry[name].note
    assert (geometry["1"].channels, geometry["1"].height, geometry["1"].width) == (4, 24, 24)
    with pytest.raises(ValueError, match="interpolate"):
        geometry["1"].box(0, 0, (12, 12))


def test_linear_head_covers_whole_input() -> None:
    model = nn.Sequential(nn.Conv2d(3, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 15 * 19, 7))
    head = trace_geometry(model, (32, 40))["3"]
    assert (head.channels, head.height, head.width) == (7, 1, 1)
    assert head.field == fields((32, 32, 0), (40, 40, 0))
    assert head.box(0, 0, (32, 40)) == (0, 0, 32, 40)


def test_channels_last_block_keeps_its_field() -> None:
    """ConvNeXt style: permute to (N, H, W, C), LayerNorm and Linear on channels, permute back."""
    model = nn.Sequential(
        nn.Conv2d(3, 8, 7, padding=3, groups=1),
        torchvision.ops.Permute([0, 2, 3, 1]),
        nn.LayerNorm(8),
        nn.Linear(8, 16),
        torchvision.ops.Permute([0, 3, 1, 2]),
    )
    geometry = trace_geometry(model, (20, 24))
    for name in ("1", "3", "4"):
        assert geometry[name].field == fields((7, 1, 3)), name
    assert (geometry["3"].channels, geometry["3"].height, geometry["3"].width) == (16, 20, 24)
    swapped = trace_geometry(nn.Sequential(nn.Conv2d(3, 4, 3), Pool(lambda x: x.transpose(2, 3))), 10)
    assert swapped["1"].field is None and "swaps" in swapped["1"].note


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_asymmetric_padding_forms() -> None:
    """F.pad with a negative amount crops; reflect pads like zeros; circular wraps and has no field."""
    model = nn.Sequential(
        Pool(lambda x: F.pad(x, (-1, 2, 3, 0))),
        Pool(lambda x: F.pad(x, (1, 1, 0, 2), mode="reflect")),
        nn.Conv2d(3, 3, 3, padding="same", dilation=2),
        nn.Conv2d(3, 3, (2, 4), padding="same"),  # even kernels: extra pixel right/bottom
        nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"),
    )
    geometry = trace_geometry(model, 16)
    assert geometry["0"].field == fields((1, 1, 3), (1, 1, -1))
    assert geometry["1"].field == fields((1, 1, 3), (1, 1, 0))
    assert geometry["2"].field == fields((5, 1, 5), (5, 1, 2))
    assert geometry["3"].field == fields((6, 1, 5), (8, 1, 3))
    assert geometry["4"].field is None and "circular" in geometry["4"].note


# --------------------------------------------------------------------------------------------------
# API


def test_boxes_equals_box_elementwise() -> None:
    hw = (50, 37)
    geometry = LayerGeometry("l", 1, 9, 7, fields((11, 6, 4), (23, 5, 12)))
    y, x = torch.meshgrid(torch.arange(-1, 11), torch.arange(-1, 9), indexing="ij")  # (12, 10) each
    got = boxes(geometry.field, y, x, hw)  # (12, 10, 4)
    assert got.dtype == torch.int32 and got.shape == (12, 10, 4)
    expected = [
        [geometry.box(int(a), int(b), hw) for a, b in zip(ry, rx, strict=True)]
        for ry, rx in zip(y, x, strict=True)
    ]
    assert got.tolist() == [[list(t) for t in row] for row in expected]
    assert boxes(geometry.field, torch.tensor(2), torch.tensor([0, 6]), hw).shape == (2, 4)


def test_span_convention() -> None:
    f = AxisField(size=7, stride=4, padding=3)
    assert f.span(0) == (-3, 4)
    assert f.span(0, 10) == (0, 4)
    assert f.span(3, 10) == (9, 10)
    assert f.span(5, 10) == (10, 10)  # past the input: empty


def test_trace_leaves_model_as_it_was() -> None:
    model = torchvision.models.resnet18(weights=None).train()
    model.layer1.eval()
    geometry = trace_geometry(model, 64)
    assert list(geometry) == [n for n, _ in model.named_modules() if n]
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(not m._forward_hooks for m in model.modules())
    assert all("forward" not in vars(m) for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0
    assert "ran 2 times" in geometry["layer1.0.relu"].note  # torchvision reuses one ReLU per block


def test_names_select_and_unknown_names_list_valid_ones() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert list(trace_geometry(model, 8, names=["1", "0"])) == ["1", "0"]
    with pytest.raises(UserError, match="unknown module 'conv'.* valid modules: 0, 1"):
        trace_geometry(model, 8, names=["conv"])
