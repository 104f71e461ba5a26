"""Decoding one image file or object into 8-bit RGB, the same way for every source.

- 16-bit greyscale (modes ``I;16*``, and ``I``, read as 16-bit) is scaled to 8 bits (value / 257,
  rounded), where PIL's own ``convert("RGB")`` would clip everything above 255 to white.
- Palette images (``P``, ``PA``) go through RGBA, so palette transparency is applied as PIL
  recommends, then the alpha is dropped as for ``RGBA`` and ``LA``.
- An image with more pixels than ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb) is refused
  before it is decoded; PIL's warning becomes an error here.
- Only regular files are opened (`finetune.safe_files.open_regular`): a FIFO named ``x.png`` would
  block ``open()`` forever.
- A truncated file fails when it is decoded (PIL's "image file is truncated"); `is_decodable` decodes
  the whole file, so ``--skip-bad-images`` finds it before training.

Every failure is a `DataError` that names the file.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, TypeVar

import numpy as np
from PIL import Image

from ..errors import DataError
from ..safe_files import open_regular

# What PIL raises for unreadable, corrupt, truncated or oversized files.
PIL_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
T = TypeVar("T")


@contextlib.contextmanager
def bombs_are_errors() -> Iterator[None]:
    """PIL's DecompressionBombWarning (more than MAX_IMAGE_PIXELS) raised as an exception."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def to_rgb(img: Image.Image) -> Image.Image:
    """`img` as an 8-bit RGB image (decodes it); see the module docstring for 16-bit and palette modes."""
    if img.mode in SIXTEEN_BIT:
        pixels = np.asarray(img, dtype=np.float64)  # (H, W)
        grey = np.rint(np.clip(pixels, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode in ("P", "PA"):
        return img.convert("RGBA").convert("RGB")
    return img.convert("RGB")


def decode(what: str, read: Callable[[], T]) -> T:
    """`read()` with decompression bombs as errors; any PIL failure is a DataError naming `what`."""
    try:
        with bombs_are_errors():
            return read()
    except DataError:
        raise  # already names the file (open_regular: not a regular file)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"cannot read image {what}: too many pixels to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read image {what}: {err}") from err


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 8-bit RGB; an unreadable file is a DataError naming its path."""

    def read() -> Image.Image:
        with open_regular(path, "image", DataError) as fh, Image.open(fh) as img:
            return to_rgb(img)

    return decode(repr(path), read)


def is_decodable(path: str) -> bool:
    """Whether the whole file decodes (truncated files and decompression bombs do not; a FIFO, socket or
    device is not opened at all)."""
    try:
        with bombs_are_errors(), open_regular(path, "image", DataError) as fh, Image.open(fh) as img:
            if img.format == "JPEG":
                img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))  # DCT scaling still reads every byte
            img.load()
        return True
    except (*PIL_ERRORS, DataError):
        return False
