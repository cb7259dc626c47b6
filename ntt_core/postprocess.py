"""Deduplication and full-resolution masks."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, masks_to_boxes

# Upsampling works on chunks of masks holding at most this many output pixels, so a very large
# image (12000x9000 is 108 M pixels) costs one mask at a time, not a stack of them.
_PIXELS_PER_CHUNK = 64 * 1024 * 1024


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(P, 4) xyxy boxes of non-empty bool masks (P, H, W)."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4)
    return masks_to_boxes(masks).float()


def nms_order(
    boxes: torch.Tensor,
    pred_iou: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
    limit: int,
) -> torch.Tensor:
    """Class-wise NMS ranked by SAM's predicted IoU; indices in rank order, at most ``limit``."""
    keep = batched_nms(boxes.float(), pred_iou.float(), labels, iou_threshold)
    return keep[:limit]


def logits_to_rles(logits: torch.Tensor, image_size: tuple[int, int]) -> list[dict]:
    """Low-res logits (P, h, w) -> full-resolution binary masks (logit > 0) as COCO RLE."""
    height, width = image_size
    per_chunk = max(1, _PIXELS_PER_CHUNK // max(1, height * width))
    rles: list[dict] = []
    for chunk in logits.split(per_chunk):
        full = (
            F.interpolate(
                chunk[:, None].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )[:, 0]
            > 0
        )
        # pycocotools wants (H, W, N) column-major uint8.
        stacked = np.asfortranarray(full.permute(1, 2, 0).cpu().numpy().astype(np.uint8))
        rles.extend(mask_utils.encode(stacked))
    return rles


def rle_boxes_xyxy(rles: list[dict]) -> np.ndarray:
    """Tight pixel-inclusive xyxy boxes of RLE masks: (N, 4) float32."""
    if not rles:
        return np.zeros((0, 4), dtype=np.float32)
    xywh = mask_utils.toBbox(rles).astype(np.float32)
    xywh[:, 2:] += xywh[:, :2]
    return xywh


# pycocotools 2.0.11's area() overflows a uint8 counter for lists of 256 or more RLEs.
_AREA_BATCH = 255


def rle_areas(rles: list[dict]) -> np.ndarray:
    """Pixel counts of RLE masks: (N,) int64."""
    parts = [
        mask_utils.area(rles[start : start + _AREA_BATCH]).astype(np.int64)
        for start in range(0, len(rles), _AREA_BATCH)
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
