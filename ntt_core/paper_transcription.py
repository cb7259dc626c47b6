"""The method transcribed step by step from the method spec (section 3), as an oracle.

Each step below is the spec's step of the same number, computed the plain way: straight on the
SAM2 model's modules (image encoder, ``_prepare_backbone_features``, prompt encoder, mask
decoder), with dense full-size masks. It shares nothing with the fast path
(``NTTPredictor.propose`` / ``score``) but the networks, so the two can disagree: the tests
hold the fast path equal to it, and the benchmarks time the fast path against it. It is slow
and memory-hungry on purpose; do not use it for real work.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sam2.utils.amg import batched_mask_to_box
from torchvision.ops import batched_nms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PaperSettings:
    """The spec's numbers (the paper's defaults), spelled out so nothing comes from NTTConfig."""

    sam_image_size: int = 1024
    encoder_image_size: int = 518
    points_per_side: int = 32
    prompts_per_chunk: int = 256
    pred_iou_threshold: float = 0.4
    nms_iou_threshold: float = 0.5
    max_before_decay: int = 800
    max_detections: int = 100


@dataclass
class PaperDetections:
    """The spec's output for one image, best first."""

    masks: torch.Tensor
    """(N, H, W) bool full-resolution masks."""
    boxes: torch.Tensor
    """(N, 4) xyxy with x2/y2 the last foreground column/row (the paper's convention)."""
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@torch.inference_mode()
def predict_as_in_paper(
    sam_model: torch.nn.Module,
    encoder: torch.nn.Module,
    image: np.ndarray,
    prototypes: torch.Tensor,
    settings: PaperSettings,
) -> PaperDetections:
    """Spec section 3 on one uint8 RGB image against L2-normalised class prototypes (K, C)."""
    device = prototypes.device
    height, width = image.shape[:2]
    # 1. Squash to the SAM input size with PIL's bicubic filter; values in [0, 1].
    size = settings.sam_image_size
    square = np.array(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    pixels = torch.from_numpy(square).to(device).permute(2, 0, 1)[None].float() / 255
    # 2. DINOv2 patch tokens of the bicubic 518 resize.
    tokens = encoder(_normalize(_bicubic(pixels, settings.encoder_image_size)))[0].float()
    # 3. SAM2 image embedding (no no_mem_embed) and the x-major point grid, decoded in chunks.
    logits, pred_iou = _decode_grid(sam_model, _normalize(pixels), settings)
    # 4. Predicted-IoU filter.
    keep = pred_iou > settings.pred_iou_threshold
    logits, pred_iou = logits[keep], pred_iou[keep]
    # 5. Proposal features: tokens upsampled to the mask size, averaged under each mask.
    masks = logits > 0
    upsampled = F.interpolate(
        tokens.permute(2, 0, 1)[None], size=masks.shape[1:], mode="bilinear",
        align_corners=False, antialias=True,
    )[0]  # fmt: skip
    areas = masks.flatten(1).sum(dim=1)
    nonempty = areas > 0  # an empty mask has no feature (the paper's code would give NaN)
    masks, logits, pred_iou = masks[nonempty], logits[nonempty], pred_iou[nonempty]
    areas = areas[nonempty]
    sums = masks.flatten(1).float() @ upsampled.flatten(1).T
    features = F.normalize(sums / areas[:, None], dim=1)
    # 6. Semantic score and best class.
    scores, labels = (features @ prototypes.T).clamp(min=0).max(dim=1)
    # 7. Class-wise NMS of the low-res boxes ranked by predicted IoU; at most 800; score > 0.
    boxes = batched_mask_to_box(masks).float()
    order = batched_nms(boxes, pred_iou, labels, settings.nms_iou_threshold)
    order = order[: settings.max_before_decay]
    order = order[scores[order] > 0]
    # 8. Raw logits upsampled to the original size, thresholded at 0.
    full = _upsample_to(logits[order], (height, width)) > 0
    present = full.flatten(1).any(dim=1)  # a mask that vanishes at full size is no instance
    order, full = order[present], full[present]
    scores, labels, features = scores[order], labels[order], features[order]
    # 9. Semantic-aware overlap decay within each class, in NMS order.
    scores = _overlap_decay(full, scores, labels, features)
    # 10. Best first, at most 100.
    top = torch.sort(scores, descending=True, stable=True).indices[: settings.max_detections]
    return PaperDetections(
        masks=full[top].cpu(),
        boxes=batched_mask_to_box(full[top]).cpu().float(),
        scores=scores[top].cpu(),
        labels=labels[top].cpu(),
    )


def _normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


def _bicubic(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False)


def _decode_grid(
    sam_model: torch.nn.Module, pixels: torch.Tensor, settings: PaperSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-of-three low-res logits and predicted IoU of every grid point, x-major."""
    backbone = sam_model.forward_image(pixels)
    _, vision_feats, _, feat_sizes = sam_model._prepare_backbone_features(backbone)
    # (HW, 1, C) -> (1, C, H, W); the lowest resolution as the backbone gives it.
    maps = [
        feat.permute(1, 2, 0).reshape(1, -1, h, w) for feat, (h, w) in zip(vision_feats, feat_sizes)
    ]
    image_embed, high_res = maps[-1], maps[:-1]
    side = settings.sam_image_size
    lin = torch.linspace(0, side - 1, settings.points_per_side) + 0.5
    first, second = torch.meshgrid(lin, lin, indexing="ij")
    points = torch.stack([first.flatten(), second.flatten()], dim=1).to(pixels.device)
    dense_pe = sam_model.sam_prompt_encoder.get_dense_pe()
    all_logits, all_iou = [], []
    for chunk in points.split(settings.prompts_per_chunk):
        coords = chunk[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        sparse, dense = sam_model.sam_prompt_encoder(
            points=(coords, labels), boxes=None, masks=None
        )
        logits, iou, _, _ = sam_model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=high_res,
        )
        best = iou.argmax(dim=1)
        all_logits.append(logits[torch.arange(len(best)), best].float())
        all_iou.append(iou[torch.arange(len(best)), best].float())
    return torch.cat(all_logits), torch.cat(all_iou)


def _upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased upsampling of (P, h, w) logits, a few masks at a time."""
    parts = [
        F.interpolate(
            chunk[:, None], size=size, mode="bilinear", align_corners=False, antialias=True
        )[:, 0]
        for chunk in logits.split(16)
    ]
    return torch.cat(parts) if parts else logits.new_zeros((0, *size))


def _overlap_decay(
    masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, features: torch.Tensor
) -> torch.Tensor:
    """score_i * sqrt(1 - max_{j<i, same class} |M_i ∩ M_j| / |M_i| * max(0, cos(f_i, f_j)))."""
    decayed = scores.clone()
    flat = masks.flatten(1).double()  # exact pixel counts
    for label in labels.unique():
        members = torch.nonzero(labels == label).flatten()
        inter = flat[members] @ flat[members].T
        ios = inter / flat[members].sum(dim=1)[:, None]
        cos = (features[members] @ features[members].T).clamp(min=0).double()
        weighted = (ios * cos).tril(diagonal=-1)
        worst = weighted.max(dim=1).values if len(members) > 1 else weighted.new_zeros(1)
        decayed[members] = (scores[members].double() * torch.sqrt(1 - worst)).float()
    return decayed
