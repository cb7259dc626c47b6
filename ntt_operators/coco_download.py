"""The COCO 2017 files the reproduction needs, fetched only when missing.

Layout of a COCO root: ``train2017/``, ``val2017/`` and
``annotations/instances_{train,val}2017.json``. Annotations come from the official zip; images
come one by one from the image server (the sampled train references, a ``--max-samples`` look
at val), or from the split's zip when most of the split is missing. Every write is atomic: a
file appears complete under its final name or not at all, so an interruption leaves no half file.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ntt_core.errors import NTTError
from ntt_core.registry import download_file

logger = logging.getLogger(__name__)

COCO_URL = "http://images.cocodataset.org"
ANNOTATIONS_ZIP = "annotations/annotations_trainval2017.zip"
SPLITS = ("train2017", "val2017")
# Beyond this many missing images the split's zip is fetched instead: all of val2017 (5,000
# images, 0.8 GB) comes zipped, while 30-shot references (at most 2,400 images even for the 80
# classes) come one by one rather than as the 18 GB train2017 zip.
MAX_SINGLE_DOWNLOADS = 3000


class CocoDataError(NTTError):
    """A COCO file is missing and could not be fetched."""


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / split


def ensure_annotations(root: Path, download: bool, base_url: str = COCO_URL) -> None:
    """Both annotation files under ``root/annotations``, from the official zip when missing."""
    missing = [annotation_path(root, s) for s in SPLITS if not annotation_path(root, s).is_file()]
    if not missing:
        return
    url = f"{base_url}/{ANNOTATIONS_ZIP}"
    _fetch_zip_members(url, Path(root), [_member(root, p) for p in missing], download)


def ensure_images(
    root: Path, split: str, file_names: Sequence[str], download: bool, base_url: str = COCO_URL
) -> None:
    """Every ``file_names`` image under ``root/<split>``: fetched one by one, or via the zip."""
    folder = image_dir(root, split)
    missing = [name for name in file_names if not (folder / name).is_file()]
    if not missing:
        return
    if len(missing) > MAX_SINGLE_DOWNLOADS:
        members = [f"{split}/{name}" for name in missing]
        _fetch_zip_members(f"{base_url}/zips/{split}.zip", Path(root), members, download)
        return
    logger.info("Fetching %d %s images", len(missing), split)
    for name in missing:
        _fetch(f"{base_url}/{split}/{name}", folder / name, download)


def _member(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _fetch(url: str, target: Path, download: bool) -> None:
    if not download:
        raise CocoDataError(_missing_message(target, url, "downloads are off (--no-download)"))
    try:
        download_file(url, target)
    except OSError as error:  # URLError, HTTPError, timeouts and disk errors
        raise CocoDataError(
            _missing_message(target, url, f"the download failed ({error})")
        ) from None


def _fetch_zip_members(url: str, root: Path, members: Sequence[str], download: bool) -> None:
    """Downloads the zip at ``url`` next to ``root`` and extracts ``members`` into ``root``."""
    archive = root / Path(url).name
    if not archive.is_file():
        _fetch(url, archive, download)
    try:
        with zipfile.ZipFile(archive) as zipped:
            for member in members:
                _extract(zipped, member, root / member)
    except (zipfile.BadZipFile, KeyError) as error:
        raise CocoDataError(
            f"{archive} is not the expected COCO archive ({error}); delete it and run again"
        ) from None
    # The zips are large (up to 18 GB); once unpacked they are of no further use.
    archive.unlink()


def _extract(zipped: zipfile.ZipFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    part = tempfile.NamedTemporaryFile(dir=target.parent, suffix=".part", delete=False)
    try:
        with part, zipped.open(member) as source:
            shutil.copyfileobj(source, part, 1 << 20)
        os.replace(part.name, target)
    except BaseException:
        Path(part.name).unlink(missing_ok=True)
        raise


def _missing_message(target: Path, url: str, reason: str) -> str:
    return (
        f"COCO file {target} is missing and {reason}. Download {url} and put it at {target} "
        "(zips: unpack them in the COCO root), or point --coco-root at a complete COCO 2017 "
        "root (train2017/, val2017/, annotations/instances_{train,val}2017.json)."
    )
