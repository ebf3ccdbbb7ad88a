"""Tests for the decoders (`--decoder pil|turbo|gpu`) and precisions (`--precision`): pixels within the stated bound
of the exact path, the same files skipped for the same reasons, the device decoder's fallbacks, and indexes that
record both and are queried under them."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from actindex.indexer import jpeg
from actindex.indexer.build import BuildConfig, build_index
from actindex.indexer.choices import Decoder, Precision
from actindex.indexer.decode import network_input, probe_jpeg, read_bytes
from actindex.indexer.images import DEFAULT_MAX_PIXELS, ImageReadError, Normalize, load_rgb, preprocess, scan_folder
from actindex.indexer.index_file import IndexReader
from actindex.indexer.loader import DeviceDecode, ImageDataset
from actindex.indexer.precision import Numerics, choose_numerics
from actindex.kernels.errors import UserError
from actindex.kernels.spatial import spatial_max
from actindex.query import AtlasConfig, build_atlas
from actindex.query.attribution import attribute
from actindex.query.cli import main as cli
from actindex.query.index import Index
from actindex.query.neuron import check_reproduced

from corpus import make_corpus, smooth_rgb
from helpers import LAYERS, SIZE, make_images

# --------------------------------------------------------------------------------------------- pixels


def _photos() -> list[Image.Image]:
    """Real photographs (scikit-image's, shipped in the demo extra), else generated texture."""
    try:
        from skimage import data

        return [Image.fromarray(a) for a in (data.astronaut(), data.coffee(), data.chelsea(), data.rocket())]
    except ImportError:  # pragma: no cover - the test extra installs it
        rng = np.random.default_rng(0)
        return [Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))]


def _jpeg_variants(root: Path) -> list[Path]:
    """JPEGs of every kind the turbo path takes: sizes that shrink and that enlarge, both orientations of the
    frame, grey, progressive, 4:4:4 and 4:2:2 chroma, qualities 75 and 95, and the eight EXIF orientations."""
    photos, files = _photos(), []

    def save(name: str, im: Image.Image, **params: object) -> None:
        for quality in (75, 95):
            path = root / f"{name}_q{quality}.jpg"
            im.save(path, "JPEG", quality=quality, **params)
            files.append(path)

    for i, photo in enumerate(photos):
        for size in ((40, 30), (224, 224), (500, 375), (375, 500), (1200, 900)):
            save(f"photo{i}_{size[0]}x{size[1]}", photo.resize(size, Image.Resampling.BICUBIC))
    noise = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    save("noise", Image.fromarray(noise))
    save("grey", photos[0].convert("L").resize((500, 375)))
    save("progressive", photos[-1], progressive=True)
    save("chroma444", photos[-1], subsampling=0)
    save("chroma422", photos[-1], subsampling=1)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        save(f"exif{orientation}", photos[0].resize((500, 375)), exif=exif)
    return files


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _jpeg_variants(tmp_path_factory.mktemp("jpegs"))


@pytest.mark.parametrize("size", [224, 48])
def test_turbo_pixels_are_within_one_level_of_pil(jpegs: list[Path], size: int) -> None:
    """The bound docs/BENCHMARKS.md and the README state: |turbo - pil| <= 1 at every pixel."""
    for path in jpegs:
        exact = preprocess(load_rgb(path), size).int()
        turbo = network_input(path, size, DEFAULT_MAX_PIXELS, Decoder.TURBO).int()
        assert turbo.shape == exact.shape == (3, size, size), path.name
        assert (turbo - exact).abs().max() <= 1, path.name


def test_turbo_really_decodes_jpegs_with_libjpeg_turbo(jpegs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Not a test that passes because turbo quietly falls back to Pillow: the JPEGs reach the tensor decoder."""
    calls: list[int] = []
    real = jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, *a, **k: calls.append(1) or real(data, *a, **k))
    for path in jpegs:
        network_input(path, 48, DEFAULT_MAX_PIXELS, Decoder.TURBO)
    assert len(calls) == len(jpegs)


def test_the_two_jpeg_backends_give_the_same_pixels(jpegs: list[Path]) -> None:
    if jpeg.backend().startswith("torchvision"):
        pytest.skip("torchcodec is not installed: torchvision.io is the only backend")
    for path in jpegs:
        data = read_bytes(path)
        a, b = jpeg.decode_jpeg(data), jpeg.decode_jpeg(data, use_torchvision=True)
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
        assert torch.equal(a, b), path.name


def test_the_probe_sends_only_plain_jpegs_to_libjpeg_turbo(tmp_path: Path) -> None:
    smooth_rgb(40, 20).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG")
    smooth_rgb(40, 20).save(tmp_path / "png.jpg", "PNG")  # a PNG named .jpg
    exif = Image.Exif()
    exif[0x0112] = 6
    smooth_rgb(40, 20).save(tmp_path / "turned.jpg", "JPEG", exif=exif)
    assert probe_jpeg(tmp_path / "cmyk.jpg", DEFAULT_MAX_PIXELS) is None
    assert probe_jpeg(tmp_path / "png.jpg", DEFAULT_MAX_PIXELS) is None
    assert probe_jpeg(tmp_path / "turned.jpg", 799) is None  # over the pixel limit: pil says why
    header = probe_jpeg(tmp_path / "turned.jpg", DEFAULT_MAX_PIXELS)
    assert header is not None and (header.width, header.height, header.orientation) == (20, 40, 6)


# --------------------------------------------------------------------------------------------- skips


def _outcomes(root: Path, decoder: Decoder) -> dict[str, tuple[torch.Tensor | None, str]]:
    found = scan_folder(root)
    dataset = ImageDataset(root, found.paths, range(len(found.paths)), 32, DEFAULT_MAX_PIXELS, decoder)
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    if decoder is Decoder.GPU:  # the device stage, run on the CPU: the same code with the CPU decoder
        batch = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)(batch)
    out: dict[str, tuple[torch.Tensor | None, str]] = {}
    for image_id, x in zip(batch.ids.tolist(), batch.pixels, strict=True):
        out[found.paths[image_id]] = (x, "")
    for image_id, reason in batch.skipped:
        out[found.paths[image_id]] = (None, reason)
    assert len(out) == len(found.paths)
    return out


@pytest.mark.parametrize("decoder", [Decoder.TURBO, Decoder.GPU])
def test_every_decoder_reads_and_skips_what_pil_does(tmp_path: Path, decoder: Decoder) -> None:
    """The corpus of odd files (CMYK, 16-bit, EXIF-rotated, truncated, empty, bombs, text named .jpg): the same files
    load and the same are skipped, for the same reasons; pixels within 1 level, equal for the files pil decodes."""
    make_corpus(tmp_path)
    exact, fast = _outcomes(tmp_path, Decoder.PIL), _outcomes(tmp_path, decoder)
    assert exact.keys() == fast.keys()
    for path, (pixels, reason) in exact.items():
        assert fast[path][1] == reason, path
        if pixels is not None:
            other = fast[path][0]
            assert other is not None
            limit = 1 if path.lower().endswith((".jpg", ".jpeg")) and "cmyk" not in path else 0
            assert (other.int() - pixels.int()).abs().max() <= limit, path


@pytest.mark.parametrize("cut", [2, 100, 1000])
def test_a_jpeg_cut_short_near_its_end_is_skipped_by_every_decoder(tmp_path: Path, jpegs: list[Path], cut: int) -> None:
    """Missing only its last bytes (the end-of-image marker, the last scan rows): libjpeg-turbo could fill in grey,
    Pillow refuses; every decoder must refuse too, with Pillow's reason."""
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpegs[0].read_bytes()[:-cut])
    with pytest.raises(ImageReadError) as exact:
        load_rgb(path)
    with pytest.raises(ImageReadError) as turbo:
        network_input(path, 32, DEFAULT_MAX_PIXELS, Decoder.TURBO)
    dataset = ImageDataset(tmp_path, ["cut.jpg"], [0], 32, DEFAULT_MAX_PIXELS, Decoder.GPU)
    done = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)(dataset.collate_fn([dataset[0]]))
    assert turbo.value.reason == exact.value.reason and done.skipped == [(0, exact.value.reason)]


def test_the_device_stage_decodes_in_one_batch_and_orders_by_id(tmp_path: Path, jpegs: list[Path],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i, path in enumerate(jpegs[:6]):
        (root / f"{i}.jpg").write_bytes(path.read_bytes())
    smooth_rgb(30, 20).save(root / "2b.png")  # decoded in the worker, between JPEGs
    found = scan_folder(root)
    dataset = ImageDataset(root, found.paths, range(len(found.paths)), 48, DEFAULT_MAX_PIXELS, Decoder.GPU)
    batch = dataset.collate_fn([dataset[i] for i in range(len(dataset))])
    assert len(batch.encoded) == 6 and batch.ids.tolist() == [found.paths.index("2b.png")]
    calls: list[int] = []
    real = jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, *a, **k: calls.append(len(data)) or real(data, *a, **k))
    done = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)(batch)
    assert calls == [6]  # one call for the batch
    assert done.ids.tolist() == list(range(len(found.paths))) and not done.skipped and not done.encoded
    for image_id, x in zip(done.ids.tolist(), done.pixels, strict=True):
        assert torch.equal(x, network_input(root / found.paths[image_id], 48, DEFAULT_MAX_PIXELS, Decoder.TURBO))


def test_jpeg_bytes_cross_from_dataloader_workers(tmp_path: Path, jpegs: list[Path]) -> None:
    """What the workers hand on for the device decoder survives the trip through a DataLoader's worker processes."""
    for i, path in enumerate(jpegs[:8]):
        (tmp_path / f"{i}.jpg").write_bytes(path.read_bytes())
    paths = [f"{i}.jpg" for i in range(8)]
    dataset = ImageDataset(tmp_path, paths, range(8), 32, DEFAULT_MAX_PIXELS, Decoder.GPU)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=dataset.collate_fn)
    decode = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)
    ids, pixels = [], []
    for batch in loader:
        assert batch.encoded
        done = decode(batch)
        ids += done.ids.tolist()
        pixels += list(done.pixels)
    assert ids == list(range(8))
    for path, x in zip(paths, pixels, strict=True):
        assert torch.equal(x, network_input(tmp_path / path, 32, DEFAULT_MAX_PIXELS, Decoder.TURBO))


def test_a_file_the_device_refuses_takes_the_cpu_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A corrupt JPEG with a good header fails the batch call: the others are decoded singly, the bad one goes to
    the CPU path and is skipped with the pil path's reason; one the device decodes to a wrong size is re-read."""
    for i in range(3):
        smooth_rgb(64 + i, 48).save(tmp_path / f"{i}.jpg", "JPEG", quality=90)
    good = (tmp_path / "1.jpg").read_bytes()
    (tmp_path / "1.jpg").write_bytes(good[:600] + bytes(len(good) - 600))  # header intact, scan data zeroed
    dataset = ImageDataset(tmp_path, ["0.jpg", "1.jpg", "2.jpg"], [0, 1, 2], 32, DEFAULT_MAX_PIXELS, Decoder.GPU)
    items = [dataset[i] for i in range(3)]
    assert all(not isinstance(x, torch.Tensor) for _, x, _ in items)  # all three went to the device stage
    done = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)(dataset.collate_fn(items))
    with pytest.raises(ImageReadError) as pil_error:
        load_rgb(tmp_path / "1.jpg")
    assert done.ids.tolist() == [0, 2] and done.skipped == [(1, pil_error.value.reason)]

    real = jpeg.decode_jpeg
    monkeypatch.setattr(jpeg, "decode_jpeg", lambda data, *a, **k: [x[:, :-1] for x in real(data, *a, **k)]
                        if isinstance(data, list) else real(data, *a, **k)[:, :-1])
    again = DeviceDecode("cpu", DEFAULT_MAX_PIXELS)(dataset.collate_fn([dataset[0], dataset[2]]))
    assert again.ids.tolist() == [0, 2]
    assert torch.equal(again.pixels[0], network_input(tmp_path / "0.jpg", 32, DEFAULT_MAX_PIXELS, Decoder.PIL))


# --------------------------------------------------------------------------------------------- precision


class ViewNet(nn.Module):
    """A custom model that flattens with `.view`, which fails on a channels-last feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7 * 7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.fc(y.view(y.shape[0], -1))


def test_channels_last_only_for_models_that_run_with_it() -> None:
    cpu = torch.device("cpu")
    assert choose_numerics(Precision.FP32, cpu, ViewNet(), 16) == Numerics(Precision.FP32, channels_last=False)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert choose_numerics(Precision.BF16, cpu, conv, 16) == Numerics(Precision.BF16, channels_last=True)
    assert conv[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("precision", [Precision.TF32, Precision.FP16])
def test_cuda_only_precisions_are_refused_on_the_cpu(precision: Precision) -> None:
    with pytest.raises(UserError, match=f"--precision {precision.value} runs on CUDA devices only"):
        choose_numerics(precision, torch.device("cpu"), nn.Conv2d(3, 3, 1), 16)
    assert precision.on(torch.device("cpu")) is Precision.FP32  # a query of such an index recomputes in fp32


def test_scores_are_float32_and_exact_maxima_of_a_bf16_map() -> None:
    maps = torch.randn(2, 5, 4, 6).bfloat16()  # (B, C, H, W)
    values, positions = spatial_max(maps)
    expected, where = maps.float().flatten(2).max(dim=2)
    assert values.dtype == torch.float32 and torch.equal(values, expected) and torch.equal(positions, where)


def test_the_check_tolerance_follows_the_recorded_precision() -> None:
    recorded, now = np.array([10.0, 5.0]), np.array([10.5, 5.2])  # 5 % off: bf16 rounding, not an fp32 build
    check_reproduced("l", 0, ["a", "b"], recorded, now, Precision.BF16)
    with pytest.raises(UserError, match="changed since the build"):
        check_reproduced("l", 0, ["a", "b"], recorded, now, Precision.FP32)


# --------------------------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders of JPEGs, and the broken file."""
    root = tmp_path_factory.mktemp("jpeg_data")
    make_images(root, n=30, seed=3, suffix=".jpg")
    return root


def _build(data: Path, weights: Path, out: Path, decoder: Decoder, precision: Precision) -> Path:
    build_index(BuildConfig(data=data, model="tiny_models:tiny_net", out=out, weights=str(weights), layers=LAYERS,
                            k=4, input_size=SIZE, batch_size=8, workers=0, embed_layer="down", device="cpu",
                            decoder=decoder, precision=precision))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("decoder", "precision"), [(Decoder.TURBO, Precision.FP32), (Decoder.PIL, Precision.BF16),
                                                     (Decoder.TURBO, Precision.BF16)])
def test_an_index_records_its_decoder_and_precision_and_queries_honour_them(
        jpeg_data: Path, weights: Path, tmp_path: Path, decoder: Decoder, precision: Precision) -> None:
    out = _build(jpeg_data, weights, tmp_path / "index.h5", decoder, precision)
    with IndexReader(out) as reader:
        info = reader.info
        assert (info.decoder, info.precision, info.memory_format) == (decoder, precision, "channels_last")
        assert info.build.jpeg_backend == ("" if decoder is Decoder.PIL else jpeg.backend())
        assert json.loads(reader.h5.attrs["config"])["decoder"] == decoder.value
        assert info.num_skipped == 1
    with Index(out) as index:
        for layer in LAYERS:  # every hit of two units per layer re-run under the index's settings, and checked
            for unit in (0, 1):
                result = index.neuron(layer, unit)
                assert all(np.isfinite(hit.recomputed) for hit in result.hits)
        # the recomputation ran in the index's precision: the same batch under that autocast gives the same values
        images = result.images
        x = Normalize(info.mean, info.std, "cpu")(torch.stack([image.pixels for image in images]))
        ys, xs = (torch.tensor([getattr(hit, axis) for hit in result.hits]) for axis in ("y", "x"))
        for numerics, same in ((Numerics(precision), True), (Numerics(Precision.FP32), precision is Precision.FP32)):
            with numerics.running(torch.device("cpu")):
                values = attribute(index.loaded.module, LAYERS[-1], 1, x, ys, xs).values
            assert np.array_equal(values.numpy(), [hit.recomputed for hit in result.hits]) == same
        near = index.similar(image_id=0, k=3, explain=True)
        assert near.hits[0].image_id == 0 and near.hits[0].score == pytest.approx(1.0, abs=2e-2)
    result = CliRunner().invoke(cli, ["info", str(out)])
    assert f"decoder {decoder.value}" in result.output and f"precision {precision.value}" in result.output
    site = build_atlas(AtlasConfig(index=out, out=tmp_path / "site", layers=("block", "head"), units="0-2",
                                   image_format="png", dream=False))  # every hit of 6 units re-made and checked
    assert site.units_computed == 6


@pytest.mark.slow
def test_queries_decode_with_the_index_s_decoder(jpeg_data: Path, weights: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A turbo index's hits are re-made with libjpeg-turbo, not Pillow: the pixels a query sees are the build's."""
    out = _build(jpeg_data, weights, tmp_path / "index.h5", Decoder.TURBO, Precision.FP32)
    with Index(out) as index:
        ids = [int(i) for i in index.layer("head").image[0]]
        images = index.images(ids)
        for image_id, image in zip(ids, images, strict=True):
            path = jpeg_data / index.paths([image_id])[0]
            assert torch.equal(image.pixels, network_input(path, SIZE, DEFAULT_MAX_PIXELS, Decoder.TURBO))


def test_an_index_without_the_attributes_reads_as_pil_fp32_and_an_unknown_value_is_refused(
        weights: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    make_images(data, n=6, seed=5)
    out = _build(data, weights, tmp_path / "index.h5", Decoder.PIL, Precision.FP32)
    with h5py.File(out, "a") as f:
        for key in ("decoder", "precision", "memory_format"):
            del f.attrs[key]
    with IndexReader(out) as reader:
        assert (reader.info.decoder, reader.info.precision, reader.info.memory_format) == \
            (Decoder.PIL, Precision.FP32, "contiguous")
    with h5py.File(out, "a") as f:
        f.attrs["precision"] = "fp8"
    with IndexReader(out) as reader, pytest.raises(UserError, match="precision 'fp8', which this version of "
                                                                     "actindex does not know"):
        _ = reader.info


@pytest.mark.slow
@pytest.mark.parametrize(("recorded", "settings"), [({"decoder": "gpu"}, (Decoder.TURBO, Precision.FP32)),
                                                    ({"precision": "fp16"}, (Decoder.PIL, Precision.FP32)),
                                                    ({"precision": "tf32"}, (Decoder.PIL, Precision.FP32))])
def test_a_cuda_index_is_queried_on_a_machine_without_cuda(jpeg_data: Path, weights: Path, tmp_path: Path,
                                                           recorded: dict[str, str],
                                                           settings: tuple[Decoder, Precision]) -> None:
    """An index built with --decoder gpu (or in tf32, fp16) and queried on a laptop: its hits are re-made with
    libjpeg-turbo (in fp32) and checked; here the CPU build that the CUDA one stands for is relabelled."""
    out = _build(jpeg_data, weights, tmp_path / "index.h5", *settings)
    with h5py.File(out, "a") as f:
        f.attrs.update(recorded)
    with Index(out) as index:
        assert index.info.decoder.on(torch.device("cpu")) is settings[0]
        assert index.info.precision.on(torch.device("cpu")) is settings[1]
        for layer in LAYERS:
            index.neuron(layer, 0)


def test_the_build_command_takes_the_decoder_and_the_precision(jpeg_data: Path, weights: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    runner = CliRunner()
    result = runner.invoke(cli, ["build", str(jpeg_data), "--model", "tiny_models:tiny_net", "--weights", str(weights),
                                 "--out", str(out), "--device", "cpu", "--input-size", str(SIZE), "--workers", "0",
                                 "--decoder", "turbo", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    info = json.loads(runner.invoke(cli, ["info", str(out), "--json"]).output)
    assert (info["decoder"], info["precision"], info["memory_format"]) == ("turbo", "bf16", "channels_last")
    result = runner.invoke(cli, ["neuron", str(out), "--layer", "down", "--unit", "0", "--json"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["build", str(jpeg_data), "--model", "tiny_models:tiny_net", "--out",
                                 str(tmp_path / "x.h5"), "--decoder", "nvjpeg"])
    assert result.exit_code == 2 and "'nvjpeg' is not one of 'pil', 'turbo', 'gpu'" in result.output


@pytest.mark.parametrize(("option", "message"), [
    (("--decoder", "gpu"), "--decoder gpu decodes on a CUDA device"),
    (("--precision", "fp16"), "--precision fp16 runs on CUDA devices only"),
    (("--precision", "tf32"), "--precision tf32 runs on CUDA devices only"),
])
def test_gpu_only_options_on_the_cpu_are_one_line_errors(tmp_path: Path, weights: Path, option: tuple[str, str],
                                                         message: str) -> None:
    data = tmp_path / "data"
    make_images(data, n=3, seed=0)
    out = tmp_path / "index.h5"
    result = CliRunner().invoke(cli, ["build", str(data), "--model", "tiny_models:tiny_net", "--weights",
                                      str(weights), "--out", str(out), "--device", "cpu", *option])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not out.exists() and not os.path.exists(f"{out}.partial")


# --------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_gpu_decoder_on_cuda_reads_and_skips_what_pil_does(tmp_path: Path, jpegs: list[Path]) -> None:
    """nvJPEG's pixels are not libjpeg-turbo's (another IDCT and chroma upsampling): within a few levels; the
    bound measured on a GPU machine is in docs/BENCHMARKS.md. The skips are exactly pil's."""
    make_corpus(tmp_path / "corpus")
    for i, path in enumerate(jpegs):
        (tmp_path / "corpus" / "a" / f"v{i}.jpg").write_bytes(path.read_bytes())
    root = tmp_path / "corpus"
    found = scan_folder(root)
    exact = _outcomes(root, Decoder.PIL)
    dataset = ImageDataset(root, found.paths, range(len(found.paths)), 32, DEFAULT_MAX_PIXELS, Decoder.GPU)
    batch = DeviceDecode("cuda", DEFAULT_MAX_PIXELS)(dataset.collate_fn([dataset[i] for i in range(len(dataset))]))
    assert batch.pixels.is_cuda
    assert sorted(found.paths[i] for i, _ in batch.skipped) == sorted(p for p, (x, _) in exact.items() if x is None)
    for image_id, x in zip(batch.ids.tolist(), batch.pixels.cpu(), strict=True):
        reference = exact[found.paths[image_id]][0]
        assert reference is not None
        assert (x.int() - reference.int()).abs().float().mean() < 1.0, found.paths[image_id]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", list(Precision))
def test_a_cuda_build_in_each_precision_passes_the_activation_check(jpeg_data: Path, weights: Path, tmp_path: Path,
                                                                    precision: Precision) -> None:
    out = tmp_path / "index.h5"
    build_index(dataclasses.replace(
        BuildConfig(data=jpeg_data, model="tiny_models:tiny_net", out=out, weights=str(weights), layers=LAYERS, k=4,
                    input_size=SIZE, batch_size=8, workers=2, embed_layer="down"),
        device="cuda", decoder=Decoder.GPU, precision=precision))
    for device in ("cuda", "cpu"):
        with Index(out, device=device) as index:
            for layer in LAYERS:
                index.neuron(layer, 0)
