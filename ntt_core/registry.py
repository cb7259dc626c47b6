"""The official checkpoints the method can use, where they are cached, and how they are fetched.

Meta publishes no checksums for these files; a download is verified instead by the strict
state-dict load in ``ntt_core.models`` (a truncated or foreign file fails there with a clear error).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.request import urlopen

from ntt_core.errors import CheckpointError

logger = logging.getLogger(__name__)

_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_DOWNLOAD_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20

DownloadProgress = Callable[[str, int, "int | None"], None]
"""Called as a download goes: (file name, bytes done, total bytes or None when unknown)."""
_CONFIG_FIELD = {
    "sam2": "sam_model (CLI --sam-model)",
    "dinov2": "encoder_model (CLI --encoder-model)",
}


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint file and the network it belongs to."""

    name: str
    kind: Literal["sam2", "dinov2"]
    file_name: str
    url: str
    arch: str
    """SAM2: the hydra config inside the ``sam2`` package; DINOv2: the timm architecture."""
    embed_dim: int
    """Channels of the features the network outputs (SAM2 image embedding / DINOv2 patch token)."""


def _sam2(version: str, base_url: str, size: str, config_size: str) -> Checkpoint:
    name = f"{version}_hiera_{size}"
    config = f"configs/{version}/{version}_hiera_{config_size}.yaml"
    return Checkpoint(name, "sam2", f"{name}.pt", f"{base_url}/{name}.pt", config, 256)


def _dinov2(short: str, size: str, embed_dim: int) -> Checkpoint:
    name = f"dinov2_vit{short}14"
    file_name = f"{name}_pretrain.pth"
    url = f"{_DINOV2_URL}/{name}/{file_name}"
    return Checkpoint(name, "dinov2", file_name, url, f"vit_{size}_patch14_dinov2", embed_dim)


_SAM2_SIZES = (("tiny", "t"), ("small", "s"), ("base_plus", "b+"), ("large", "l"))
_DINOV2_SIZES = (
    ("s", "small", 384),
    ("b", "base", 768),
    ("l", "large", 1024),
    ("g", "giant", 1536),
)

CHECKPOINTS: dict[str, Checkpoint] = {
    entry.name: entry
    for entry in (
        *(_sam2("sam2", _SAM2_URL, size, cfg) for size, cfg in _SAM2_SIZES),
        *(_sam2("sam2.1", _SAM21_URL, size, cfg) for size, cfg in _SAM2_SIZES),
        *(_dinov2(short, size, dim) for short, size, dim in _DINOV2_SIZES),
    )
}
"""Every official checkpoint by name: SAM2 (July 2024), SAM2.1 (Sept. 2024), DINOv2 (LVD-142M)."""


def get_checkpoint(name: str) -> Checkpoint:
    """The registry entry called ``name``; the error lists the known names."""
    try:
        return CHECKPOINTS[name]
    except KeyError:
        raise CheckpointError(
            f"Unknown checkpoint name {name!r}. Known names: {', '.join(CHECKPOINTS)}; "
            "or pass the path of a local checkpoint file."
        ) from None


def find_by_file_name(path: str | Path) -> Checkpoint | None:
    """The registry entry whose official file name is ``path``'s base name, if any."""
    base = Path(path).name
    return next((entry for entry in CHECKPOINTS.values() if entry.file_name == base), None)


def cache_dir() -> Path:
    """The checkpoint cache: $NTT_CACHE_DIR, else $FIFTYONE_MODEL_ZOO_DIR/ntt, else ~/.cache/ntt."""
    if os.environ.get("NTT_CACHE_DIR"):
        return Path(os.environ["NTT_CACHE_DIR"]).expanduser()
    # Sharing FiftyOne's zoo dir keeps all of a user's model weights in one place.
    if os.environ.get("FIFTYONE_MODEL_ZOO_DIR"):
        return Path(os.environ["FIFTYONE_MODEL_ZOO_DIR"]).expanduser() / "ntt"
    return Path.home() / ".cache" / "ntt"


def resolve_checkpoint(
    name_or_path: str | Path, download: bool = True, progress: DownloadProgress | None = None
) -> Path:
    """The local file of a checkpoint: an existing path as-is, or a registry name's cached file.

    A registry name's file is downloaded into ``cache_dir()`` when absent (if ``download``),
    reporting to ``progress``.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    text = str(name_or_path)
    if text in CHECKPOINTS:
        return _cached_file(CHECKPOINTS[text], download, progress)
    if _looks_like_path(text):
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not an existing file. Pass an existing file or a "
            f"registry name ({', '.join(CHECKPOINTS)}) as sam_model / encoder_model "
            "(CLI --sam-model / --encoder-model)."
        )
    return _cached_file(get_checkpoint(text), download, progress)


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text or "/" in text or text.startswith("~") or text.endswith(_CHECKPOINT_SUFFIXES)
    )


def _cached_file(entry: Checkpoint, download: bool, progress: DownloadProgress | None) -> Path:
    target = cache_dir() / entry.file_name
    if target.is_file():
        return target
    if not download:
        raise CheckpointError(_missing_message(entry, target, "it is not in the cache"))
    try:
        download_file(entry.url, target, progress)
    except OSError as error:  # URLError, HTTPError, timeouts and disk errors are all OSErrors
        reason = f"the download failed ({error})"
        raise CheckpointError(_missing_message(entry, target, reason)) from error
    return target


def _missing_message(entry: Checkpoint, target: Path, reason: str) -> str:
    return (
        f"Checkpoint {entry.name!r} is not available: {reason}. Download {entry.file_name} from "
        f"{entry.url} and put it at {target}, or pass the path of a local copy as "
        f"{_CONFIG_FIELD[entry.kind]}."
    )


def download_file(url: str, target: Path, progress: DownloadProgress | None = None) -> None:
    """Downloads ``url`` to ``target`` atomically: no partial file is ever left at ``target``.

    ``progress`` hears about every chunk (``target``'s name, bytes so far, total if known).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Downloading %s to %s", url, target)
    # A temp file in the same directory makes os.replace an atomic rename on every platform.
    part = tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False)
    try:
        with part, urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            done = 0
            while chunk := response.read(_CHUNK_BYTES):
                part.write(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(target.name, done, total)
        os.replace(part.name, target)
    except BaseException:
        Path(part.name).unlink(missing_ok=True)
        raise
