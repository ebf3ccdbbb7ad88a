"""`actindex neuron`: a unit's hits re-run and checked, their maps against one-image-at-a-time references."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torchvision import transforms

from actindex.indexer.index_file import IndexReader
from actindex.indexer.models import IMAGENET_MEAN, IMAGENET_STD
from actindex.kernels.errors import UserError
from actindex.query.attribution import attribute
from actindex.query.cli import main
from actindex.query.neuron import query_neuron
from actindex.query.render import TILE, neuron_sheet, patch

from helpers import SIZE, tiny_index
from tiny_models import tiny_net

LAYERS = ("stem", "block", "down", "head")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(index, data, weights): the images are big enough that patches from the originals are sharper."""
    def add_big_image(data: Path) -> None:
        big = Image.fromarray(np.random.default_rng(4).integers(0, 256, (8, 10, 3), dtype=np.uint8))
        big.resize((400, 320), Image.Resampling.BICUBIC).save(data / "class0" / "big.png")

    return tiny_index(tmp_path_factory.mktemp("neuron"), LAYERS, k=6, n=20, seed=3, prepare=add_big_image)


def reference_maps(data: Path, path: str, weights: Path, layer: str, unit: int, y: int, x: int) -> torch.Tensor:
    """The plain gradient of one image, through torchvision transforms and a fresh model, no actindex code."""
    return reference_pass(data, path, weights, layer, unit, y, x)[0]


def reference_pass(data: Path, path: str, weights: Path, layer: str, unit: int, y: int,
                   x: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the plain gradient, the unit's whole (H, W) map) of one image, with no actindex code."""
    model = tiny_net()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    preprocess = transforms.Compose([transforms.Resize(round(SIZE * 256 / 224)), transforms.CenterCrop(SIZE),
                                     transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    x_in = preprocess(Image.open(data / path).convert("RGB")).unsqueeze(0).requires_grad_(True)
    captured: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: captured.__setitem__("out", o.clone()))  # clone: the in-place ReLU after 'stem'
    model(x_in)
    handle.remove()
    out = captured["out"]
    value = out[0, unit, y, x] if out.ndim == 4 else out[0, unit]
    value.backward()
    unit_map = out[0, unit] if out.ndim == 4 else out[0, unit].reshape(1, 1)
    return x_in.grad[0], unit_map.detach()


@pytest.mark.parametrize(("layer", "unit"), [("stem", 2), ("block", 5), ("down", 11), ("head", 3)])
def test_hits_are_the_index_and_gradients_equal_a_one_image_reference(built: tuple[Path, Path, Path], layer: str,
                                                                     unit: int) -> None:
    index, data, weights = built
    result = query_neuron(index, layer, unit, k=4)
    with IndexReader(index) as reader:
        stored = reader.layer(layer)
        paths = reader.image_paths()
    assert [h.image_id for h in result.hits] == stored.image[unit][:4].tolist()
    assert [h.path for h in result.hits] == [paths[i] for i in stored.image[unit][:4]]
    for rank, hit in enumerate(result.hits):
        assert hit.score == pytest.approx(float(stored.value[unit][rank]))
        assert hit.recomputed == pytest.approx(hit.score, rel=1e-4, abs=1e-5)
        assert list(hit.box) == stored.box[unit][rank].tolist()
        assert hit.box_original == result.images[rank].geometry.to_original(hit.box)
        expected = reference_maps(data, hit.path, weights, layer, unit, hit.y, hit.x)
        np.testing.assert_allclose(result.gradient[rank], expected.numpy(), rtol=1e-4, atol=1e-6)
    assert result.guided.shape == result.gradient.shape == (4, 3, SIZE, SIZE)
    if layer == "stem":  # no ReLU between the input and the first conv: guided = plain
        np.testing.assert_allclose(result.guided, result.gradient)
    else:
        assert not np.allclose(result.guided, result.gradient)


def test_a_batch_of_hits_gives_each_image_its_own_maps(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    result = query_neuron(index, "down", 7, k=5)
    model = tiny_net()
    model.load_state_dict(torch.load(built[2], weights_only=True))
    model.eval()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for rank, (hit, image) in enumerate(zip(result.hits, result.images, strict=True)):
        x = (image.pixels.unsqueeze(0).float() / 255 - mean) / std
        alone = attribute(model, "down", 7, x, torch.tensor([hit.y]), torch.tensor([hit.x]))
        np.testing.assert_allclose(result.guided[rank], alone.guided[0].numpy(), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(result.gradient[rank], alone.gradient[0].numpy(), rtol=1e-4, atol=1e-7)


def test_patches_come_from_the_original_when_it_is_sharper(built: tuple[Path, Path, Path]) -> None:
    index, _, _ = built
    with IndexReader(index) as reader:
        big = reader.image_paths().index("class0/big.png")
        down = reader.layer("down")
    unit = next(u for u in range(down.grid.channels) if big in down.image[u].tolist())
    result = query_neuron(index, "down", unit)
    rank = [h.image_id for h in result.hits].index(big)
    hit = result.hits[rank]
    oy0, ox0, oy1, ox1 = hit.box_original
    assert patch(result.images[rank], hit.box).size == (ox1 - ox0, oy1 - oy0)  # 320 px originals vs 48 px input
    assert (oy1 - oy0) > (hit.box[2] - hit.box[0])
    sheet = neuron_sheet(result, context=True, columns=3)
    assert sheet.width >= 3 * TILE and sheet.height >= 2 * 4 * TILE


def test_a_changed_image_or_weights_file_is_reported(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, data, weights = built
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    hit = query_neuron(index, "down", 3, k=1).hits[0]
    Image.new("RGB", (60, 60), (10, 200, 30)).save(copy / hit.path)
    with pytest.raises(UserError, match=r"gives .* now but .* in the index: the model, its weights or the image "
                                        "changed"):
        query_neuron(index, "down", 3, k=1, data=copy)
    other = tmp_path / "other.pt"
    state = tiny_net().state_dict()
    state["down.weight"] = state["down.weight"] * 2
    torch.save(state, other)
    with pytest.raises(UserError, match="not the file the index was built with"):
        query_neuron(index, "down", 3, k=1, weights=str(other))


def test_moved_images_name_the_file_and_the_option(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, data, _ = built
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    original = tmp_path / "gone"
    data.rename(original)
    try:
        with pytest.raises(UserError, match="is not under .*; if the data moved, pass --data-root NEW_ROOT"):
            query_neuron(index, "block", 1, k=2)
        assert len(query_neuron(index, "block", 1, k=2, data=moved).hits) == 2
    finally:
        original.rename(data)


def test_cli_json_picture_and_maps_agree(built: tuple[Path, Path, Path], tmp_path: Path) -> None:
    index, _, _ = built
    out, maps = tmp_path / "unit.png", tmp_path / "maps.npz"
    result = CliRunner().invoke(main, ["neuron", str(index), "--layer", "block", "--unit", "4", "--k", "3",
                                       "--out", str(out), "--save-maps", str(maps), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["outputs"] == {"image": str(out), "maps": str(maps)}
    assert [h["rank"] for h in report["hits"]] == [0, 1, 2]
    arrays = np.load(maps)
    assert arrays["guided"].shape == arrays["gradient"].shape == (3, 3, SIZE, SIZE)
    assert arrays["image_id"].tolist() == [h["image_id"] for h in report["hits"]]
    assert arrays["box"].tolist() == [h["box"] for h in report["hits"]]
    picture = Image.open(out)
    assert picture.width == 6 + 3 * (TILE + 6)  # three columns, one per hit


@pytest.mark.parametrize(("layer", "unit"), [("stem", 2), ("down", 11), ("head", 3)])
def test_activation_maps_and_masks_against_brute_force(built: tuple[Path, Path, Path], tmp_path: Path, layer: str,
                                                       unit: int) -> None:
    """Each hit's whole map against a fresh model's; the mask against a numpy upsampling of that map (np.interp
    along each axis, between receptive-field centres) thresholded at the unit's p99, which itself is checked
    against numpy's quantile of the brute-force scores of every image."""
    index, data, weights = built
    maps_file = tmp_path / "maps.npz"
    report = CliRunner().invoke(main, ["neuron", str(index), "--layer", layer, "--unit", str(unit), "--k", "3",
                                       "--save-maps", str(maps_file), "--json"])
    assert report.exit_code == 0, report.output
    hits = json.loads(report.stdout)["hits"]
    arrays = np.load(maps_file)
    with IndexReader(index) as reader:
        stored, skipped = reader.layer(layer), {path for path, _ in reader.skipped()}
        paths = [p for p in reader.image_paths() if p not in skipped]
    scores = np.array([float(reference_pass(data, p, weights, layer, unit, 0, 0)[1].max()) for p in paths])
    level = float(arrays["level"])
    assert level == pytest.approx(np.quantile(scores, 0.99, method="inverted_cdf"), rel=0.0078)
    (size_y, size_x), (stride_y, stride_x) = stored.grid.rf_size, stored.grid.rf_stride
    pad_y, pad_x = stored.grid.rf_padding
    for rank, hit in enumerate(hits):
        _, brute = reference_pass(data, hit["path"], weights, layer, unit, *hit["position"])
        np.testing.assert_allclose(arrays["activation"][rank], brute.numpy(), rtol=1e-5, atol=1e-6)
        height, width = brute.shape
        centres_y = np.arange(height) * stride_y - pad_y + size_y / 2 - 0.5  # input-pixel coordinates
        centres_x = np.arange(width) * stride_x - pad_x + size_x / 2 - 0.5
        pixels = np.arange(SIZE)
        rows = np.stack([np.interp(pixels, centres_y, brute[:, j].double().numpy()) for j in range(width)], 1)
        upsampled = np.stack([np.interp(pixels, centres_x, row) for row in rows])  # (S, S)
        np.testing.assert_allclose(arrays["activation_input"][rank], upsampled, rtol=1e-5, atol=1e-5)
        near = np.abs(upsampled - level) < 1e-4 * max(1.0, abs(level))  # float32 vs float64 at the threshold
        assert (arrays["mask_input"][rank] == (upsampled >= level))[~near].all()
        assert arrays[f"activation_original_{rank}"].shape == tuple(hit["image_size"])
        assert arrays[f"mask_original_{rank}"].shape == tuple(hit["image_size"])
    assert float(arrays["activation"][0].max()) >= level  # the best hit reaches the unit's p99 somewhere


def test_cli_writes_a_picture_only_when_asked_with_json(built: tuple[Path, Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    index, _, _ = built
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["neuron", str(index), "--layer", "block", "--unit", "4", "--k", "2",
                                       "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["outputs"] == {"image": None, "maps": None}
    assert list(tmp_path.iterdir()) == []  # nothing written into the current folder
    result = CliRunner().invoke(main, ["neuron", str(index), "--layer", "block", "--unit", "4", "--k", "2"])
    assert result.exit_code == 0, result.output
    assert "Wrote block-unit4.png" in result.output and (tmp_path / "block-unit4.png").is_file()


@pytest.mark.parametrize(("args", "message"), [
    (["--layer", "nope", "--unit", "0"], "unknown layer 'nope'"),
    (["--layer", "down", "--unit", "16"], r"unit 16 is out of range: layer 'down' has 16 units \(0-15\)"),
    (["--layer", "down", "--unit", "-1"], "out of range"),
])
def test_cli_errors_are_one_line(built: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                                 message: str) -> None:
    index, _, _ = built
    out = tmp_path / "unit.png"
    result = CliRunner().invoke(main, ["neuron", str(index), *args, "--out", str(out)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    assert re.search(message, lines[0])
    assert not out.exists()


def test_a_weights_file_that_moved_is_named_and_can_be_pointed_at(built: tuple[Path, Path, Path],
                                                                 tmp_path: Path) -> None:
    index, _, weights = built
    moved = tmp_path / "moved.pt"
    shutil.copy(weights, moved)
    weights.rename(tmp_path / "gone.pt")
    try:
        with pytest.raises(UserError, match="built with the weights file .*tiny.pt', which is not there any "
                                            "more; pass --weights PATH"):
            query_neuron(index, "down", 1, k=1)
        hit = query_neuron(index, "down", 1, k=1, weights=str(moved)).hits[0]
        assert hit.recomputed == pytest.approx(hit.score, rel=1e-4)
    finally:
        (tmp_path / "gone.pt").rename(weights)
