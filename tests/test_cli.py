"""The command line: output, and one-line errors with a non-zero exit and nothing overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from actindex.query.cli import main

from helpers import make_images
from tiny_models import tiny_net

TINY = ["--model", "tiny_models:tiny_net", "--input-size", "48", "--workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-data")
    make_images(root, n=12)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli-weights") / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(tiny_net().state_dict(), str(path))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *needles: str) -> None:
    assert code != 0, output
    lines = [line for line in output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in lines[0], output


def test_build_then_info(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "index.h5"
    code, output = invoke("build", data, "--out", out, "--weights", weights, "--k", "3", *TINY)
    assert code == 0, output
    assert "Indexed 12 of 13 images (1 skipped)" in output and f"Wrote {out}" in output
    assert sorted(p.name for p in out.parent.iterdir()) == ["index.faiss", "index.h5"]  # no temporary file left
    assert "similarity index index.faiss: IDMap2,Flat over 12 vectors of 'down'" in invoke("info", out)[1]
    code, output = invoke("info", out)
    assert code == 0, output
    assert "skipped class1/img_broken.jpg" in output and "layer down: 16 channels" in output
    code, output = invoke("info", out, "--json")
    described = json.loads(output)
    assert described["k"] == 3 and described["num_images"] == 13 and len(described["skipped"]) == 1
    assert [layer["name"] for layer in described["layers"]] == ["stem", "block", "down"]  # default stages


def test_existing_output_is_kept_without_overwrite(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    out.write_bytes(b"precious")
    code, output = invoke("build", data, "--out", out, "--weights", weights, *TINY)
    assert_one_line_error(code, output, "already exists", "--overwrite")
    assert out.read_bytes() == b"precious"
    code, output = invoke("build", data, "--out", out, "--weights", weights, "--overwrite", *TINY)
    assert code == 0, output
    assert h5py.is_hdf5(out)


@pytest.mark.parametrize(("args", "needles"), [
    (["--model", "resnet9000"], ["unknown model 'resnet9000'", "resnet18"]),
    (["--model", "tiny_models:nope"], ["unknown factory 'nope'", "tiny_net"]),
    (["--model", "no_such_package.models:net"], ["cannot import 'no_such_package.models'"]),
    (["--model", "tiny_models:not_a_module"], ["not a torch.nn.Module"]),
    (["--layers", "stem,nope"], ["unknown layer 'nope'", "block.conv1"]),
    (["--k", "0"], ["--k must be at least 1"]),
    (["--bottom-k", "-1"], ["--bottom-k must be 0 (off) or more, got -1"]),
    (["--weights", "missing.pt"], ["does not exist"]),
    (["--weights", "IMAGENET1K_V1"], ["neither a weights name"]),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], ["device"]),
])
def test_bad_options_give_one_line(data: Path, weights: Path, tmp_path: Path, args: list[str],
                                   needles: list[str]) -> None:
    options = TINY.copy()
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in options:
            options[options.index(flag) + 1] = value
        else:
            options += [flag, value]
    code, output = invoke("build", data, "--out", tmp_path / "i.h5", *options)
    assert_one_line_error(code, output, *needles)
    assert not list(tmp_path.iterdir())


def test_missing_and_empty_data_folders(tmp_path: Path) -> None:
    code, output = invoke("build", tmp_path / "nowhere", "--out", tmp_path / "i.h5", *TINY)
    assert_one_line_error(code, output, "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    code, output = invoke("build", tmp_path / "empty", "--out", tmp_path / "i.h5", *TINY)
    assert_one_line_error(code, output, "empty")


def test_weights_that_do_not_fit(data: Path, tmp_path: Path) -> None:
    state = tiny_net().state_dict()
    state["stem.weight"] = torch.zeros(4, 3, 5, 5)
    state["extra"] = torch.zeros(1)
    del state["head.bias"]
    torch.save(state, tmp_path / "bad.pt")
    code, output = invoke("build", data, "--out", tmp_path / "i.h5", "--weights", tmp_path / "bad.pt", *TINY)
    assert_one_line_error(code, output, "do not fit", "missing keys: head.bias", "unexpected keys: extra",
                          "stem.weight (4, 3, 5, 5) vs (8, 3, 5, 5)")


class Payload:
    """An object a malicious checkpoint could smuggle in; weights_only=True must refuse to build it."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_pickled_objects_are_never_loaded(data: Path, tmp_path: Path) -> None:
    torch.save({"stem.weight": Payload()}, tmp_path / "evil.pt")
    code, output = invoke("build", data, "--out", tmp_path / "i.h5", "--weights", tmp_path / "evil.pt", *TINY)
    assert_one_line_error(code, output, "weights_only=True")
    assert "pwned" not in output


def test_debug_shows_the_traceback(data: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--debug", "build", str(data), "--out", str(tmp_path / "i.h5"), *TINY,
                                       "--k", "0"])
    assert result.exit_code != 0
    assert "Traceback" in result.output or result.exc_info is not None


def test_info_refuses_files_that_are_not_indexes(tmp_path: Path) -> None:
    (tmp_path / "text.h5").write_text("hello")
    assert_one_line_error(*invoke("info", tmp_path / "text.h5"), "not an HDF5 file")
    with h5py.File(tmp_path / "other.h5", "w") as h5:
        h5["x"] = np.zeros(3)
    assert_one_line_error(*invoke("info", tmp_path / "other.h5"), "not an actindex index")
    with h5py.File(tmp_path / "future.h5", "w") as h5:
        h5.attrs["format"] = "actindex"
        h5.attrs["format_version"] = 99
    assert_one_line_error(*invoke("info", tmp_path / "future.h5"), "version 99", "reads version 1")
    assert_one_line_error(*invoke("info", tmp_path / "absent.h5"), "does not exist")


def test_layers_lists_names_channels_sizes_and_fields() -> None:
    code, output = invoke("layers", "--model", "tiny_models:tiny_net", "--input-size", "48", "--json")
    assert code == 0, output
    table = json.loads(output)
    rows = {row["name"]: row for row in table["layers"]}
    assert table["default"] == ["stem", "block", "down"]
    assert rows["block"]["rf_size"] == [25, 17] and rows["block"]["height"] == 12
    assert rows["down"]["channels"] == 16 and rows["down"]["rf_stride"] == [8, 8]
    code, output = invoke("layers", "--model", "alexnet")
    assert code == 0, output
    line = next(line for line in output.splitlines() if " features.10 " in line)
    assert "163" in line and "16" in line and "66" in line


def test_help_is_instant_without_torch() -> None:
    code = ("import sys; from actindex.query.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported for --help'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "build" in result.stdout and "demo" in result.stdout


def test_module_entry_point_for_torchrun(data: Path, weights: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-m", "actindex.indexer", "build", str(data), "--out",
                             str(tmp_path / "i.h5"), "--weights", str(weights), *TINY],
                            capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "i.h5").exists()


def test_corrupt_images_only_are_skipped_and_build_goes_on(tmp_path: Path, weights: Path) -> None:
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (60, 50), (200, 10, 10)).save(root / "red.JPG")
    Image.new("L", (60, 50), 128).save(root / "grey.png")
    (root / "empty.jpg").write_bytes(b"")
    code, output = invoke("build", root, "--out", tmp_path / "i.h5", "--weights", weights, *TINY)
    assert code == 0, output
    assert "Indexed 2 of 3 images (1 skipped)" in output
    with h5py.File(tmp_path / "i.h5") as h5:
        assert h5["images/label"][()].tolist() == [-1, -1, -1]
        assert h5["skipped/path"].asstr()[()].tolist() == ["empty.jpg"]


def test_layer_that_never_runs(data: Path, tmp_path: Path) -> None:
    options = [*TINY, "--layers", "stem,unused"]
    options[options.index("--model") + 1] = "tiny_models:with_unused"
    code, output = invoke("build", data, "--out", tmp_path / "i.h5", *options)
    assert_one_line_error(code, output, "unused", "did not run")


def test_module_reused_in_one_forward_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "d"
    make_images(root, n=3)
    code, output = invoke("build", root, "--out", tmp_path / "i.h5", "--model", "resnet18", "--layers",
                          "layer1.0.relu", "--input-size", "64", "--workers", "0", "--device", "cpu")
    assert_one_line_error(code, output, "layer1.0.relu", "ran 2 times")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # it failed at its first batch: no partial build
    code, output = invoke("build", root, "--out", tmp_path / "i.h5", "--model", "resnet18", "--layers",
                          "layer1.0.conv1", "--input-size", "64", "--workers", "0", "--device", "cpu")
    assert code == 0, output


def test_layers_show_each_output_and_refuse_tokens_before_anything_is_written(data: Path, tmp_path: Path) -> None:
    """A transformer's (N, D) tokens and a channels-last map are shown as what they are, not as N or H channels,
    and a build that names them stops before it creates anything."""
    code, output = invoke("layers", "--model", "tiny_models:tiny_tokens", "--input-size", "48", "--json")
    assert code == 0, output
    rows = {row["name"]: row for row in json.loads(output)["layers"]}
    assert rows["patch"]["shape"] == [8, 12, 12] and rows["patch"]["indexable"] and rows["patch"]["channels"] == 8
    assert rows["mix"]["shape"] == [144, 8] and not rows["mix"]["indexable"] and rows["mix"]["channels"] is None
    assert rows["last"]["shape"] == [12, 12, 8] and not rows["last"]["indexable"]
    assert rows["head"]["shape"] == [5] and rows["head"]["indexable"]
    code, output = invoke("layers", "--model", "tiny_models:tiny_tokens", "--input-size", "48")
    assert code == 0, output
    mix = next(line for line in output.splitlines() if " mix " in line)
    assert "144x8" in mix and " - " in mix
    assert "cannot be indexed" in output
    out = tmp_path / "tokens.h5"
    options = [*TINY, "--layers", "mix"]
    options[options.index("--model") + 1] = "tiny_models:tiny_tokens"
    assert_one_line_error(*invoke("build", data, "--out", out, *options), "'mix' outputs 144x8 per image",
                          "tokens x features", "(C, H, W) feature map")
    options[options.index("mix")] = "last"
    assert_one_line_error(*invoke("build", data, "--out", out, *options), "channels-last")
    options[options.index("last")] = "patch"
    assert_one_line_error(*invoke("build", data, "--out", out, *options, "--embed-layer", "mix"), "--embed-layer 'mix'")
    assert sorted(os.listdir(tmp_path)) == []  # no index, no partial build in the way of the corrected command
    code, output = invoke("build", data, "--out", out, *options)
    assert code == 0, output


def test_a_vision_transformer_s_blocks_are_shown_as_tokens() -> None:
    pytest.importorskip("timm")
    code, output = invoke("layers", "--model", "timm:vit_tiny_patch16_224")
    assert code == 0, output
    block = next(line for line in output.splitlines() if " blocks.3 " in line)
    assert "197x192" in block and " 197 " not in block
    proj = next(line for line in output.splitlines() if " patch_embed.proj " in line)
    assert "192x14x14" in proj and " 192 " in proj


IMPORTS = ("import sys\nfrom actindex.query.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n"
           "    assert not stop.code, stop.code\n"
           "print('\\nIMPORTED', *(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules), file=sys.stderr)")


def imported(*args: str | Path) -> str:
    """The heavy libraries a command imported, run in a fresh process as a person would run it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run([sys.executable, "-c", IMPORTS, *map(str, args)], capture_output=True, text=True,
                            env=env, check=False)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stderr.rsplit("IMPORTED", 1)[1].split())


def test_commands_import_only_what_they_need(data: Path, weights: Path, tmp_path: Path) -> None:
    """Reading an index needs no torch; a query on a network of one's own needs neither torchvision nor timm
    (whose imports cost seconds: torchvision pulls in torch._dynamo)."""
    out = tmp_path / "i.h5"
    code, output = invoke("build", data, "--out", out, "--weights", weights, "--k", "3", *TINY)
    assert code == 0, output
    assert imported("info", out) == ""
    assert imported("faiss", out) == ""
    assert imported("neuron", out, "--layer", "down", "--unit", "1", "--json", "--device", "cpu") == "torch"


def test_the_packages_export_the_public_api_and_import_nothing_heavy_until_used() -> None:
    code = ("import sys, importlib\n"
            "packages = [importlib.import_module(f'actindex.{name}') for name in ('kernels', 'indexer', 'query')]\n"
            "assert 'torch' not in sys.modules, 'importing the packages imported torch'\n"
            "for package in packages:\n"
            "    assert package.__doc__ and len(package.__doc__) > 80, package.__name__\n"
            "    for name in package.__all__:\n"
            "        assert getattr(package, name).__name__ == name, (package.__name__, name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr


def test_the_readme_s_python_example_compiles_and_imports_what_exists() -> None:
    """It downloads weights, so it cannot run here; every name it imports must exist, and it must parse."""
    import ast
    import importlib

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    example = readme.split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(example)
    imports = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
               and node.module.startswith("actindex")]
    assert imports
    for node in imports:
        module = importlib.import_module(node.module)  # type: ignore[arg-type]
        for alias in node.names:
            assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
