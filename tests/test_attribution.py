"""Attribution methods on a unit's hits, against Captum and closed forms; the sanity check's cascade; the
agreement measures against scipy and scikit-image; the neuron command's options."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import spearmanr
from skimage.metrics import structural_similarity
from torch import nn

from actindex.kernels.agreement import scaled, spearman, ssim
from actindex.kernels.errors import UserError
from actindex.query.attribution import Baseline, Method, Settings, attribute_methods, occlusion_windows, parse_methods
from actindex.query.cli import main
from actindex.query.sanity import FLAG_AT, SanityResult, cascade, modules_up_to, randomize, sanity_check

from helpers import tiny_index

S = 24
ALL = tuple(Method)


def module_relu_net() -> nn.Module:
    """Distinct, not in-place nn.ReLU modules: the case Captum's hooks handle."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 5, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(5, 4, 6)).eval()  # "6": 1x1 output seeing the whole 24 px input


def unit_function(model: nn.Module, layer: str, channel: int, y: int, x: int):  # noqa: ANN201
    """f(x) -> (B,) the unit's activation, for Captum's output-level methods."""
    modules = dict(model.named_modules())

    def f(inputs: torch.Tensor) -> torch.Tensor:
        taken: list[torch.Tensor] = []
        handle = modules[layer].register_forward_hook(lambda m, i, o: taken.append(o))
        try:
            model(inputs)
        finally:
            handle.remove()
        return taken[0][:, channel, y, x]

    return f


def settings(*methods: Method, **changes: object) -> Settings:
    return Settings(methods=methods, **changes)  # type: ignore[arg-type]


def run(model: nn.Module, layer: str, x: torch.Tensor, channel: int | torch.Tensor, y: int | list[int],
        xpos: int | list[int], config: Settings, box: tuple[int, int, int, int] = (0, 0, S, S),
        black: torch.Tensor | None = None) -> dict[Method, torch.Tensor]:
    b = x.shape[0]
    ys = torch.tensor(y if isinstance(y, list) else [y] * b)
    xs = torch.tensor(xpos if isinstance(xpos, list) else [xpos] * b)
    return attribute_methods(model, layer, channel, x, ys, xs, [box] * b, config, black).maps


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(0))


def test_gradient_x_input_equals_captums(x: torch.Tensor) -> None:
    from captum.attr import InputXGradient

    model = module_relu_net()
    ours = run(model, "4", x, 2, 3, 1, settings(Method.GRADIENT_X_INPUT))[Method.GRADIENT_X_INPUT]
    captum = InputXGradient(unit_function(model, "4", 2, 3, 1)).attribute(x.clone().requires_grad_(True))
    torch.testing.assert_close(ours, captum.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("baseline", [Baseline.MEAN, Baseline.BLACK])
def test_integrated_gradients_equal_captums(x: torch.Tensor, baseline: Baseline) -> None:
    from captum.attr import NeuronIntegratedGradients

    model = module_relu_net()
    black = torch.tensor([-2.0, -1.5, -1.8]).view(1, 3, 1, 1)
    ours = run(model, "4", x, 2, 3, 1, settings(Method.INTEGRATED_GRADIENTS, steps=20, baseline=baseline, chunk=7),
               black=black)[Method.INTEGRATED_GRADIENTS]
    start = 0.0 if baseline is Baseline.MEAN else black.expand_as(x)
    captum = NeuronIntegratedGradients(model, model[4]).attribute(
        x, neuron_selector=(2, 3, 1), baselines=start, n_steps=20, method="gausslegendre")
    torch.testing.assert_close(ours, captum.detach(), rtol=1e-4, atol=1e-6)


def test_grad_cam_equals_captums(x: torch.Tensor) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    model = module_relu_net()
    ours = run(model, "4", x, 2, 3, 1, settings(Method.GRAD_CAM, cam_layer="2"))[Method.GRAD_CAM]
    cam = LayerGradCam(unit_function(model, "4", 2, 3, 1), model[2]).attribute(x, relu_attributions=True)
    captum = LayerAttribution.interpolate(cam, (S, S), "bilinear")
    assert ours.shape == (3, 1, S, S) and ours.abs().sum() > 0
    torch.testing.assert_close(ours, captum.detach(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("patch", "stride"), [(6, 3), (4, 4), (8, 2)])
def test_occlusion_equals_captums(x: torch.Tensor, patch: int, stride: int) -> None:
    from captum.attr import Occlusion

    model = module_relu_net()
    ours = run(model, "6", x, 1, 0, 0, settings(Method.OCCLUSION, patch=patch, stride=stride, chunk=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captum = Occlusion(unit_function(model, "6", 1, 0, 0)).attribute(
            x, sliding_window_shapes=(3, patch, patch), strides=(3, stride, stride), baselines=0)
    torch.testing.assert_close(ours[Method.OCCLUSION].expand_as(captum), captum, rtol=1e-5, atol=1e-6)


def test_occlusion_stays_inside_the_box() -> None:
    windows = occlusion_windows((-3, 10, 14, 40), 32, 4, 2)
    assert {w[0] for w in windows} == set(range(0, 11, 2)) and {w[1] for w in windows} == set(range(10, 29, 2))
    assert all(0 <= y0 < y1 <= 14 and 10 <= x0 < x1 <= 32 for y0, x0, y1, x1 in windows)
    assert occlusion_windows((0, 0, 3, 3), 32, 8, 4) == [(0, 0, 3, 3)]  # a box smaller than the patch


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


def test_closed_forms_on_a_quadratic_unit() -> None:
    """f(x) = sum(w x^2): gradient 2 w x, gradient x input 2 w x^2, integrated gradients w (x^2 - x0^2) exactly
    (the quadrature is exact for a gradient linear along the path)."""
    torch.manual_seed(3)
    head = nn.Conv2d(3, 2, S, bias=False)
    model = nn.Sequential(Square(), head).eval()
    x = torch.randn(2, 3, S, S)
    black = torch.tensor([-1.0, 0.5, 2.0]).view(1, 3, 1, 1)
    w = head.weight[1].detach()
    maps = run(model, "1", x, 1, 0, 0, settings(Method.GRADIENT, Method.GRADIENT_X_INPUT, Method.INTEGRATED_GRADIENTS,
                                                 steps=2, baseline=Baseline.BLACK), black=black)
    torch.testing.assert_close(maps[Method.GRADIENT], 2 * w * x)
    torch.testing.assert_close(maps[Method.GRADIENT_X_INPUT], 2 * w * x * x)
    torch.testing.assert_close(maps[Method.INTEGRATED_GRADIENTS], w * (x * x - black * black), rtol=1e-5, atol=1e-6)
    # completeness: integrated gradients add up to f(x) - f(x0)
    total = maps[Method.INTEGRATED_GRADIENTS].sum(dim=(1, 2, 3))
    expected = (w * x * x).sum(dim=(1, 2, 3)) - (w * black * black).sum()
    torch.testing.assert_close(total, expected, rtol=1e-5, atol=1e-5)


def test_batched_equals_one_image_at_a_time(x: torch.Tensor) -> None:
    """Each image its own unit and position, every method; chunks smaller than the batch mix images."""
    model = module_relu_net()
    config = settings(*ALL, cam_layer="2", steps=6, chunk=4, patch=6, stride=3)
    units, ys, xs = torch.tensor([2, 0, 3]), [3, 1, 5], [1, 4, 0]
    boxes = [(0, 0, 20, 24), (4, 2, 24, 24), (0, 0, 24, 24)]
    batch = attribute_methods(model, "4", units, x, torch.tensor(ys), torch.tensor(xs), boxes, config).maps
    for i in range(3):
        alone = attribute_methods(model, "4", int(units[i]), x[i:i + 1], torch.tensor(ys[i:i + 1]),
                                  torch.tensor(xs[i:i + 1]), boxes[i:i + 1], config).maps
        for method in ALL:
            torch.testing.assert_close(batch[method][i:i + 1], alone[method], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(batch[Method.GRADIENT][0], batch[Method.GRADIENT][1])


def test_methods_are_parsed_in_order_and_checked() -> None:
    assert parse_methods("grad-cam, guided,grad-cam") == (Method.GRAD_CAM, Method.GUIDED)
    with pytest.raises(UserError, match="unknown method 'ig'.*integrated-gradients"):
        parse_methods("guided,ig")
    with pytest.raises(UserError, match="grad-cam needs --cam-layer"):
        Settings(methods=(Method.GRAD_CAM,)).check("layer4")


# --- the sanity check -------------------------------------------------------------------------------------------------

def test_the_cascade_lists_the_modules_up_to_the_unit_last_first(x: torch.Tensor) -> None:
    model = module_relu_net()
    assert modules_up_to(model, "4", x) == ["0", "2", "4"]  # not "6", which runs after the unit
    assert cascade(model, "4", x, 5) == [("4",), ("2",), ("0",)]
    assert cascade(model, "6", x, 2) == [("6", "4"), ("2", "0")]


def test_randomize_redraws_exactly_the_named_modules_keeping_their_statistics(x: torch.Tensor) -> None:
    model = module_relu_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    randomize(model, ["2"], torch.Generator().manual_seed(0))
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("2."):
            assert not torch.equal(value, after[key])
            assert float(after[key].mean()) == pytest.approx(float(value.mean()), abs=3 * float(value.std()) / 5)
        else:
            assert torch.equal(value, after[key])


def test_sanity_check_leaves_the_model_alone_and_is_seeded(x: torch.Tensor) -> None:
    model = module_relu_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = settings(Method.GUIDED, Method.GRADIENT, Method.GRAD_CAM, cam_layer="2")
    ys, xs = torch.tensor([3, 1, 5]), torch.tensor([1, 4, 0])
    boxes = [(0, 0, 24, 24)] * 3
    reference = attribute_methods(model, "4", 2, x, ys, xs, boxes, config).maps
    first = sanity_check(model, "4", 2, x, ys, xs, boxes, config, reference, steps=3, seed=7)
    again = sanity_check(model, "4", 2, x, ys, xs, boxes, config, reference, steps=3, seed=7)
    other = sanity_check(model, "4", 2, x, ys, xs, boxes, config, reference, steps=3, seed=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert first.steps == (("4",), ("2",), ("0",))
    assert first.spearman == again.spearman and first.ssim == again.ssim
    assert first.spearman != other.spearman
    assert all(len(v) == 3 and all(-1 <= r <= 1 for r in v) for v in first.spearman.values())
    # nothing randomized would agree perfectly: check the measure on the reference against itself
    same = sanity_check(model, "4", 2, x, ys, xs, boxes, config, reference, steps=1, seed=0)
    assert same.steps == (("4", "2", "0"),)
    json.dumps(first.to_json())


def test_a_method_whose_maps_survive_the_first_step_is_flagged() -> None:
    result = SanityResult((("a",), ("b",)), {Method.GUIDED: (0.9, 0.1), Method.GRADIENT: (0.1, 0.9)},
                          {Method.GUIDED: (0.5, 0.5), Method.GRADIENT: (0.5, 0.5)}, 0)
    assert result.flagged == (Method.GUIDED,) and FLAG_AT == 0.5
    assert result.to_json()["methods"]["guided"]["flagged"] is True  # type: ignore[index]


def test_agreement_measures_equal_scipy_and_scikit_image() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 30, 41, generator=g)
    b = a + 0.4 * torch.rand(3, 30, 41, generator=g)
    a[0, :6, :6] = 0.5  # ties
    b[1, :9] = 0.2
    expected = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(3)]
    np.testing.assert_allclose(spearman(a, b).numpy(), expected, rtol=1e-12)
    sa, sb = scaled(a - 0.5), scaled(b - 0.5)
    assert float(sa.min()) >= 0 and float(sa.max()) <= 1
    expected = [structural_similarity(sa[i].double().numpy(), sb[i].double().numpy(), gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False, data_range=1) for i in range(3)]
    np.testing.assert_allclose(ssim(sa, sb).numpy(), expected, rtol=1e-7)  # our window is float32
    assert float(ssim(sa, sa)[0]) == pytest.approx(1.0)


# --- the command ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_index(tmp_path_factory.mktemp("attribution"), ("stem", "block", "down"), k=3, n=12, seed=2)[0]


def test_neuron_draws_every_method_and_the_sanity_check(built: Path, tmp_path: Path) -> None:
    out, maps = tmp_path / "u.png", tmp_path / "m.npz"
    result = CliRunner().invoke(main, ["neuron", str(built), "--layer", "down", "--unit", "3", "--methods",
                                       ",".join(m.value for m in ALL), "--cam-layer", "stem", "--ig-steps", "4",
                                       "--sanity", "--sanity-steps", "2", "--out", str(out),
                                       "--save-maps", str(maps), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["methods"] == [m.value for m in ALL] and report["cam_layer"] == "stem"
    assert len(report["sanity"]["steps"]) == 2
    assert set(report["sanity"]["methods"]) == {m.value for m in ALL}
    arrays = np.load(maps)
    for method in ALL:
        channels = 1 if method in (Method.GRAD_CAM, Method.OCCLUSION) else 3
        assert arrays[method.value].shape == (3, channels, 48, 48)
    text = CliRunner().invoke(main, ["neuron", str(built), "--layer", "down", "--unit", "3", "--k", "2",
                                     "--methods", "guided,gradient", "--sanity", "--sanity-steps", "2",
                                     "--out", str(out)])
    assert text.exit_code == 0, text.output
    assert "sanity check" in text.output and "step 1: down" in text.output


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "guided,saliency"], "unknown method 'saliency'"),
    (["--methods", "grad-cam"], "grad-cam needs --cam-layer"),
    (["--methods", "grad-cam", "--cam-layer", "nope"], "unknown layer 'nope'"),
    (["--methods", "grad-cam", "--cam-layer", "head"], "--cam-layer 'head' does not run before 'down'"),
    (["--sanity", "--sanity-steps", "0"], "--sanity-steps must be at least 1"),
])
def test_bad_method_options_are_one_line(built: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["neuron", str(built), "--layer", "down", "--unit", "3", "--k", "1",
                                       "--out", str(tmp_path / "u.png"), *args])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "u.png").exists()


def test_an_open_index_answers_with_methods_and_the_sanity_check(built: Path) -> None:
    from actindex.query.index import Index

    with Index(built) as index:
        result = index.neuron("down", 3, k=2, settings=Settings((Method.OCCLUSION, Method.GUIDED), patch=8),
                              sanity=1)
    assert list(result.attributions) == [Method.OCCLUSION, Method.GUIDED]
    assert result.sanity is not None and len(result.sanity.steps) == 1
    assert result.attributions[Method.OCCLUSION].shape == (2, 1, 48, 48)
