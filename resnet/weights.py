"""torchvision's published ImageNet weights for its ResNets, as data, and their download through torch hub.

The table below copies what torchvision (0.29) publishes for ``resnet18`` ... ``resnet152``: the weights'
URL, class count, ImageNet-1K accuracy and evaluation transform. Keys are ``"<model>.<WEIGHTS>"``, e.g.
``"resnet50.IMAGENET1K_V2"``; ``"<model>.DEFAULT"`` is the same entry as torchvision's ``DEFAULT`` (V2 where it
exists, else V1). The state dicts load into our ``resnet.models`` nets of the same name, whose layout is
torchvision's. This module imports torch only, never torchvision (training workers do not install it).

Downloads go through torch hub (``torch.hub.load_state_dict_from_url``, ``check_hash=True``,
``weights_only=True``): the file is cached as ``$TORCH_HOME/hub/checkpoints/<file name>`` (``$TORCH_HOME``
defaults to ``~/.cache/torch``) and a cached file is used without any network access; a download must match
the sha256 prefix in its file name (``resnet50-11ad3fa6.pth``: sha256 starts with ``11ad3fa6``).

Air-gapped sites, two ways:

- Pre-place the files in the cache directory above under their torchvision file names (copy them from a
  machine that has downloaded them, ``~/.cache/torch/hub/checkpoints``).
- Set ``RESNET_WEIGHTS_MIRROR`` to a base URL serving the same file names, which then replaces
  ``https://download.pytorch.org/models``: an internal HTTP(S) server, e.g.
  ``RESNET_WEIGHTS_MIRROR=http://mirror.internal/torch-models`` (``python -m http.server`` in a directory of
  ``.pth`` files will do), a ``file://`` URL, or a plain local directory path. The hash check still applies.
"""

from __future__ import annotations

import http.client
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch

from resnet.errors import PipelineError, first_line, one_line

__all__ = [
    "BASE_URL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MIRROR_ENV",
    "WEIGHTS",
    "TorchvisionWeights",
    "WeightsError",
    "cache_dir",
    "download_state_dict",
    "download_state_dict_from",
    "get_weights",
    "resolve_url",
    "weights_names",
]

BASE_URL = "https://download.pytorch.org/models"
MIRROR_ENV = "RESNET_WEIGHTS_MIRROR"
# The normalisation every torchvision ImageNet weight was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(PipelineError):
    """Weights that cannot be downloaded or loaded; the message is one line naming the URL or file."""


@dataclass(frozen=True)
class TorchvisionWeights:
    """One of torchvision's published weights (its ``Weights`` enum entry, as plain data)."""

    name: str  # canonical "<model>.<WEIGHTS>", never ".DEFAULT"
    model: str  # our (and torchvision's) builder name
    url: str
    num_classes: int
    acc1: float  # ImageNet-1K top-1 accuracy (%) as torchvision reports it
    acc5: float
    num_params: int
    resize_size: int  # evaluation transform: resize the short side to this, then centre-crop crop_size
    crop_size: int = 224

    @property
    def file_name(self) -> str:
        """The file name in the URL, also the cache file's name (``<model>-<sha256 prefix>.pth``)."""
        return self.url.rsplit("/", 1)[1]


def _entry(
    name: str, file_name: str, acc1: float, acc5: float, num_params: int, resize_size: int
) -> TorchvisionWeights:
    return TorchvisionWeights(
        name=name,
        model=name.split(".", 1)[0],
        url=f"{BASE_URL}/{file_name}",
        num_classes=1000,
        acc1=acc1,
        acc5=acc5,
        num_params=num_params,
        resize_size=resize_size,
    )


_ENTRIES = (
    # Values from torchvision 0.29's ResNet*_Weights (get_model_weights(name)): url, meta["_metrics"],
    # meta["num_params"], transforms().resize_size. V1: the original 2017 recipe; V2: torchvision's 2021
    # "new training recipe" (longer, with heavy augmentation), evaluated at resize 232.
    _entry("resnet18.IMAGENET1K_V1", "resnet18-f37072fd.pth", 69.758, 89.078, 11_689_512, 256),
    _entry("resnet34.IMAGENET1K_V1", "resnet34-b627a593.pth", 73.314, 91.42, 21_797_672, 256),
    _entry("resnet50.IMAGENET1K_V1", "resnet50-0676ba61.pth", 76.13, 92.862, 25_557_032, 256),
    _entry("resnet50.IMAGENET1K_V2", "resnet50-11ad3fa6.pth", 80.858, 95.434, 25_557_032, 232),
    _entry("resnet101.IMAGENET1K_V1", "resnet101-63fe2227.pth", 77.374, 93.546, 44_549_160, 256),
    _entry("resnet101.IMAGENET1K_V2", "resnet101-cd907fc2.pth", 81.886, 95.78, 44_549_160, 232),
    _entry("resnet152.IMAGENET1K_V1", "resnet152-394f9c45.pth", 78.312, 94.046, 60_192_808, 256),
    _entry("resnet152.IMAGENET1K_V2", "resnet152-f82ba261.pth", 82.284, 96.002, 60_192_808, 232),
)


def _table() -> dict[str, TorchvisionWeights]:
    table = {entry.name: entry for entry in _ENTRIES}
    for model in dict.fromkeys(entry.model for entry in _ENTRIES):
        versions = sorted(key for key in table if key.startswith(f"{model}.IMAGENET1K_V"))
        table[f"{model}.DEFAULT"] = table[versions[-1]]  # torchvision's DEFAULT is the latest version
    return table


WEIGHTS: dict[str, TorchvisionWeights] = _table()


def weights_names() -> list[str]:
    """Every known name, ``.DEFAULT`` aliases included, in table order."""
    return list(WEIGHTS)


def get_weights(name: str) -> TorchvisionWeights:
    """The entry for ``"<model>.<WEIGHTS>"``; ValueError listing the known names for any other name."""
    try:
        return WEIGHTS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown torchvision weights {name!r}: expected one of {', '.join(WEIGHTS)}"
        ) from None


def cache_dir() -> Path:
    """Where torch hub caches downloaded weights: ``$TORCH_HOME/hub/checkpoints`` (read at each call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_url(entry: TorchvisionWeights) -> str:
    """The URL to download ``entry`` from: torchvision's, or the same file name under RESNET_WEIGHTS_MIRROR."""
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return entry.url
    if "://" not in mirror:  # a local directory
        mirror = Path(mirror).expanduser().resolve().as_uri()
    return f"{mirror.rstrip('/')}/{entry.file_name}"


def download_state_dict(name: str, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """torchvision's weights ``name`` (e.g. ``"resnet50.IMAGENET1K_V2"``) as a CPU state dict, from the torch
    hub cache or downloaded into it (from RESNET_WEIGHTS_MIRROR if set).

    Raises ValueError for an unknown name and WeightsError (one line) when the file cannot be had."""
    entry = get_weights(name)
    return download_state_dict_from(resolve_url(entry), progress=progress)


def download_state_dict_from(
    url: str, *, progress: bool = True, file_name: str | None = None
) -> dict[str, torch.Tensor]:
    """A state dict from ``url`` through torch hub (cache, sha256-prefix check of the file name, weights_only
    load). ``file_name``: the cache file's name, by default the URL's. Failures raise WeightsError, one line."""
    name = file_name or os.path.basename(urlsplit(url).path)
    cached = cache_dir() / name
    try:
        state_dict = torch.hub.load_state_dict_from_url(
            url,
            map_location="cpu",
            progress=progress,
            check_hash=True,
            weights_only=True,
            file_name=file_name,
        )
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        if cached.is_file():  # the download succeeded; reading the cached file failed
            raise _unreadable(cached, exc) from exc
        raise WeightsError(f"cannot download {url}: {_reason(exc)}; {_offline_hint(name)}") from exc
    except RuntimeError as exc:
        if "invalid hash value" in str(exc):
            raise WeightsError(
                f"{url}: the downloaded file does not match the sha256 prefix in its name ({one_line(exc)}); "
                f"the server does not serve torchvision's {name}; nothing was cached"
            ) from exc
        if cached.is_file():
            raise _unreadable(cached, exc) from exc
        raise WeightsError(f"cannot download {url}: {one_line(exc)}; {_offline_hint(name)}") from exc
    except Exception as exc:  # e.g. pickle.UnpicklingError from the weights_only load of the cached file
        if cached.is_file():
            raise _unreadable(cached, exc) from exc
        raise WeightsError(f"cannot download {url}: {one_line(exc)}; {_offline_hint(name)}") from exc
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsError(f"{cached}: not a state dict (downloaded from {url})")
    return state_dict


def _offline_hint(file_name: str) -> str:
    return (
        f"without network access, place {file_name} in {cache_dir()} "
        f"or serve it through {MIRROR_ENV}=<base URL>"
    )


def _unreadable(cached: Path, exc: BaseException) -> WeightsError:
    return WeightsError(
        f"{cached}: the cached weights cannot be loaded ({first_line(exc, typed=True)}); delete the file to download it again"
    )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}".strip()
    if isinstance(exc, urllib.error.URLError):
        return one_line(exc.reason)
    return one_line(exc) or type(exc).__name__
