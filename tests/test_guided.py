"""GuidedBackprop against guided references built without it: the test's own guided autograd Function, put in
place of every activation by module replacement or by an explicit `act` argument, and captum where its module
hooks are valid. All models run in float64 and eval mode."""

from __future__ import annotations

import collections
import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum.attr import GuidedBackprop as CaptumGuidedBackprop
from captum.attr import NeuronGuidedBackprop
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models.googlenet import BasicConv2d

from actindex.kernels.guided import GuidedBackprop

# (model, input) -> (model output, scalar to differentiate), from one forward pass
Objective = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


# --- The reference: guided gates written here, independent of the module under test -----------------------------------

class RefGate(torch.autograd.Function):
    """y = fn(x); backward passes grad where lo < x < hi and grad > 0 (Springenberg et al. 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lo: float, hi: float, fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bounds = (lo, hi)
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        lo, hi = ctx.bounds
        return grad * ((x > lo) & (x < hi)).to(grad.dtype) * (grad > 0).to(grad.dtype), None, None, None


def ref_gate(lo: float, hi: float = math.inf) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: RefGate.apply(x, lo, hi, lambda t: t.clamp(lo, None if hi == math.inf else hi))


ref_relu = ref_gate(0.0)


class RefGateModule(nn.Module):
    def __init__(self, gate: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(x)


def replaced(model: nn.Module, kind: type[nn.Module], make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """A deep copy with every `kind` module swapped for `make(module)`: a reused module is swapped at every use."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, kind):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, make(module))
    return model


# --- Helpers ----------------------------------------------------------------------------------------------------------

def run(model: nn.Module, x: torch.Tensor, objective: Objective, mode: TorchFunctionMode | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(model output, d objective / d input), the forward under `mode` when given."""
    x = x.detach().clone().requires_grad_(True)
    if mode is None:
        out, value = objective(model, x)
    else:
        with mode:
            out, value = objective(model, x)
    (grad,) = torch.autograd.grad(value, x)
    return out.detach(), grad


def logit(k: int) -> Objective:
    def objective(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(x)
        return out, out[:, k].sum()
    return objective


def unit(layer: str, channel: int, y: int, x: int) -> Objective:
    """The sum over the batch of one unit of `layer` at (y, x), read inside a hook before any later in-place op."""
    def objective(model: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        taken: list[torch.Tensor] = []
        handle = model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out: taken.append(out[:, channel, y, x]))
        try:
            out = model(inputs)
        finally:
            handle.remove()
        return out, taken[0].sum()
    return objective


def active_channel(model: nn.Module, layer: str, x: torch.Tensor, y: int, x_pos: int) -> int:
    """The first channel of `layer` that is on at (y, x_pos) in every image: each image then has a map."""
    taken: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: taken.append(out[:, :, y, x_pos]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return int(torch.nonzero((taken[0] > 0).all(0))[0])


def assert_same_map(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert expected.abs().max() > 0, "a reference of zeros would not test anything"
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * expected.abs().max().item())


def assert_differs(a: torch.Tensor, b: torch.Tensor) -> None:
    assert (a - b).abs().max() > 0.05 * b.abs().max()


def guided_vs_reference(model: nn.Module, reference: nn.Module, x: torch.Tensor, objective: Objective
                        ) -> GuidedBackprop:
    """Asserts the forward is unchanged, the guided map equals the reference's and differs from the gradient."""
    plain_out, plain = run(model, x, objective)
    mode = GuidedBackprop()
    out, guided = run(model, x, objective, mode)
    _, expected = run(reference, x, objective)
    assert torch.equal(out, plain_out)
    assert_same_map(guided, expected)
    assert_differs(guided, plain)
    return mode


class CountCalls(TorchFunctionMode):
    """Counts calls by function name; nested calls are not seen, as in any TorchFunctionMode."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        self.calls[getattr(func, "__name__", repr(func))] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # These tensors are tiny: threads gain nothing, and when other processes hold the cores, OpenMP threads
    # that wait for each other make the file several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def double() -> Any:
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


# --- Functional ReLUs -------------------------------------------------------------------------------------------------

class FunctionalNet(nn.Module):
    """Every ReLU is a function call, in the spellings torchvision and timm use; `act`, when set, replaces all."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(6))
        self.head = nn.Linear(8, 5)
        self.act: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, c = self.act, self.convs
        x = c[0](x)
        x = F.relu(x) if a is None else a(x)
        x = c[1](x)
        x = torch.relu(x) if a is None else a(x)
        x = c[2](x)
        x = x.relu() if a is None else a(x)
        x = c[3](x)
        x = F.relu(x, inplace=True) if a is None else a(x)  # as DenseNet and GoogLeNet write it
        x = c[4](x)
        x = torch.relu_(x) if a is None else a(x)
        x = c[5](x)
        if a is None:
            x.relu_()  # the return value is dropped: only the side effect rectifies x
        else:
            x = a(x)
        return self.head(x.mean((2, 3)))


def functional_net() -> tuple[FunctionalNet, FunctionalNet]:
    model = FunctionalNet().eval()
    reference = copy.deepcopy(model)
    reference.act = ref_relu
    return model, reference


def test_functional_relus_are_guided_where_captum_sees_none() -> None:
    model, reference = functional_net()
    x = torch.randn(2, 3, 32, 32)
    mode = guided_vs_reference(model, reference, x, logit(2))
    assert mode.guided == {"relu": 6}  # F.relu calls torch.relu inside: still one ReLU each
    assert not mode.unguided
    # captum hooks nn.ReLU modules; there are none, so its "guided" map is the plain gradient.
    _, plain = run(model, x, logit(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = CaptumGuidedBackprop(model).attribute(x.clone().requires_grad_(True), target=2)
    assert_same_map(captum, plain)


def test_dropped_return_value_keeps_the_in_place_side_effect() -> None:
    conv = nn.Conv2d(3, 4, 3)

    def model(x: torch.Tensor) -> torch.Tensor:
        y = conv(x)
        y.relu_()
        return y

    x = torch.randn(1, 3, 16, 16)
    assert (conv(x) < 0).any()
    with GuidedBackprop():
        out = model(x.requires_grad_(True))
    assert torch.equal(out, F.relu(conv(x)))
    (guided,) = torch.autograd.grad(out[0, 1].sum() - out[0, 2].sum(), x)
    expected_out = ref_relu(conv(x))
    (expected,) = torch.autograd.grad(expected_out[0, 1].sum() - expected_out[0, 2].sum(), x)
    assert_same_map(guided, expected)


def test_in_place_on_a_view_gates_only_the_view() -> None:
    conv = nn.Conv2d(3, 6, 3)
    x = torch.randn(1, 3, 12, 12, requires_grad=True)
    with GuidedBackprop():
        y = conv(x)
        y[:, :3].relu_()  # channels 3.. stay linear
    assert torch.equal(y, torch.cat([F.relu(conv(x)[:, :3]), conv(x)[:, 3:]], dim=1))
    (guided,) = torch.autograd.grad(y[0, 1:5].sum() - y[0, 0].sum(), x)
    ref = conv(x)
    ref = torch.cat([ref_relu(ref[:, :3]), ref[:, 3:]], dim=1)
    (expected,) = torch.autograd.grad(ref[0, 1:5].sum() - ref[0, 0].sum(), x)
    assert_same_map(guided, expected)


# --- ResNet's reused in-place nn.ReLU, and captum where its hooks are valid -------------------------------------------

@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).double().eval()


def test_resnet18_reused_in_place_relu(resnet18: nn.Module) -> None:
    reference = replaced(resnet18, nn.ReLU, lambda _: RefGateModule(ref_relu))
    mode = guided_vs_reference(resnet18, reference, torch.randn(2, 3, 64, 64), unit("layer3", 5, 2, 1))
    assert mode.guided == {"relu": 1 + 8 * 2}  # the stem, then each block's one module twice


def test_batch_maps_equal_one_image_at_a_time(resnet18: nn.Module) -> None:
    to_layer3 = nn.Sequential(*list(resnet18.children())[:7])  # stem .. layer3: nothing after it matters
    x = torch.randn(4, 3, 32, 32)
    objective = unit("6", active_channel(to_layer3, "6", x, 1, 1), 1, 1)
    _, batch = run(to_layer3, x, objective, GuidedBackprop())
    singles = torch.cat([run(to_layer3, x[i:i + 1], objective, GuidedBackprop())[1] for i in range(4)])
    for i in range(4):
        assert_same_map(batch[i], singles[i])
    # The images' maps differ from each other: the sum over the batch did not mix them.
    assert_differs(batch[0], batch[1])


def test_captum_neuron_guided_backprop_where_its_hooks_are_valid() -> None:
    # Distinct, not in-place nn.ReLU modules: the case module hooks handle.
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(2, 3, 32, 32)
    _, guided = run(model, x, unit("8", 3, 4, 5), GuidedBackprop())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = NeuronGuidedBackprop(model, model[8]).attribute(x.clone().requires_grad_(True),
                                                                  neuron_selector=(3, 4, 5))
    assert_same_map(guided, captum)
    _, plain = run(model, x, unit("8", 3, 4, 5))
    assert_differs(guided, plain)


# --- ReLU6 and hardtanh -----------------------------------------------------------------------------------------------

class ClampNet(nn.Module):
    """MobileNetV2-style nn.ReLU6(inplace=True) modules (they call F.hardtanh) and one functional hardtanh."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.r1, self.r2 = nn.ReLU6(inplace=True), nn.ReLU6(inplace=True)
        self.head = nn.Linear(8, 3)
        self.act: Callable[[torch.Tensor], torch.Tensor] = lambda x: F.hardtanh(x, -1.0, 1.0)
        with torch.no_grad():  # large weights, so that many units pass the upper bounds
            for conv in (self.c1, self.c2, self.c3):
                conv.weight.mul_(8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.bn(self.c1(x)))
        x = self.r2(self.c2(x))
        return self.head(self.act(self.c3(x)).mean((2, 3)))


def test_relu6_and_hardtanh() -> None:
    model = ClampNet().eval()

    def gated(hi6: float, hi1: float) -> nn.Module:
        reference = replaced(model, nn.ReLU6, lambda _: RefGateModule(ref_gate(0.0, hi6)))
        reference.act = ref_gate(-1.0, hi1)
        return reference

    x = torch.randn(2, 3, 24, 24)
    mode = guided_vs_reference(model, gated(6.0, 1.0), x, logit(1))
    assert mode.guided == {"hardtanh": 3}
    # The upper bounds matter here: a reference that ignores them gives another map.
    _, guided = run(model, x, logit(1), GuidedBackprop())
    _, lower_only = run(gated(math.inf, math.inf), x, logit(1))
    assert_differs(guided, lower_only)


# --- Every spelling of every gate, one at a time ----------------------------------------------------------------------

SPELLINGS: list[tuple[str, Callable[[torch.Tensor], torch.Tensor], str, float, float]] = [
    # (id, gate, counter name, lo, hi)
    ("F.relu", F.relu, "relu", 0, math.inf),
    ("F.relu-inplace", lambda x: F.relu(x, inplace=True), "relu", 0, math.inf),
    ("F.relu_", F.relu_, "relu", 0, math.inf),
    ("torch.relu", torch.relu, "relu", 0, math.inf),
    ("torch.relu_", torch.relu_, "relu", 0, math.inf),
    ("Tensor.relu", lambda x: x.relu(), "relu", 0, math.inf),
    ("Tensor.relu_", lambda x: x.relu_(), "relu", 0, math.inf),
    ("nn.ReLU-inplace", nn.ReLU(inplace=True), "relu", 0, math.inf),
    ("F.relu6", F.relu6, "relu6", 0, 6),
    ("F.relu6-inplace", lambda x: F.relu6(x, inplace=True), "relu6", 0, 6),
    ("nn.ReLU6", nn.ReLU6(), "hardtanh", 0, 6),
    ("F.hardtanh", lambda x: F.hardtanh(x, min_val=-2.0, max_val=3.0), "hardtanh", -2, 3),
    ("F.hardtanh-inplace", lambda x: F.hardtanh(x, inplace=True), "hardtanh", -1, 1),
    ("F.hardtanh_", lambda x: F.hardtanh_(x, -1.5, 1.5), "hardtanh", -1.5, 1.5),
    ("nn.Hardtanh", nn.Hardtanh(-2.0, 2.0), "hardtanh", -2, 2),
    ("torch.clamp-min0", lambda x: torch.clamp(x, 0), "clamp", 0, math.inf),
    ("torch.clamp-0-6", lambda x: torch.clamp(x, min=0, max=6), "clamp", 0, 6),
    ("torch.clamp_", lambda x: torch.clamp_(x, -1, 4), "clamp", -1, 4),
    ("torch.clip", lambda x: torch.clip(x, -1.0, 1.0), "clamp", -1, 1),
    ("Tensor.clamp", lambda x: x.clamp(min=0), "clamp", 0, math.inf),
    ("Tensor.clamp_", lambda x: x.clamp_(0, 6), "clamp", 0, 6),
    ("Tensor.clip", lambda x: x.clip(0.0), "clamp", 0, math.inf),
    ("Tensor.clip_", lambda x: x.clip_(min=-1, max=1), "clamp", -1, 1),
    ("torch.clamp_min", lambda x: torch.clamp_min(x, 0.0), "clamp", 0, math.inf),
    ("Tensor.clamp_min_", lambda x: x.clamp_min_(0), "clamp", 0, math.inf),
    ("F.threshold", lambda x: F.threshold(x, 0.0, 0.0), "threshold", 0, math.inf),
    ("F.threshold_", lambda x: F.threshold_(x, 0.0, 0.0), "threshold", 0, math.inf),
    ("torch.threshold", lambda x: torch.threshold(x, 0.0, 0.0), "threshold", 0, math.inf),
    ("nn.Threshold-shifted", nn.Threshold(0.5, -1.0), "threshold", 0.5, math.inf),
]


def conv_gate_conv(gate: Callable[[torch.Tensor], torch.Tensor]) -> nn.Sequential:
    """conv -> gate -> conv, with large first weights: pre-activations of about ±7 cross every bound above."""
    c1, c2 = nn.Conv2d(3, 6, 3), nn.Conv2d(6, 4, 3)
    with torch.no_grad():
        c1.weight.mul_(12.0)
    return nn.Sequential(c1, RefGateModule(gate), c2).eval()


def two_signs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An objective whose gradient at the gate has both signs."""
    out = model(x)
    return out, out[0, 1].sum() - out[0, 2].sum()


@pytest.mark.parametrize(("gate", "name", "lo", "hi"), [s[1:] for s in SPELLINGS], ids=[s[0] for s in SPELLINGS])
def test_every_spelling_is_guided_once(gate: Callable[[torch.Tensor], torch.Tensor], name: str, lo: float,
                                       hi: float) -> None:
    torch.manual_seed(1)
    model = conv_gate_conv(gate)
    x = torch.randn(1, 3, 16, 16)
    pre = model[0](x)
    assert (pre < lo).any() and (pre > lo).any() and (hi == math.inf or (pre > hi).any())
    reference = copy.deepcopy(model)
    reference[1] = RefGateModule(lambda t: RefGate.apply(t, lo, hi, lambda u: gate(u.clone())))
    mode = guided_vs_reference(model, reference, x, two_signs)
    assert mode.guided == {name: 1}  # F.relu calls torch.relu, nn.ReLU6 calls F.hardtanh: still one each
    assert not mode.unguided


@pytest.mark.parametrize("gate", [lambda x: x.clamp(min=1e-3), lambda x: torch.clamp(x, max=6.0),
                                  lambda x: x.clamp_max(1.0), lambda x: torch.clamp(x, min=torch.zeros(()))],
                         ids=["floor-eps", "cap-only", "clamp_max", "tensor-bound"])
def test_clamps_that_are_not_gates_run_plain_and_are_reported(gate: Callable[[torch.Tensor], torch.Tensor]
                                                              ) -> None:
    model = conv_gate_conv(gate)
    x = torch.randn(1, 3, 16, 16)
    plain_out, plain = run(model, x, two_signs)
    mode = GuidedBackprop()
    out, guided = run(model, x, two_signs, mode)
    assert torch.equal(out, plain_out)
    assert torch.equal(guided, plain)
    assert mode.unguided == {"clamp": 1} and not mode.guided


def test_clamping_integers_is_no_activation() -> None:
    index = torch.arange(-3, 9)
    with GuidedBackprop() as mode:
        clamped = index.clamp(0, 5)
        rectified = torch.relu(index)
    assert torch.equal(clamped, index.clamp(0, 5)) and torch.equal(rectified, index.relu())
    assert not mode.guided and not mode.unguided


# --- A real model with functional in-place ReLUs: GoogLeNet -----------------------------------------------------------

class RefBasicConv(nn.Module):
    """torchvision's BasicConv2d (conv, bn, F.relu in place) with the reference gate for its ReLU."""

    def __init__(self, basic: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn = basic.conv, basic.bn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ref_relu(self.bn(self.conv(x)))


def test_googlenet_functional_in_place_relus() -> None:
    model = torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False).double().eval()
    reference = replaced(model, BasicConv2d, RefBasicConv)
    x = torch.randn(1, 3, 64, 64)
    channel = active_channel(model, "inception4a", x, 1, 2)
    mode = guided_vs_reference(model, reference, x, unit("inception4a", channel, 1, 2))
    counter = CountCalls()
    with torch.no_grad(), counter:
        model(x)
    relus = counter.calls["relu"]
    assert relus == sum(isinstance(m, BasicConv2d) for m in model.modules()) > 50
    assert mode.guided == {"relu": relus}  # all of them: the forward ran to the end inside the hook objective
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())  # nothing a module hook could have seen


# --- Activations guided backprop is not defined for -------------------------------------------------------------------

class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1)
        self.silu, self.gelu = nn.SiLU(), nn.GELU()
        self.head = nn.Linear(8, 4)
        self.relu: Callable[[torch.Tensor], torch.Tensor] = F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.silu(self.c1(x)))
        x = self.gelu(self.c2(x))
        x = x * torch.sigmoid(self.c3(x))  # a squeeze-excitation-like gate
        return self.head(self.relu(x).mean((2, 3)))


def test_unguided_activations_are_reported_and_keep_their_gradient() -> None:
    model = MixedNet().eval()
    reference = copy.deepcopy(model)
    reference.relu = ref_relu
    mode = guided_vs_reference(model, reference, torch.randn(2, 3, 20, 20), logit(0))
    assert mode.unguided == {"silu": 1, "gelu": 1, "sigmoid": 1}
    assert mode.guided == {"relu": 2}


# --- Values that can be written down ----------------------------------------------------------------------------------

def test_closed_form_on_hand_set_weights() -> None:
    w1 = torch.tensor([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [-1.0, 0.0, 3.0], [2.0, 1.0, 0.0]])  # (4, 3)
    w2 = torch.tensor([1.5, -1.0, 2.0, -0.5])
    x = torch.tensor([[1.0, 0.5, -0.2]], requires_grad=True)  # h = w1 x = (-0.1, 0.3, -1.6, 2.5)
    with GuidedBackprop() as mode:
        y = F.relu(x @ w1.t()) @ w2
    (guided,) = torch.autograd.grad(y.sum(), x)
    # Only h2 and h4 are open; of their weights in w2, -1.0 and -0.5, neither is positive: nothing passes.
    assert torch.equal(guided, torch.zeros(1, 3))
    (plain,) = torch.autograd.grad((F.relu(x @ w1.t()) @ w2).sum(), x)
    assert torch.allclose(plain, torch.tensor([[-1.0, -1.5, -1.0]]))  # -1.0 * w1[1] - 0.5 * w1[3]
    # Flip w2's signs: now both open units pass, and the guided map is the gradient through them.
    with mode:
        y = F.relu(x @ w1.t()) @ -w2
    (guided,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(guided, torch.tensor([[1.0, 1.5, 1.0]]))
    assert mode.guided == {"relu": 2}


def test_backward_inside_the_mode_and_plain_gradients_after_it() -> None:
    model, reference = functional_net()
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    with GuidedBackprop():
        (inside,) = torch.autograd.grad(model(x)[0, 3], x)
    (expected,) = torch.autograd.grad(reference(x)[0, 3], x)
    assert_same_map(inside, expected)
    (after,) = torch.autograd.grad(model(x)[0, 3], x)  # the mode is gone: ordinary ReLUs again
    model.act = F.relu
    (plain,) = torch.autograd.grad(model(x)[0, 3], x)
    assert torch.equal(after, plain)
    assert_differs(inside, plain)


def test_no_grad_forward_is_unchanged_and_counted() -> None:
    model, _ = functional_net()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), GuidedBackprop() as mode:
        out = model(x)
    assert torch.equal(out, model(x).detach())
    assert mode.guided == {"relu": 6}
