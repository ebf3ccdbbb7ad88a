"""Resolve a model spec and weights into an eval-mode network, its preprocessing statistics and its layers.

Model specs:
- a torchvision classification model name: ``resnet18``, ``alexnet``, ``vgg16``, …
- ``timm:NAME`` for a timm model (timm is an optional dependency);
- ``package.module:factory`` for custom code: ``factory()`` must return an ``nn.Module``.

Weights:
- none: the network keeps its random initialisation, drawn from seed 0 so that it is the same in every
  process of a job and in every run (useful for tests and baselines, rarely for research);
- a torchvision weights enum member of that model (``DEFAULT``, ``IMAGENET1K_V1``): fetched into the torch
  cache on first use; for ``timm:`` models ``DEFAULT`` (or ``pretrained``) asks timm for its pretrained weights;
- a local state-dict file (``.pt``, ``.pth``, ``.bin``, ``.safetensors``), loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from actindex.kernels.errors import UserError, first_line, not_found

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STATE_DICT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")


@dataclass
class LoadedModel:
    module: nn.Module
    spec: str
    weights: str  # "" when randomly initialised
    weights_sha256: str  # of a local weights file, "" otherwise
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    categories: list[str] = field(default_factory=list)


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_model(spec: str, weights: str | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """Build the network named by `spec`, load `weights`, move it to `device`, in eval mode."""
    weights = weights or ""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a random initialisation must be the same on every rank, and on a resume
        if spec.startswith("timm:"):
            loaded = _timm_model(spec[len("timm:"):], weights)
        elif ":" in spec:
            loaded = _custom_model(spec)
        else:
            loaded = _torchvision_model(spec, weights)
    loaded.spec = spec
    if weights and _is_weights_file(weights) and not loaded.weights:
        path = Path(weights)
        load_state_dict_file(loaded.module, path)
        loaded.weights = str(path.resolve())
        loaded.weights_sha256 = sha256_file(path)
    elif weights and not loaded.weights:
        raise UserError(f"weights '{weights}' are neither a weights name of '{spec}' nor a state-dict file "
                        f"({', '.join(STATE_DICT_SUFFIXES)}); check the path")
    loaded.module.eval().to(device)
    return loaded


def _is_weights_file(weights: str) -> bool:
    return Path(weights).suffix.lower() in STATE_DICT_SUFFIXES or Path(weights).exists()


def _torchvision_model(name: str, weights: str) -> LoadedModel:
    import torchvision

    names = torchvision_names()
    if name not in names:
        raise not_found("model", name, names, hint="use timm:NAME for timm models or package.module:factory "
                                                     "for your own code")
    enum = torchvision.models.get_model_weights(name)
    if weights and not _is_weights_file(weights):
        if weights not in enum.__members__:
            raise not_found("weights name", weights, list(enum.__members__),
                            hint=f"or give a state-dict file for '{name}'")
        member = enum[weights]
        try:
            module = torchvision.models.get_model(name, weights=member)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise UserError(f"could not fetch {enum.__name__}.{member.name}: {error}. On a machine without "
                            "internet, download the file elsewhere and pass it with --weights FILE") from error
        transform = member.transforms()
        return LoadedModel(module, name, f"{enum.__name__}.{member.name}", "",
                           tuple(transform.mean), tuple(transform.std), list(member.meta.get("categories", [])))
    return LoadedModel(torchvision.models.get_model(name, weights=None), name, "", "")


def _timm_model(name: str, weights: str) -> LoadedModel:
    try:
        import timm
    except ImportError as error:
        raise UserError("timm is not installed: pip install timm (or actindex[demo])") from error
    if name not in timm.list_models():
        raise not_found("timm model", name, timm.list_models(f"*{name[:4]}*"), hint="see timm.list_models()")
    pretrained = weights in ("DEFAULT", "pretrained")
    try:
        module = timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError) as error:
        raise UserError(f"could not fetch timm weights for '{name}': {error}. Download them elsewhere and "
                        "pass the file with --weights FILE") from error
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return LoadedModel(module, name, f"timm:{name}" if pretrained else "", "", mean, std)


def _custom_model(spec: str) -> LoadedModel:
    module_name, _, factory_name = spec.partition(":")
    try:
        code = importlib.import_module(module_name)
    except ImportError as error:
        raise UserError(f"cannot import '{module_name}' for model '{spec}': {error}. Is it on PYTHONPATH?") \
            from error
    factory = getattr(code, factory_name, None)
    if not callable(factory):
        public = [n for n in dir(code) if not n.startswith("_") and callable(getattr(code, n))]
        raise not_found("factory", factory_name, public, hint=f"in module '{module_name}'")
    module = factory()
    if not isinstance(module, nn.Module):
        raise UserError(f"'{spec}' returned {type(module).__name__}, not a torch.nn.Module")
    return LoadedModel(module, spec, "", "")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain mapping of names to tensors; never unpickles arbitrary objects."""
    if not path.is_file():
        raise UserError(f"weights file '{path}' does not exist")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise UserError(f"'{path}' is not a readable safetensors file: {error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad or unsafe pickle
        raise UserError(f"'{path}' is not a plain state dict loadable with weights_only=True "
                        f"({first_line(error)}); save it with torch.save(model.state_dict(), path)") from error
    for wrapper in ("state_dict", "model", "model_state_dict"):  # common training-checkpoint layouts
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"'{path}' does not hold a state dict (a mapping of names to tensors)")
    return dict(state)


def load_state_dict_file(module: nn.Module, path: Path) -> None:
    """Load strictly; a mismatch is reported as one line naming the first differences."""
    state = read_state_dict(path)
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = [f"{label}: {_first(items)}" for label, items in
                (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
                if items]
    if problems:
        raise UserError(f"weights '{path}' do not fit the model ({'; '.join(problems)}); "
                        "check --model and --weights belong together")
    module.load_state_dict(state, strict=True)


def _first(items: Sequence[str], limit: int = 3) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
