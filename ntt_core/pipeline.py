"""NTTPredictor: the method end to end, reading top-down like the paper's figure.

``predict(image, bank)`` = ``score(propose(image), bank)``. ``propose`` runs the frozen models
(SAM2 proposals from the point grid, DINOv2 features of each proposal) and does not depend on
the bank; ``score`` does the bank-dependent matching, deduplication and overlap decay.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .bank import MemoryBank
from .coco import json_ready_rle
from .config import NTTConfig
from .errors import ReferenceInputError
from .images import as_rgb8, imagenet_normalize, resize_bicubic, resize_square_pil, to_float_chw
from .matching import assign_classes, overlap_decay, pooled_features, semantic_scores
from .models import LoadProgress, encoder_identity, load_models
from .postprocess import logits_to_rles, mask_boxes, nms_order, rle_areas, rle_boxes_xyxy
from .proposals import Proposals, decode_boxes, decode_points, point_grid, sam2_predictor
from .references import Reference, encode_references
from .result import Instances

ImageInput = np.ndarray | str | Path


class NTTPredictor:
    """Frozen SAM2 + DINOv2 and the method's settings; build once, call per image."""

    def __init__(
        self, config: NTTConfig | None = None, progress: LoadProgress | None = None
    ) -> None:
        """``progress`` hears how model loading goes (checkpoint downloads included)."""
        self.config = config or NTTConfig()
        self.sam_model, self.encoder, self.device = load_models(self.config, progress)
        self._sam = sam2_predictor(self.sam_model)
        self._grid = point_grid(self.config.points_per_side, self.config.sam_image_size)

    @property
    def points_per_batch(self) -> int:
        if self.config.points_per_batch is not None:
            return self.config.points_per_batch
        return 256 if self.device.type == "cuda" else 4

    @property
    def encoder_identity(self) -> str:
        """What a bank records as its encoder: the model, and whether its weights are random."""
        return encoder_identity(self.config)

    # -- references -------------------------------------------------------------------------

    def build_bank(
        self, references: Sequence[Reference], classes: Sequence[str] | None = None
    ) -> MemoryBank:
        """Encodes reference instances and aggregates them into class prototypes."""
        if not references:
            raise ReferenceInputError("No reference instances given: tag some references first")
        with self._autocast():
            features = encode_references(self.encoder, references, self.config.context_ratio)
        return MemoryBank.from_features(
            features,
            labels=[ref.label for ref in references],
            ref_ids=[ref.ref_id for ref in references],
            encoder=self.encoder_identity,
            encoder_image_size=self.config.encoder_image_size,
            classes=classes,
        )

    @torch.inference_mode()
    def masks_from_boxes(
        self, image: ImageInput, boxes_xyxy: Sequence[Sequence[float]]
    ) -> np.ndarray:
        """SAM2's masks (N, H, W) for box prompts on one image (for box-only references)."""
        with self._autocast():
            self._sam.set_image(as_rgb8(image))
            return decode_boxes(self._sam, np.asarray(boxes_xyxy, dtype=np.float32))

    # -- targets ----------------------------------------------------------------------------

    def predict(self, image: ImageInput, bank: MemoryBank) -> Instances:
        return self.score(self.propose(image), bank)

    @torch.inference_mode()
    def propose(self, image: ImageInput) -> Proposals:
        """SAM2 grid proposals with their DINOv2 features (bank-independent)."""
        config = self.config
        image = as_rgb8(image)
        square = resize_square_pil(image, config.sam_image_size)
        with self._autocast():
            tokens = self._target_tokens(square)
            self._sam.set_image(square)
            logits, pred_iou = decode_points(self._sam, self._grid, self.points_per_batch)
        keep = pred_iou > config.pred_iou_threshold
        logits, pred_iou = logits[keep], pred_iou[keep]
        masks = logits > 0
        features, valid = pooled_features(tokens, masks)
        return Proposals(
            image_size=image.shape[:2],
            pred_iou=pred_iou[valid].cpu(),
            boxes=mask_boxes(masks[valid]).cpu(),
            features=features[valid].cpu(),
            logits=logits[valid].cpu(),
        )

    def score(self, proposals: Proposals, bank: MemoryBank) -> Instances:
        """Matches proposals against the bank, deduplicates, and decays overlapping ones."""
        config = self.config
        bank.check_compatible(self.encoder_identity, config.encoder_image_size)
        if len(proposals) == 0:
            return Instances.empty(proposals.image_size, bank.classes)
        scores, labels = assign_classes(semantic_scores(proposals.features, bank.prototypes))
        order = nms_order(
            proposals.boxes,
            proposals.pred_iou,
            labels,
            config.nms_iou_threshold,
            config.max_before_decay,
        )
        order = order[scores[order] > 0]
        kept = proposals.select(order)
        scores, labels = scores[order], labels[order]
        rles = kept.rles if kept.rles is not None else logits_to_rles(kept.logits, kept.image_size)
        nonempty = torch.from_numpy(rle_areas(rles) > 0)
        rles = [rle for rle, ok in zip(rles, nonempty.tolist()) if ok]
        kept, scores, labels = kept.select(nonempty), scores[nonempty], labels[nonempty]
        scores = overlap_decay(scores, labels, kept.features, rles)
        top = torch.sort(scores, descending=True, stable=True).indices[: config.max_detections]
        rles = [json_ready_rle(rles[i]) for i in top.tolist()]
        return Instances(
            image_size=tuple(proposals.image_size),
            boxes=rle_boxes_xyxy(rles),
            scores=scores[top].numpy().astype(np.float32),
            labels=labels[top].numpy().astype(np.int64),
            class_names=list(bank.classes),
            rles=rles,
        )

    def compact(self, proposals: Proposals) -> Proposals:
        """Proposals with full-resolution RLE masks instead of logits: cacheable, same answers."""
        if proposals.rles is not None:
            return proposals
        rles = logits_to_rles(proposals.logits, proposals.image_size)
        return Proposals(
            image_size=proposals.image_size,
            pred_iou=proposals.pred_iou,
            boxes=proposals.boxes,
            features=proposals.features,
            rles=rles,
        )

    # -- internals --------------------------------------------------------------------------

    def _target_tokens(self, square: np.ndarray) -> torch.Tensor:
        """DINOv2 patch tokens (h, w, C) of the squashed target image."""
        image = to_float_chw(square, self.device)[None]
        image = resize_bicubic(image, self.config.encoder_image_size)
        return self.encoder(imagenet_normalize(image))[0].float()

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        if self.device.type != "cuda":
            warnings.warn(
                f"precision={precision!r} needs a GPU; running fp32 on {self.device}", stacklevel=3
            )
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
