"""The straightforward path: the computation shaped like the paper's implementation.

It decodes prompts through SAM2's public ``predict`` in chunks of 256 (masks come back at the
full input size, three per prompt), upsamples the target's token map to the mask size and
averages it under every proposal, and filters by predicted IoU only afterwards. It is the oracle
that the fast path (``NTTPredictor.propose``) is tested and benchmarked against; both feed the
same ``score``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .images import as_rgb8, resize_square_pil
from .pipeline import NTTPredictor
from .postprocess import mask_boxes
from .proposals import Proposals

PAPER_CHUNK = 256


@torch.inference_mode()
def propose_straightforward(predictor: NTTPredictor, image: np.ndarray | str) -> Proposals:
    config = predictor.config
    image = as_rgb8(image)
    square = resize_square_pil(image, config.sam_image_size)
    with predictor._autocast():
        tokens = predictor._target_tokens(square)
        predictor._sam.set_image(square)
        logits, pred_iou = _decode_with_predict(predictor, predictor._grid.numpy())
    masks = logits > 0
    upsampled = F.interpolate(
        tokens.permute(2, 0, 1)[None], size=logits.shape[1:], mode="bilinear",
        align_corners=False, antialias=True,
    )[0].flatten(1)  # fmt: skip
    weights = masks.flatten(1).float()
    areas = weights.sum(dim=1)
    features = F.normalize((weights @ upsampled.T) / areas.clamp(min=1)[:, None], dim=1)
    keep = (pred_iou > config.pred_iou_threshold) & (areas > 0)
    return Proposals(
        image_size=image.shape[:2],
        pred_iou=pred_iou[keep].cpu(),
        boxes=mask_boxes(masks[keep]).cpu(),
        features=features[keep].cpu(),
        logits=logits[keep].cpu(),
    )


def _decode_with_predict(predictor: NTTPredictor, points: np.ndarray):
    logits, ious = [], []
    for start in range(0, len(points), PAPER_CHUNK):
        chunk = points[start : start + PAPER_CHUNK, None, :]
        _, chunk_iou, chunk_logits = predictor._sam.predict(
            point_coords=chunk,
            point_labels=np.ones(chunk.shape[:2], dtype=np.int64),
            multimask_output=True,
            return_logits=True,
        )
        best = chunk_iou.argmax(axis=1)
        rows = np.arange(len(best))
        logits.append(torch.from_numpy(chunk_logits[rows, best]))
        ious.append(torch.from_numpy(chunk_iou[rows, best]))
    return torch.cat(logits), torch.cat(ious)
