"""Image sources. Each returns every image of a dataset as uint8 RGB (N, H, W, 3), integer labels, class names."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from resnet.errors import DataError

# Why an input file was left out of a dataset; the manifest lists every rejected file with one of these.
REJECT_REASONS = ("zero-byte", "not an image", "truncated", "too small", "unreadable")


@dataclass(frozen=True)
class Rejected:
    file: str  # as the user would find it: a path relative to the source root, or an s3:// URI
    reason: str  # one of REJECT_REASONS
    detail: str = ""  # the decoder's or the server's own words, for the curious

    def __post_init__(self):
        if self.reason not in REJECT_REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}")


@dataclass(frozen=True)
class RawDataset:
    images: np.ndarray  # uint8 (N, H, W, 3)
    labels: np.ndarray  # int64 (N,)
    classes: tuple[str, ...]
    rejected: tuple[Rejected, ...] = ()  # input files that were not images we could use, with reasons

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise DataError(f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}")
        if len(self.labels) != len(self.images):
            raise DataError(f"{len(self.labels)} labels for {len(self.images)} images")
        if len(self.labels) and not (self.labels.min() >= 0 and self.labels.max() < len(self.classes)):
            raise DataError(
                f"labels must index the {len(self.classes)} class names (0..{len(self.classes) - 1}), "
                f"found {self.labels.min()}..{self.labels.max()}"
            )


def resize_rgb(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of uint8 (N, H, W) or (N, H, W, 3) images to (N, size, size, 3) RGB; deterministic."""
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image).convert("RGB")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(pil)
    return out


def load_digits(image_size: int) -> RawDataset:
    """scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes): offline, no download.

    Pixel values 0..16 are rescaled to 0..255 and the images upscaled to `image_size` (bilinear), as RGB so that
    the same 3-channel models (and torchvision weights) apply.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when this source is used

    bunch = sklearn_digits()
    gray = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    classes = tuple(str(name) for name in bunch.target_names)
    return RawDataset(resize_rgb(gray, image_size), bunch.target.astype(np.int64), classes)


def load_fractals(image_size: int, **options) -> RawDataset:
    """Formula-driven IFS fractals (see resnet/data/fractals.py): the offline pretraining set."""
    from resnet.data.fractals import load_fractals as render

    return render(image_size, **options)


def load_cifar10(image_size: int, **options) -> RawDataset:
    """CIFAR-10's python-pickle archive: downloaded, a local file or directory, or s3:// (resnet/data/cifar.py)."""
    from resnet.data.cifar import load_cifar

    return load_cifar("cifar10", image_size, **options)


def load_cifar100(image_size: int, **options) -> RawDataset:
    from resnet.data.cifar import load_cifar

    return load_cifar("cifar100", image_size, **options)


def load_imagefolder(image_size: int, **options) -> RawDataset:
    """CLASS/IMAGE directory trees, local or s3:// (resnet/data/imagefolder.py)."""
    from resnet.data.imagefolder import load_imagefolder as load

    return load(image_size, **options)


SOURCES = {
    "digits": load_digits,
    "fractals": load_fractals,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "imagefolder": load_imagefolder,
}


def load_source(name: str, image_size: int, **options) -> RawDataset:
    """The dataset `name` at `image_size` pixels; `options` are the source's own settings (params.yaml)."""
    try:
        loader = SOURCES[name]
    except KeyError:
        raise DataError(
            f"unknown data source {name!r}: expected one of {', '.join(sorted(SOURCES))}"
        ) from None
    return loader(image_size, **options)
