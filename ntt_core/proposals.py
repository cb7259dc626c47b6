"""SAM2 mask proposals from a regular point grid, and the container that carries them."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch
from sam2.sam2_image_predictor import SAM2ImagePredictor


@dataclass
class Proposals:
    """Parallel per-proposal arrays for one target image; independent of any memory bank.

    ``logits`` (low-resolution mask logits) is what the straight pipeline keeps; ``compact()``
    replaces it by full-resolution RLE masks so the proposals can be cached and re-scored.
    """

    image_size: tuple[int, int]
    """Original (H, W) of the target image."""
    pred_iou: torch.Tensor
    """(P,) SAM2's predicted IoU of each proposal."""
    boxes: torch.Tensor
    """(P, 4) xyxy boxes of the low-resolution masks (used for NMS)."""
    features: torch.Tensor
    """(P, C) L2-normalised DINOv2 feature of each proposal."""
    logits: torch.Tensor | None = None
    """(P, h, w) low-resolution mask logits, or None once compacted."""
    rles: list[dict] | None = None
    """Full-resolution COCO RLE masks, present once compacted."""

    def __len__(self) -> int:
        return int(self.pred_iou.shape[0])

    def select(self, keep: torch.Tensor) -> Proposals:
        """The proposals at ``keep`` (bool mask or indices), all arrays kept in step."""
        index = torch.nonzero(keep).flatten() if keep.dtype == torch.bool else keep
        values = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                value = value[index]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            values[item.name] = value
        return Proposals(**values)


def point_grid(points_per_side: int, image_size: int) -> torch.Tensor:
    """(N, 2) xy prompt points on a regular grid in the square SAM input frame (pixel centres).

    x-major like the paper (point k has x = axis[k // n], y = axis[k % n]): NMS breaks ties
    between equal predicted IoUs by this order.
    """
    axis = torch.linspace(0, image_size - 1, points_per_side) + 0.5
    xs, ys = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=1)


@dataclass
class ImageEmbedding:
    """SAM2's image features for the mask decoder: the lowest-resolution map and the others."""

    image_embed: torch.Tensor
    """(1, C, h, w) lowest-resolution map."""
    high_res: list[torch.Tensor]
    """The higher-resolution maps, highest first, as the decoder takes them."""


def embed_image(
    sam_model: torch.nn.Module, pixels: torch.Tensor, add_no_mem_embed: bool = False
) -> ImageEmbedding:
    """SAM2's features of ImageNet-normalised (1, 3, S, S) pixels, as the paper computes them.

    ``forward_image`` + ``_prepare_backbone_features``, without the ``no_mem_embed`` that
    ``SAM2ImagePredictor.set_image`` adds to the lowest-resolution map unless asked.
    """
    backbone = sam_model.forward_image(pixels)
    _, feats, _, sizes = sam_model._prepare_backbone_features(backbone)
    if add_no_mem_embed:
        feats[-1] = feats[-1] + sam_model.no_mem_embed
    # (HW, 1, C) -> (1, C, H, W)
    maps = [f.permute(1, 2, 0).reshape(1, -1, h, w) for f, (h, w) in zip(feats, sizes)]
    return ImageEmbedding(image_embed=maps[-1], high_res=maps[:-1])


def sam2_predictor(sam_model: torch.nn.Module) -> SAM2ImagePredictor:
    """SAM2's image predictor, told the feature-map sizes of a non-1024 input."""
    predictor = SAM2ImagePredictor(sam_model)
    size = sam_model.image_size
    # The predictor hard-codes the 1024 input's backbone sizes; smaller inputs scale them.
    predictor._bb_feat_sizes = [
        (size // 4, size // 4),
        (size // 8, size // 8),
        (size // 16, size // 16),
    ]
    return predictor


@torch.inference_mode()
def decode_points(
    model: torch.nn.Module, embedding: ImageEmbedding, points: torch.Tensor, points_per_batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-point prompts -> best-of-three low-res logits (N, h, w) and predicted IoU (N,).

    Decoding goes straight through the prompt encoder and mask decoder, so masks are never
    upsampled to the input size (the predictor's ``predict`` would materialise
    (N, 3, 1024, 1024) floats). The logits are kept as they are: SAM2's predictor clamps them
    to +-32, the paper does not, and trained weights exceed that.
    """
    image_embed, high_res = embedding.image_embed, embedding.high_res
    dense_pe = model.sam_prompt_encoder.get_dense_pe()
    best_logits, best_iou = [], []
    for chunk in points.split(points_per_batch):
        coords = chunk.to(image_embed.device, torch.float32)[:, None, :]
        labels = torch.ones(coords.shape[:2], dtype=torch.int, device=coords.device)
        sparse, dense = model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        logits, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=image_embed,
            image_pe=dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=high_res,
        )
        best = iou.argmax(dim=1)
        rows = torch.arange(len(best), device=best.device)
        best_logits.append(logits[rows, best].float())
        best_iou.append(iou[rows, best].float())
    return torch.cat(best_logits), torch.cat(best_iou)


@torch.inference_mode()
def decode_boxes(predictor: SAM2ImagePredictor, boxes_xyxy: np.ndarray) -> np.ndarray:
    """SAM2's single-mask answers to box prompts, at the image's original size (bool N x H x W)."""
    masks, _, _ = predictor.predict(
        box=np.asarray(boxes_xyxy, dtype=np.float32).reshape(-1, 4), multimask_output=False
    )
    # predict squeezes a batch of one: (1, H, W) for one box, (N, 1, H, W) for several.
    return masks.reshape(-1, *masks.shape[-2:]).astype(bool)
