"""Encoding reference instances into DINOv2 features (the memory bank's entries)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ReferenceInputError
from .images import as_rgb8, imagenet_normalize, resize_bicubic, to_float_chw


@dataclass
class Reference:
    """One reference instance: an image, the instance's full-resolution mask and its class."""

    image: np.ndarray | str | Path
    """uint8 RGB (H, W, 3) or a path to the image file."""
    mask: np.ndarray
    """bool (H, W), the instance's pixels."""
    label: str
    ref_id: str = ""
    """Provenance recorded in the bank (e.g. ``"<sample id>:<label id>"``)."""
    box_xywh: tuple[float, float, float, float] | None = None
    """The annotation's box; the mask's tight box when omitted."""


def mask_box_xywh(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight pixel-inclusive box of a binary mask, COCO (x, y, w, h)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ReferenceInputError("Reference mask is empty")
    return (
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    )


def context_crop(
    box_xywh: Sequence[float], image_hw: tuple[int, int], context_ratio: float
) -> tuple[int, int, int, int]:
    """Square crop (x1, y1, x2, y2) around the box, grown by context_ratio, clipped to the image."""
    x, y, w, h = box_xywh
    x1, y1, x2, y2 = (_truncate(v) for v in (x, y, x + w, y + h))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half = max(x2 - x1, y2 - y1) * (1 + context_ratio) / 2
    height, width = image_hw
    left = min(max(int(cx - half), 0), width)
    top = min(max(int(cy - half), 0), height)
    right = min(max(int(cx + half), 0), width)
    bottom = min(max(int(cy + half), 0), height)
    return left, top, right, bottom


# Box coordinates that went through relative coordinates come back a few ulps off their pixel
# value (13.999999999999998 for 14); COCO's own boxes are fractional to 1e-2 at most.
_ROUND_OFF = 1e-6


def _truncate(value: float) -> int:
    """``int(value)`` of the pixel number ``value`` stands for, round-off recovered first."""
    nearest = round(value)
    return int(nearest) if abs(value - nearest) < _ROUND_OFF else int(value)


def prepare_reference(
    reference: Reference, context_ratio: float, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops and resizes one reference: image (3, size, size) in [0, 1], soft mask (size, size)."""
    image = as_rgb8(reference.image)
    mask = np.asarray(reference.mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ReferenceInputError(
            f"Reference {reference.ref_id or reference.label!r}: mask shape {mask.shape} does not "
            f"match image shape {image.shape[:2]}"
        )
    box = reference.box_xywh if reference.box_xywh is not None else mask_box_xywh(mask)
    left, top, right, bottom = context_crop(box, image.shape[:2], context_ratio)
    if right <= left or bottom <= top:
        raise ReferenceInputError(
            f"Reference {reference.ref_id!r}: box {box} lies outside the image"
        )
    crop = to_float_chw(image[top:bottom, left:right])[None]
    mask_crop = torch.from_numpy(mask[top:bottom, left:right]).float()[None, None]
    crop = resize_bicubic(crop, size)[0]
    soft_mask = F.interpolate(mask_crop, size=(size, size), mode="bilinear", align_corners=False)
    return crop, soft_mask[0, 0]


def masked_mean_features(tokens: torch.Tensor, soft_masks: torch.Tensor) -> torch.Tensor:
    """Mask-weighted mean of patch tokens.

    tokens: (B, h, w, C) patch tokens; soft_masks: (B, S, S) soft masks at the encoder input size.
    The masks are brought to the token grid with nearest interpolation, staying soft.
    Returns (B, C), not normalised.
    """
    grid = tokens.shape[1:3]
    weights = F.interpolate(soft_masks[:, None].float(), size=grid, mode="nearest")[:, 0]
    total = weights.flatten(1).sum(dim=1)
    if bool((total <= 0).any()):
        raise ReferenceInputError(
            "A reference mask vanishes at the encoder's patch resolution; use a larger instance"
        )
    summed = torch.einsum("bhw,bhwc->bc", weights, tokens.float())
    return summed / total[:, None]


@torch.inference_mode()
def encode_references(
    encoder: torch.nn.Module,
    references: Sequence[Reference],
    context_ratio: float,
    batch_size: int = 8,
) -> torch.Tensor:
    """DINOv2 features (N, C) of reference instances, on the CPU."""
    features = []
    device = next(encoder.parameters()).device
    for start in range(0, len(references), batch_size):
        batch = [
            prepare_reference(ref, context_ratio, encoder.image_size)
            for ref in references[start : start + batch_size]
        ]
        crops = torch.stack([crop for crop, _ in batch]).to(device)
        masks = torch.stack([mask for _, mask in batch]).to(device)
        tokens = encoder(imagenet_normalize(crops))
        features.append(masked_mean_features(tokens, masks).cpu())
    return torch.cat(features) if features else torch.zeros(0, encoder.embed_dim)
