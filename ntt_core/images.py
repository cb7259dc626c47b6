"""Reading images the way the App shows them, and the method's resizes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(path: str | Path) -> np.ndarray:
    """Reads an image as uint8 RGB (H, W, 3), upright as the App shows it (EXIF applied)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"Image file not found: {path}")
    try:
        # Large scans (e.g. 12000x9000) are legitimate inputs here; PIL still refuses real bombs
        # (over twice its pixel limit) with DecompressionBombError, reported below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                # In place: no second full-size copy when there is nothing to rotate.
                ImageOps.exif_transpose(image, in_place=True)
                return _to_rgb8(image)
    except (
        UnidentifiedImageError,
        Image.DecompressionBombError,
        OSError,
        SyntaxError,
        ValueError,
    ) as error:
        raise ImageError(f"Cannot decode image {path}: {error}") from error


def as_rgb8(image: np.ndarray | str | Path) -> np.ndarray:
    """Accepts a path or an array and returns a contiguous uint8 RGB array."""
    if isinstance(image, (str, Path)):
        return load_image(image)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise ImageError(
            f"Expected a uint8 RGB image of shape (H, W, 3), got {array.dtype} {array.shape}"
        )
    return np.ascontiguousarray(array[:, :, :3])


def _to_rgb8(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's convert("RGB") clips 16-bit values to 255; rescale the range instead.
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(values.max()), 1.0)
        gray = np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        span = max(float(values.max() - values.min()), 1e-12)
        gray = ((values - values.min()) / span * 255.0 + 0.5).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def resize_square_pil(image: np.ndarray, size: int) -> np.ndarray:
    """Squashes an RGB image to size x size with PIL's bicubic filter (the target resize)."""
    if image.shape[:2] == (size, size):
        return image
    return np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def to_float_chw(image: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1]."""
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    return tensor.permute(2, 0, 1).float().div_(255.0)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """Normalises (B, 3, H, W) images in [0, 1] with ImageNet statistics."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def resize_bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), bicubic, no antialiasing, no clamping."""
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)
