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
from .decay_record import DecayRecord
from .errors import ReferenceInputError
from .explain import explain
from .images import as_rgb8, imagenet_normalize, resize_bicubic, resize_square_pil, to_float_chw
from .masks import CroppedMasks, RLEMasks, masks_from_logits
from .matching import assign_classes, decay_factors, pooled_features, scores_with_negatives
from .models import LoadProgress, encoder_identity, load_encoder, load_sam2, resolve_device
from .postprocess import mask_boxes, nms_order
from .proposals import (
    Proposals,
    decode_boxes,
    decode_points,
    embed_image,
    point_grid,
    sam2_predictor,
)
from .references import Reference, encode_references
from .result import Instances

ImageInput = np.ndarray | str | Path


def full_resolution_masks(
    proposals: Proposals, index: torch.Tensor | None = None
) -> CroppedMasks | RLEMasks:
    """Binary masks at the image size of the proposals at ``index`` (all when None): from the
    logits, or the cached RLEs."""
    size = tuple(proposals.image_size)
    if proposals.rles is not None:
        masks = RLEMasks(size, proposals.rles)
        return masks if index is None else masks.select(index.cpu())
    return masks_from_logits(proposals.logits, proposals.boxes, size, index)


class NTTPredictor:
    """Frozen SAM2 + DINOv2 and the method's settings; build once, call per image."""

    def __init__(
        self,
        config: NTTConfig | None = None,
        load: bool = True,
        progress: LoadProgress | None = None,
    ) -> None:
        """``load=False`` defers loading each model to its first use: re-scoring cached
        proposals (``score``) needs neither, encoding references needs only DINOv2.
        ``progress`` hears how model loading goes (checkpoint downloads included)."""
        self.config = config or NTTConfig()
        self._progress = progress
        self._grid = point_grid(self.config.points_per_side, self.config.sam_image_size)
        self._sam_parts: tuple | None = None
        self._encoder: torch.nn.Module | None = None
        if load:  # both now, so that a bad checkpoint or device is refused here
            self._load_sam()
            self._encoder = load_encoder(self.config, progress)

    @property
    def models_loaded(self) -> bool:
        """Whether any model has been loaded (re-scoring cached proposals loads none)."""
        return self._sam_parts is not None or self._encoder is not None

    @property
    def sam_model(self) -> torch.nn.Module:
        return self._load_sam()[0]

    @property
    def encoder(self) -> torch.nn.Module:
        if self._encoder is None:
            self._encoder = load_encoder(self.config, self._progress)
        return self._encoder

    @property
    def device(self) -> torch.device:
        return resolve_device(self.config.device)

    @property
    def _sam(self):
        """SAM2's image predictor (prompts in, masks out)."""
        return self._load_sam()[1]

    def _load_sam(self) -> tuple:
        if self._sam_parts is None:
            model = load_sam2(self.config, self._progress)
            self._sam_parts = (model, sam2_predictor(model))
        return self._sam_parts

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
        features = self.encode(references)
        return MemoryBank.from_features(
            features,
            labels=[ref.label for ref in references],
            ref_ids=[ref.ref_id for ref in references],
            encoder=self.encoder_identity,
            encoder_image_size=self.config.encoder_image_size,
            classes=classes,
        )

    def encode(self, references: Sequence[Reference]) -> torch.Tensor:
        """(N, C) features of reference instances (positive or negative: encoded alike)."""
        with self._autocast():
            return encode_references(self.encoder, references, self.config.context_ratio)

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
            pixels = to_float_chw(square, self.device)[None]
            tokens = self._target_tokens(pixels)
            embedding = embed_image(
                self.sam_model, imagenet_normalize(pixels), config.add_no_mem_embed
            )
            logits, pred_iou = decode_points(
                self.sam_model, embedding, self._grid, self.points_per_batch
            )
        keep = pred_iou > config.pred_iou_threshold
        logits, pred_iou = logits[keep], pred_iou[keep]
        masks = logits > 0
        features, valid = pooled_features(tokens, masks)
        # Kept on the device: score() post-processes them there.
        return Proposals(
            image_size=image.shape[:2],
            pred_iou=pred_iou[valid],
            boxes=mask_boxes(masks[valid]),
            features=features[valid],
            logits=logits[valid],
        )

    def score(
        self, proposals: Proposals, bank: MemoryBank, record: DecayRecord | None = None
    ) -> Instances:
        """Matches proposals against the bank, deduplicates, and decays overlapping ones.

        Runs where the proposals are (the GPU for fresh ones, the CPU for cached ones); only
        the returned instances are brought to the CPU and RLE-encoded. ``record``: a previous
        scoring's ``DecayRecord`` of the same proposals; where it still holds, its survivors
        and decay factors are used instead of reading the masks (same results). The returned
        instances carry the record of this scoring.
        """
        config = self.config
        bank.check_compatible(self.encoder_identity, config.encoder_image_size)
        if len(proposals) == 0:
            return Instances.empty(proposals.image_size, bank.classes)
        scores, labels = assign_classes(self.class_scores(proposals.features, bank))
        settings = (config.nms_iou_threshold, config.max_before_decay)
        masks = None
        if record is None or not record.holds(labels, scores, settings):
            record, masks = self._decay_record(proposals, scores, labels)
        kept = torch.from_numpy(record.kept).to(scores.device)
        if len(kept) == 0:
            return Instances.empty(proposals.image_size, bank.classes, record)
        decay = torch.from_numpy(record.decay).to(scores.device)
        scores, labels, features = scores[kept] * decay, labels[kept], proposals.features[kept]
        top = torch.sort(scores, descending=True, stable=True).indices[: config.max_detections]
        if masks is None:
            returned = full_resolution_masks(proposals, kept[top])
        else:
            returned = masks.select(top.cpu())
        return Instances(
            image_size=tuple(proposals.image_size),
            boxes=returned.boxes_xyxy(),
            scores=scores[top].cpu().numpy().astype(np.float32),
            labels=labels[top].cpu().numpy().astype(np.int64),
            class_names=list(bank.classes),
            rles=[json_ready_rle(rle) for rle in returned.rles()],
            explanation=explain(features[top], labels[top], proposals.pred_iou[kept][top], bank),
            decay_record=record,
        )

    def _decay_record(
        self, proposals: Proposals, scores: torch.Tensor, labels: torch.Tensor
    ) -> tuple[DecayRecord, CroppedMasks | RLEMasks]:
        """NMS, the empty-mask filter and the overlap decay of proposals with best ``scores``
        and classes ``labels``: the record and the masks of the proposals kept."""
        config = self.config
        survivors = nms_order(
            proposals.boxes,
            proposals.pred_iou,
            labels,
            config.nms_iou_threshold,
            config.max_before_decay,
        )
        positive = scores[survivors] > 0
        kept = survivors[positive]
        masks = full_resolution_masks(proposals, kept)
        nonempty = torch.nonzero(masks.areas() > 0).flatten()
        masks, kept = masks.select(nonempty.cpu()), kept[nonempty.to(kept.device)]
        if len(kept):
            overlaps = masks.overlap_over_self(labels[kept])
            decay = decay_factors(labels[kept], proposals.features[kept], overlaps)
        else:
            decay = torch.zeros(0)
        record = DecayRecord(
            settings=(config.nms_iou_threshold, config.max_before_decay),
            labels=labels.cpu().numpy(),
            survivors=survivors.cpu().numpy(),
            positive=positive.cpu().numpy(),
            kept=kept.cpu().numpy(),
            decay=decay.float().cpu().numpy(),
        )
        return record, masks

    def class_scores(self, features: torch.Tensor, bank: MemoryBank) -> torch.Tensor:
        """(P, K) semantic scores of proposal features, lowered near the bank's negatives."""
        device = features.device
        return scores_with_negatives(
            features,
            bank.prototypes.to(device),
            bank.negatives.to(device),
            bank.negative_labels.to(device),
            self.config.negative_sigma,
        )

    def compact(self, proposals: Proposals) -> Proposals:
        """Proposals on the CPU with full-resolution RLE masks instead of logits: cacheable,
        same answers."""
        if proposals.rles is not None:
            return proposals
        return Proposals(
            image_size=proposals.image_size,
            pred_iou=proposals.pred_iou.cpu(),
            boxes=proposals.boxes.cpu(),
            features=proposals.features.cpu(),
            rles=full_resolution_masks(proposals).rles(),
        )

    # -- internals --------------------------------------------------------------------------

    def _target_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """DINOv2 patch tokens (h, w, C) of the squashed target image (1, 3, S, S) in [0, 1]."""
        image = resize_bicubic(pixels, self.config.encoder_image_size)
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
