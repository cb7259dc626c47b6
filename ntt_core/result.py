"""The per-image result: instances with boxes, scores, classes and RLE masks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from pycocotools import mask as mask_utils

from .coco import paper_boxes_xywh, results_from_detections
from .decay_record import DecayRecord
from .explain import Explanation


@dataclass
class Instances:
    """Predicted instances of one image, best first."""

    image_size: tuple[int, int]
    """(H, W) of the image the masks cover."""
    boxes: np.ndarray
    """(N, 4) float32 xyxy in pixels: the tight box that contains the mask (x2, y2 one past the
    last foreground column and row), as a FiftyOne ``Detection`` needs it, whose mask is cropped
    to its box. ``to_coco`` uses the paper's convention instead (see ``paper_boxes_xywh``)."""
    scores: np.ndarray
    """(N,) float32 confidences in [0, 1]."""
    labels: np.ndarray
    """(N,) int64 index into ``class_names``."""
    class_names: list[str]
    rles: list[dict]
    """COCO RLE of each full-resolution mask (``counts`` as str, JSON-ready)."""
    explanation: Explanation | None = None
    """Why each instance was predicted (``ntt_core.explain``); None where not computed."""
    decay_record: DecayRecord | None = field(default=None, compare=False, repr=False)
    """What the scoring decided from the masks, which a re-score may reuse
    (``NTTPredictor.score``); None where not scored here."""

    def __len__(self) -> int:
        return len(self.rles)

    @classmethod
    def empty(
        cls,
        image_size: tuple[int, int],
        class_names: list[str],
        decay_record: DecayRecord | None = None,
    ) -> Instances:
        return cls(
            image_size=image_size,
            boxes=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros(0, dtype=np.float32),
            labels=np.zeros(0, dtype=np.int64),
            class_names=list(class_names),
            rles=[],
            decay_record=decay_record,
        )

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels.tolist()]

    def masks(self) -> np.ndarray:
        """(N, H, W) bool full-resolution masks."""
        if not self.rles:
            return np.zeros((0, *self.image_size), dtype=bool)
        return mask_utils.decode(self.rles).transpose(2, 0, 1).astype(bool)

    def to_coco(self, image_id: int, category_ids: Mapping[str, int]) -> list[dict]:
        """COCO results entries for pycocotools' COCOeval: RLE segmentation and the paper's
        xywh box (width = last foreground column - first, as its bbox AP was computed)."""
        boxes_xywh = paper_boxes_xywh(self.rles)
        categories = [category_ids[name] for name in self.label_names]
        return results_from_detections(image_id, boxes_xywh, self.scores, categories, self.rles)
