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
