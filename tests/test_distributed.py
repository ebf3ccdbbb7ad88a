"""Several processes and crashes: every build below must equal one uninterrupted single-process build, bit for bit.

In-process tests inject faults with `Fault` (faiss contrib's `crash_at` pattern) and resume; subprocess tests
run real torchrun jobs with the gloo backend on CPU, kill ranks with SIGKILL, and kill a whole build from
outside at a random moment.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from actindex.indexer.build import BuildConfig, Fault, InjectedFault, build_index, shard_ranges
from actindex.indexer.checkpoint import partial_dir, state_path
from actindex.indexer.choices import Decoder, Precision
from actindex.kernels.errors import UserError

from helpers import LAYERS, SIZE, make_images

TESTS = Path(__file__).parent
BATCH = 4
VOLATILE_ATTRS = {"created", "seconds", "images_per_second", "world_size"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_images(root, n=45, seed=1)  # 46 files with the broken one: shards of 12 batches, not a multiple of 2 or 3
    return root


def config(data: Path, weights: Path, out: Path, **changes: object) -> BuildConfig:
    """The reference build's settings; --bottom-k and --patch-layer on, so that every comparison covers the
    lowest-k tables and the patch vectors too."""
    base = BuildConfig(data=data, model="tiny_models:tiny_net", out=out, weights=str(weights), layers=LAYERS, k=5,
                       bottom_k=3, input_size=SIZE, batch_size=BATCH, workers=0, embed_layer="down", device="cpu",
                       checkpoint_every=8, patch_layer="block")
    return replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(data: Path, weights: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, no interruption."""
    out = tmp_path_factory.mktemp("reference") / "index.h5"
    build_index(config(data, weights, out))
    with h5py.File(out) as f:
        assert all(f"layers/{name}/bottom/value" in f for name in LAYERS)  # so every comparison covers them
        assert f["patches/block"].shape == (46 * 12 * 12, 8) and f.attrs["patch_faiss_count"] > 0
    return out


def contents(path: Path, ignore: set[str]) -> tuple[dict[str, np.ndarray], dict[str, object]]:
    datasets: dict[str, np.ndarray] = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: datasets.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                     else None)
        attrs = {key: value for key, value in f.attrs.items() if key not in ignore}
    return datasets, attrs


def assert_same_index(path: Path, reference: Path, ignore: frozenset[str] = frozenset()) -> None:
    """Every dataset equal bit for bit (NaN where NaN), every attribute equal but timings and process count."""
    got, got_attrs = contents(path, VOLATILE_ATTRS | ignore)
    want, want_attrs = contents(reference, VOLATILE_ATTRS | ignore)
    assert sorted(got) == sorted(want)
    for name, array in want.items():
        assert got[name].dtype == array.dtype, name
        assert np.array_equal(got[name], array, equal_nan=array.dtype.kind == "f"), name
    assert got_attrs.keys() == want_attrs.keys()
    for key, value in want_attrs.items():
        assert np.array_equal(got_attrs[key], value), key


# -- shards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 46, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_shards_cover_every_id_once_at_batch_boundaries(n: int, world: int) -> None:
    shards = shard_ranges(n, BATCH, world)
    assert len(shards) == world and shards[0][0] == 0 and shards[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:], strict=False))
    assert all(start % BATCH == 0 and start <= end for start, end in shards)
    sizes = [-(-(end - start) // BATCH) for start, end in shards]  # batches per rank
    assert max(sizes) - min(sizes) <= 1


# -- crash and resume in one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("crash_after", [4, 8, 20, 44])  # before, at and between checkpoints, in the last batch
def test_a_crash_then_resume_gives_the_uninterrupted_index(data: Path, weights: Path, reference: Path,
                                                           tmp_path: Path, crash_after: int) -> None:
    out = tmp_path / "index.h5"
    checkpointed = (crash_after - 1) // 8 * 8  # the last checkpoint before the crash's batch
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out), fault=Fault(rank=0, after=crash_after))
    assert not out.exists()
    assert partial_dir(out).is_dir() == (checkpointed > 0)  # a partial build with nothing in it is removed
    summary = build_index(config(data, weights, out, resume=True))
    assert summary.resumed == checkpointed
    assert_same_index(out, reference)
    assert not partial_dir(out).exists()


def test_resume_twice_after_two_crashes(data: Path, weights: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out, checkpoint_every=12), fault=Fault(0, 14))
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out, checkpoint_every=12, resume=True), fault=Fault(0, 30))
    summary = build_index(config(data, weights, out, checkpoint_every=12, resume=True))
    assert summary.resumed == 24
    assert_same_index(out, reference)


def test_resume_without_a_checkpoint_builds_from_the_start(data: Path, weights: Path, reference: Path,
                                                           tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    assert build_index(config(data, weights, out, resume=True)).resumed == 0
    assert_same_index(out, reference)


def checkpoint_files(out: Path) -> list[tuple[str, int]]:
    """The partial build's files and their modification times (lock files record who holds them: not data)."""
    return sorted((p.name, p.stat().st_mtime_ns) for p in partial_dir(out).iterdir() if p.suffix != ".lock")


def test_a_checkpoint_of_another_configuration_is_refused(data: Path, weights: Path, tmp_path: Path,
                                                          reference: Path) -> None:
    out = tmp_path / "index.h5"
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out), fault=Fault(0, 20))
    before = checkpoint_files(out)
    with pytest.raises(UserError, match=r"bottom-k: 3 in the checkpoint, 0 now; input size: 48 in the checkpoint, 64 "
                                        r"now; k: 5 in the checkpoint, 3.*rerun with the original settings to "
                                        "continue it, or without --resume and with --overwrite to discard it"):
        build_index(config(data, weights, out, resume=True, k=3, bottom_k=0, input_size=64))
    with pytest.raises(UserError, match="layers: .* in the checkpoint"):
        build_index(config(data, weights, out, resume=True, layers=("stem", "down"), overwrite=True))
    with pytest.raises(UserError, match=r"unfinished build .* \(16 images checkpointed\); add --resume to continue "
                                        "it, or --overwrite to discard it and start over"):
        build_index(config(data, weights, out))
    assert checkpoint_files(out) == before
    assert not out.exists()
    # The way out the messages offer: --overwrite discards the partial build and starts over.
    summary = build_index(config(data, weights, out, overwrite=True, checkpoint_every=12))
    assert summary.resumed is None
    assert_same_index(out, reference)
    assert not partial_dir(out).exists()


def test_a_partial_build_with_nothing_checkpointed_is_replaced(data: Path, weights: Path, tmp_path: Path,
                                                               reference: Path) -> None:
    """As several processes leave it when they fail before their first checkpoint: no --resume or --overwrite
    is needed to start again, whatever configuration it was made with."""
    out = tmp_path / "index.h5"
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out, k=3), fault=Fault(0, 20))
    folder = partial_dir(out)
    for state in folder.glob("rank-*.safetensors"):
        state.unlink()  # as if the failure had come before the first checkpoint, on a job of several processes
    (folder / "unrelated.txt").write_text("not ours")
    build_index(config(data, weights, out))
    assert_same_index(out, reference)
    assert (folder / "unrelated.txt").read_text() == "not ours"  # only the build's own files are removed


def test_a_changed_image_folder_is_refused(data: Path, weights: Path, tmp_path: Path) -> None:
    copy = tmp_path / "data"
    make_images(copy, n=45, seed=1)
    out = tmp_path / "index.h5"
    with pytest.raises(InjectedFault):
        build_index(config(copy, weights, out), fault=Fault(0, 20))
    (copy / "class0" / "img000.png").rename(copy / "class0" / "renamed.png")
    with pytest.raises(UserError, match="image list: .* in the checkpoint"):
        build_index(config(copy, weights, out, resume=True))


def test_a_damaged_checkpoint_is_refused_in_one_line(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    with pytest.raises(InjectedFault):
        build_index(config(data, weights, out), fault=Fault(0, 20))
    state = state_path(partial_dir(out), 0)
    state.write_bytes(b"\x00" * 100)
    with pytest.raises(UserError, match="unreadable") as caught:
        build_index(config(data, weights, out, resume=True))
    assert "\n" not in str(caught.value)
    save_file({"x": torch.zeros(1)}, str(state), metadata={"format": "something else"})
    with pytest.raises(UserError, match="not a checkpoint this actindex reads"):
        build_index(config(data, weights, out, resume=True))
    manifest = partial_dir(out) / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "version": 99}))
    with pytest.raises(UserError, match="checkpoint version 99"):
        build_index(config(data, weights, out, resume=True))


# -- real processes --------------------------------------------------------------------------------------------


def cli_args(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return ["build", str(data), "--model", "tiny_models:tiny_net", "--weights", str(weights), "--out", str(out),
            "--layers", ",".join(LAYERS), "--k", "5", "--bottom-k", "3", "--input-size", str(SIZE), "--batch-size",
            str(BATCH), "--workers", "0", "--embed-layer", "down", "--device", "cpu", "--checkpoint-every", "8",
            "--patch-layer", "block", *extra]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}


def torchrun(processes: int, args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "actindex.indexer", *args]
    return subprocess.run(command, capture_output=True, text=True, env=environment(), timeout=240, check=False)


@pytest.mark.distributed
@pytest.mark.parametrize("processes", [2, 3])
def test_torchrun_builds_the_single_process_index(data: Path, weights: Path, reference: Path, tmp_path: Path,
                                                  processes: int) -> None:
    out = tmp_path / "index.h5"
    result = torchrun(processes, cli_args(data, weights, out))
    assert result.returncode == 0, result.stderr
    assert_same_index(out, reference)
    assert result.stdout.count("Indexed 45 of 46 images") == 1  # rank 0 alone prints the summary
    assert f"on cpu x {processes} processes" in result.stdout
    with h5py.File(out) as f:
        assert f.attrs["world_size"] == processes
    assert not partial_dir(out).exists()


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jpeg_data")
    make_images(root, n=45, seed=2, suffix=".jpg")
    return root


@pytest.mark.distributed
@pytest.mark.parametrize(("decoder", "precision"), [("turbo", "fp32"), ("pil", "bf16"), ("turbo", "bf16")])
def test_each_decoder_and_precision_gives_the_same_index_on_1_or_2_processes_and_after_a_crash(
        jpeg_data: Path, weights: Path, tmp_path: Path, decoder: str, precision: str) -> None:
    """Every setting that runs on the CPU: one process, two under torchrun, and a crash then --resume agree bit for
    bit (and the setting made a difference: the index is not the default build's)."""
    settings = {"decoder": Decoder(decoder), "precision": Precision(precision)}
    single, two, resumed, default = (tmp_path / name / "index.h5" for name in ("single", "two", "resumed", "default"))
    build_index(config(jpeg_data, weights, single, **settings))
    result = torchrun(2, cli_args(jpeg_data, weights, two, "--decoder", decoder, "--precision", precision))
    assert result.returncode == 0, result.stderr
    assert_same_index(two, single)
    with pytest.raises(InjectedFault):
        build_index(config(jpeg_data, weights, resumed, **settings), fault=Fault(rank=0, after=20))
    build_index(config(jpeg_data, weights, resumed, resume=True, **settings))
    assert_same_index(resumed, single)
    build_index(config(jpeg_data, weights, default))
    with h5py.File(single) as a, h5py.File(default) as b:
        assert not np.array_equal(a["layers/head/value"][()], b["layers/head/value"][()])


@pytest.mark.distributed
def test_sigkill_of_one_rank_then_resume_under_torchrun(data: Path, weights: Path, reference: Path,
                                                       tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    crashed = torchrun(2, cli_args(data, weights, out, "--crash-at", "1:12:kill"))
    assert crashed.returncode != 0 and not out.exists()
    assert "rerun the same command with --resume" in crashed.stderr  # rank 0's message, on SIGTERM from torchrun
    resumed = torchrun(2, cli_args(data, weights, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from a checkpoint of" in resumed.stdout
    assert_same_index(out, reference)


@pytest.mark.distributed
def test_an_error_on_one_rank_ends_the_job_with_its_message(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    started = time.monotonic()
    result = torchrun(2, cli_args(data, weights, out, "--crash-at", "1:8:raise"))
    assert result.returncode != 0 and not out.exists()
    assert time.monotonic() - started < 120  # no hang in a collective
    assert "rank 1 " in result.stderr and "injected fault on rank 1 after 8 images" in result.stderr
    assert not re.search(r'File ".*actindex|File ".*/(indexer|kernels)/', result.stderr)  # no traceback of ours


@pytest.mark.distributed
def test_resume_with_another_number_of_processes_is_refused(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    assert torchrun(2, cli_args(data, weights, out, "--crash-at", "0:8:raise")).returncode != 0
    result = torchrun(3, cli_args(data, weights, out, "--resume"))
    assert result.returncode != 0 and not out.exists()
    assert "processes (world size): 2 in the checkpoint, 3 now" in result.stderr
    assert result.stderr.count("cannot resume from") == 1  # said once, by rank 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_from_outside_at_a_random_moment_then_resume(data: Path, weights: Path, reference: Path,
                                                            tmp_path: Path, seed: int) -> None:
    """A real `actindex build` killed with SIGKILL wherever it happens to be, perhaps mid-checkpoint. The moment
    is drawn from a seeded generator (the seed is in the test's name), so a failure names the delay to retry."""
    out = tmp_path / "index.h5"
    args = cli_args(data, weights, out)
    args[args.index("tiny_models:tiny_net")] = "tiny_models:slow_tiny_net"  # same weights, 50 ms per batch
    process = subprocess.Popen([sys.executable, "-m", "actindex.indexer", *args], env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not state_path(partial_dir(out), 0).exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    delay = random.Random(seed).uniform(0.0, 0.25)  # noqa: S311 - a random moment, not a secret
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not out.exists(), f"the build finished before the kill ({delay} s)"
    resumed = subprocess.run([sys.executable, "-m", "actindex.indexer", *args, "--resume"], env=environment(),
                             capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, f"killed after {delay} s: {resumed.stderr}"
    # The slow model is the same network under another factory name: only `model` and `config` differ.
    assert_same_index(out, reference, ignore=frozenset({"model", "config"}))


def test_a_random_initialisation_is_the_same_in_every_process() -> None:
    """Ranks and resumed runs build the network separately: without weights it must still be one network."""
    from actindex.indexer.models import load_model

    def digest(model: torch.nn.Module) -> str:
        return hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()

    code = ("import hashlib, torch; from actindex.indexer.models import load_model; "
            "m = load_model('resnet18').module; "
            "print(hashlib.sha256(b''.join(t.numpy().tobytes() for t in m.state_dict().values())).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=environment()).stdout.strip()
    torch.manual_seed(1)  # whatever the caller's random state
    assert digest(load_model("resnet18").module) == other
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    load_model("resnet18")
    assert torch.equal(torch.rand(1), before), "loading a model must not move the caller's random stream"


@pytest.mark.distributed
def test_a_rank_that_sees_another_network_stops_the_job_before_any_work(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    args = cli_args(data, Path("unused"), out)
    at = args.index("--weights")
    del args[at:at + 2]
    args[args.index("tiny_models:tiny_net")] = "tiny_models:rank_dependent_net"
    result = torchrun(2, args)
    assert result.returncode != 0 and not out.exists()
    assert "rank 1 failed: rank 1 on" in result.stderr
    assert "embedding size: 16 on rank 0, 12 here" in result.stderr
    assert result.stderr.count("does not see what rank 0 sees") == 1  # printed by rank 0 only


# -- interrupts and concurrent builds --------------------------------------------------------------------------


def slow_args(data: Path, weights: Path, out: Path, *extra: str, workers: int = 0) -> list[str]:
    """The reference build's options with the same network at SLOW_NET_SECONDS per batch."""
    args = cli_args(data, weights, out, *extra)
    args[args.index("tiny_models:tiny_net")] = "tiny_models:slow_tiny_net"
    args[args.index("--workers") + 1] = str(workers)
    return args


def slow_environment(seconds: float = 0.25) -> dict[str, str]:
    return {**environment(), "SLOW_NET_SECONDS": str(seconds)}


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the build ended before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.01)


def checkpointed(out: Path, rank: int = 0) -> int:
    """Images rank `rank` has checkpointed: next_id - start, from its state file's header."""
    from safetensors import safe_open

    with safe_open(str(state_path(partial_dir(out), rank)), framework="pt") as f:
        metadata = f.metadata()
    shards = json.loads((partial_dir(out) / "manifest.json").read_text())["shards"]
    return int(metadata["next_id"]) - shards[rank][0]


def test_ctrl_c_checkpoints_then_resume_gives_the_uninterrupted_index(data: Path, weights: Path, reference: Path,
                                                                      tmp_path: Path) -> None:
    """Ctrl-C at a terminal signals the whole foreground process group, DataLoader workers included: the build
    checkpoints what it has done and says so; --resume finishes it."""
    out = tmp_path / "index.h5"
    args = slow_args(data, weights, out, "--checkpoint-every", "1000", workers=2)
    process = subprocess.Popen([sys.executable, "-m", "actindex.indexer", *args], env=slow_environment(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(partial_dir(out) / "rank-00000.rows", process)
    time.sleep(1.5)  # a few batches in, far from the next checkpoint (1000 images)
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by Ctrl-C (SIGINT); the work done is checkpointed in" in stderr, stderr
    assert "Traceback" not in stderr and "exited unexpectedly" not in stderr, stderr
    done = checkpointed(out)
    assert 0 < done < 45
    resumed = subprocess.run([sys.executable, "-m", "actindex.indexer", *args, "--resume"], env=environment(),
                             capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"Resumed from a checkpoint of {done} images" in resumed.stdout
    assert_same_index(out, reference, ignore=frozenset({"model", "config"}))


def test_a_second_ctrl_c_stops_at_once(data: Path, weights: Path, tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    process = subprocess.Popen([sys.executable, "-m", "actindex.indexer", *slow_args(data, weights, out)],
                               env=slow_environment(8.0), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(partial_dir(out) / "rank-00000.rows", process)
    time.sleep(0.5)  # inside an 8 s batch: the first Ctrl-C waits for its end, the second does not
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started < 4
    assert process.returncode == 130, stderr
    assert "stopped at once by a second Ctrl-C (SIGINT)" in stderr and "Traceback" not in stderr, stderr


@pytest.mark.distributed
def test_ctrl_c_under_torchrun_checkpoints_every_rank(data: Path, weights: Path, reference: Path,
                                                      tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches torchrun, which passes SIGINT on to each rank's process group."""
    out = tmp_path / "index.h5"
    args = slow_args(data, weights, out, "--checkpoint-every", "1000", workers=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "actindex.indexer", *args]
    process = subprocess.Popen(command, env=slow_environment(0.5), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    wait_for(partial_dir(out) / "rank-00001.rows", process)
    time.sleep(1.0)  # each rank has 6 batches of 0.5 s: stopped well inside its share
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0 and not out.exists()
    assert "stopped by Ctrl-C (SIGINT); the work done is checkpointed in" in stderr, stderr
    assert checkpointed(out, 0) > 0 and checkpointed(out, 1) > 0, stderr
    resumed = torchrun(2, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from a checkpoint of" in resumed.stdout
    assert_same_index(out, reference, ignore=frozenset({"model", "config"}))


def test_a_running_build_locks_its_partial_build_until_it_dies(data: Path, weights: Path, reference: Path,
                                                               tmp_path: Path) -> None:
    out = tmp_path / "index.h5"
    args = slow_args(data, weights, out)
    process = subprocess.Popen([sys.executable, "-m", "actindex.indexer", *args], env=slow_environment(0.5),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(state_path(partial_dir(out), 0), process)  # it has checkpointed: there is work to protect
        holder = rf"another build \(pid {process.pid} on {re.escape(os.uname().nodename)}, since .*\) is using"
        same = {"model": "tiny_models:slow_tiny_net"}
        for resume in (True, False):
            with pytest.raises(UserError, match=holder) as caught:
                build_index(config(data, weights, out, resume=resume, **same))
            assert "\n" not in str(caught.value)
        with pytest.raises(UserError, match=holder):
            build_index(config(data, weights, out, overwrite=True, **same))
    finally:
        process.kill()  # SIGKILL: no chance to release anything itself
        process.wait()
    assert not out.exists()
    summary = build_index(config(data, weights, out, resume=True, **same))
    assert summary.resumed is not None and summary.resumed > 0
    assert_same_index(out, reference, ignore=frozenset({"model", "config"}))


def test_the_python_default_for_workers_is_the_cli_s(data: Path, weights: Path, tmp_path: Path) -> None:
    """Both use the cores shared among the job's processes: no DataLoader warning about too many workers."""
    import warnings

    from actindex.indexer.build import default_workers

    base = config(data, weights, tmp_path / "python.h5")
    python = BuildConfig(data=base.data, model=base.model, out=base.out, weights=base.weights, layers=base.layers,
                         k=base.k, input_size=base.input_size, device="cpu")
    assert python.workers is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "This DataLoader will create 4 worker processes in total ..."
        build_index(python)
    from click.testing import CliRunner

    from actindex.query.cli import main

    args = cli_args(data, weights, tmp_path / "cli.h5")
    at = args.index("--workers")
    del args[at:at + 2]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    for name in ("python.h5", "cli.h5"):
        with h5py.File(tmp_path / name) as f:
            assert json.loads(f.attrs["config"])["workers"] == default_workers()
