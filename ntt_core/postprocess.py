"""Deduplication and full-resolution masks."""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, masks_to_boxes


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
