"""One image file's bytes → uint8 RGB (size, size, 3), or the reason it cannot be used. numpy + Pillow.

Every image of a folder dataset goes through `decode_image`: it classifies bad files (empty, not an image,
truncated, too small, unreadable) as `RejectedImage` rather than crashing the run, brings every Pillow mode to
8-bit RGB the same way, and resizes with one of three deterministic policies.
"""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from resnet.data.sources import REJECT_REASONS

# How an image whose aspect ratio is not 1 becomes image_size × image_size:
#   stretch      both sides to image_size, ignoring the aspect ratio (distorts shapes, keeps all content)
#   center_crop  torchvision's Resize(image_size) + CenterCrop(image_size): the shorter side becomes
#                image_size, the centre is kept (keeps shapes, loses the ends of the longer side)
#   pad          letterbox: the longer side becomes image_size, the rest is black bars, centred (keeps shapes
#                and all content, wastes pixels)
RESIZE_POLICIES = ("stretch", "center_crop", "pad")

# The usual extensions of the formats read here (lower case). Informational: a folder source does not filter
# by extension, so that a file that is not an image is reported ("not an image") instead of silently ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

_TRUNCATED = ("truncated", "broken data stream", "unexpected end of file", "premature end")
_GRAY_16 = ("I;16", "I;16B", "I;16L", "I;16N")
_WHITE = (255, 255, 255)


class RejectedImage(Exception):
    """A file that is not an image this dataset can use; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def one_line(text: object, limit: int = 300) -> str:
    """`text` as one line for a manifest: whitespace collapsed, object addresses dropped (so that the same
    file gives the same words on every run), at most `limit` characters."""
    line = " ".join(str(text).split())
    line = re.sub(r" at 0x[0-9a-fA-F]+", "", line)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def decode_image(
    data: bytes, *, image_size: int, resize: str = "center_crop", min_size: int = 8
) -> np.ndarray:
    """The image in `data` (any format Pillow reads; the first frame of an animation) as uint8 RGB
    (image_size, image_size, 3). Raises RejectedImage when the bytes are not an image we can use."""
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize {resize!r}: expected one of {', '.join(RESIZE_POLICIES)}")
    if not data:
        raise RejectedImage("zero-byte", "the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width < min_size or height < min_size:
                raise RejectedImage(
                    "too small", f"{width}x{height} pixels, a side is below min_size {min_size}"
                )
            image.load()  # decoding is lazy: truncated or corrupt data only fails here
            rgb = to_rgb(upright(image))
            # Made inside `with`: closing the file frees the pixels of an image that was never copied.
            pixels = np.array(resize_image(rgb, image_size, resize), dtype=np.uint8)
    except RejectedImage:
        raise
    except Image.DecompressionBombError as exc:  # before OSError: Pillow refuses absurd pixel counts
        raise RejectedImage("unreadable", one_line(exc)) from None
    except UnidentifiedImageError:
        raise RejectedImage(
            "not an image", f"no image format recognised; the file starts with {data[:16]!r}"
        ) from None
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is this file's problem, not the run's
        message = one_line(exc) or type(exc).__name__
        reason = "truncated" if any(word in message.lower() for word in _TRUNCATED) else "unreadable"
        raise RejectedImage(reason, message) from None
    return pixels


def upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: rotated/flipped by its EXIF orientation tag (cameras and phones
    store pixels as the sensor read them and record the rotation there). A malformed EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 -- bad metadata must not cost us good pixels
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB.

    - Transparency (LA, RGBA, PA, RGBa, a P or L or RGB image with a transparent colour or palette alpha) is
      composited over WHITE. In the folders such datasets come from (product shots, icons, scanned or drawn
      figures) a transparent background stands for the paper or page, which is white; dropping the alpha
      instead would expose whatever colour the encoder left under transparent pixels (often black, or noise).
    - 16-bit grayscale (I;16*) spans 0..65535 and is divided by 257 (65535 → 255), where Pillow's own convert
      clips at 255 and turns most of such an image white. 32-bit integers (I; Pillow also opens 16-bit PGMs
      as I) that lie within 0..65535 are treated the same; other I and float (F) images have no fixed
      range: F within 0..1 is taken as normalised intensity (× 255), anything else is stretched from its own
      min..max.
    - L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversion (palette lookup, CMYK and colour-space maths).
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if image.mode in _GRAY_16 or image.mode in ("I", "F"):
        gray = _gray_to_uint8(np.asarray(image), image.mode)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _gray_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    values = values.astype(np.float64)
    if mode in _GRAY_16:
        scaled = values / 257.0
    else:
        finite = np.isfinite(values)
        if not finite.any():
            return np.zeros(values.shape, np.uint8)
        low, high = float(values[finite].min()), float(values[finite].max())
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        if mode == "I" and low >= 0 and high <= 65535:
            scaled = values / 257.0
        elif mode == "F" and low >= 0 and high <= 1:
            scaled = values * 255.0
        elif high > low:
            scaled = (values - low) * (255.0 / (high - low))
        else:
            scaled = np.zeros_like(values)
    return np.rint(scaled).clip(0, 255).astype(np.uint8)


def resize_image(image: Image.Image, size: int, policy: str = "center_crop") -> Image.Image:
    """`image` as size × size by `policy` (RESIZE_POLICIES), bilinear with Pillow's antialiasing; an image
    that already has the target size is not resampled."""
    width, height = image.size
    if policy == "stretch":
        return _resized(image, (size, size))
    if policy == "center_crop":
        # torchvision's Resize(int) + CenterCrop with its exact arithmetic: the same pixels as its transforms.
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        image = _resized(image, (new_width, new_height))
        top = int(round((new_height - size) / 2.0))
        left = int(round((new_width - size) / 2.0))
        return image.crop((left, top, left + size, top + size))
    if policy == "pad":
        scale = size / max(width, height)
        new_width = min(size, max(1, round(width * scale)))
        new_height = min(size, max(1, round(height * scale)))
        canvas = Image.new("RGB", (size, size), (0, 0, 0))
        canvas.paste(
            _resized(image, (new_width, new_height)), ((size - new_width) // 2, (size - new_height) // 2)
        )
        return canvas
    raise ValueError(f"resize {policy!r}: expected one of {', '.join(RESIZE_POLICIES)}")


def _resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    return image if image.size == size else image.resize(size, Image.Resampling.BILINEAR)
