"""The one place where image bytes are handed to PIL.

Ingest's header check, the image feature stage and the report's thumbnails all decode through
`open_image`, so every one of them gets the same guards:
- the pixel count is read from the header (PIL opens lazily) and checked against `max_pixels`
  before anything is decoded; PIL's own decompression-bomb warning is an error too;
- any failure while opening or decoding (corrupt, truncated, unknown format, bombs, ...) becomes
  `ImageRefused` with a reason that callers count, never a crash.
Memory is bounded by `max_pixels` (callers that only need a small picture also use `draft`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import TypeVar

from PIL import Image

T = TypeVar("T")

MAX_PIXELS = 50_000_000  # default limit; PIL's own bomb error starts at 2 x Image.MAX_IMAGE_PIXELS
UNREADABLE = "unreadable"  # not an image, or broken: corrupt, truncated, unknown format
BOMB = "bomb"  # more pixels than allowed (a decompression bomb, or just far too large)


class ImageRefused(Exception):
    """An image that was not decoded: `reason` is UNREADABLE or BOMB, `detail` says why."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def open_image(data: bytes, max_pixels: int, use: Callable[[Image.Image], T]) -> T:
    """`use(image)` on the lazily opened image once its header has passed the pixel limit.

    `use` decodes what it needs (`image.size` alone decodes nothing); whatever it or PIL raises
    is turned into `ImageRefused`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > max_pixels:
                    raise ImageRefused(BOMB, f"{image.width}x{image.height} pixels > max_pixels {max_pixels}")
                return use(image)
    except ImageRefused:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageRefused(BOMB, str(err)) from None
    except Exception as err:  # noqa: BLE001 (PIL raises many types OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageRefused(UNREADABLE, f"{type(err).__name__}: {err}") from None
