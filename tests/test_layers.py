"""Default layer choice and layer resolution on real torchvision architectures (random weights)."""

from __future__ import annotations

import pytest
import torchvision

from actindex.indexer.layers import resolve_layers
from actindex.kernels.errors import UserError


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet18", ["conv1", "layer1", "layer2", "layer3", "layer4"]),
    ("alexnet", ["features.0", "features.3", "features.10"]),
    ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features.18"]),
])
def test_default_layers_are_the_main_stages(name: str, expected: list[str]) -> None:
    model = torchvision.models.get_model(name, weights=None).eval()
    geometry = resolve_layers(model, None, 224)
    assert list(geometry) == expected
    sizes = [(g.height, g.width) for g in geometry.values()]
    assert sizes == sorted(set(sizes), reverse=True)  # one layer per resolution, coarser as we go


def test_known_fields_through_resolve_layers() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    field = resolve_layers(model, ["layer4"], 224)["layer4"].field
    assert field is not None
    assert (field[0].size, field[0].stride, field[0].padding) == (435, 32, 217)


def test_layer_listed_twice_is_refused() -> None:
    model = torchvision.models.resnet18(weights=None).eval()
    with pytest.raises(UserError, match="listed twice"):
        resolve_layers(model, ["layer1", "layer1"], 64)
