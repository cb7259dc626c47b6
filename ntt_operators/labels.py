"""The bridge between FiftyOne labels and the engine: detections in, ``fo.Detections`` out.

FiftyOne boxes are relative ``[x, y, w, h]`` and instance masks are cropped to the box; the engine
works in pixels with full-resolution masks. Every conversion between the two lives here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import fiftyone as fo
import numpy as np
from bson import ObjectId
from pycocotools import mask as mask_utils
from pymongo import UpdateOne

from ntt_core import Instances
from ntt_core.errors import ReferenceInputError
from ntt_core.explain import ATTRIBUTES


@dataclass(frozen=True)
class GroundTruthInstance:
    """One ``fo.Detection`` of a ground-truth field, located in its image."""

    sample_id: str
    filepath: str
    width: int
    height: int
    detection: fo.Detection

    @property
    def label_id(self) -> str:
        return self.detection.id

    @property
    def ref_id(self) -> str:
        """The provenance a memory bank records: enough to find the label again."""
        return f"{self.sample_id}:{self.detection.id}"

    def box_xywh(self) -> tuple[float, float, float, float]:
        box = self.detection.bounding_box
        if box is None or len(box) != 4 or box[2] <= 0 or box[3] <= 0:
            raise ReferenceInputError(
                f"Reference label {self.detection.id} ({self.detection.label!r}) of sample "
                f"{self.sample_id} has no usable bounding box ({box}): a reference needs a box, "
                "with or without a mask. Fix the label or untag it"
            )
        x, y, w, h = box
        pixels = (x * self.width, y * self.height, w * self.width, h * self.height)
        if pixels[2] < 1 or pixels[3] < 1:
            raise ReferenceInputError(
                f"Reference label {self.detection.id} ({self.detection.label!r}) of sample "
                f"{self.sample_id} is {pixels[2]:.2g} x {pixels[3]:.2g} px, less than a pixel: "
                "too small to see at the encoder's resolution. Draw a larger box or untag it"
            )
        return pixels

    def box_xyxy(self) -> tuple[float, float, float, float]:
        x, y, w, h = self.box_xywh()
        return (x, y, x + w, y + h)

    def full_mask(self) -> np.ndarray | None:
        """The instance's full-resolution bool mask, or None for a box-only annotation."""
        crop = self.detection.get_mask()
        if crop is None:
            return None
        return paste_mask(crop, self.detection.bounding_box, self.width, self.height)


def paste_mask(crop: np.ndarray, box: list[float], width: int, height: int) -> np.ndarray:
    """A box-cropped FiftyOne mask at full resolution: the inverse of ``Detection.from_mask``.

    ``Detection.to_segmentation`` resamples the crop into a box up to one pixel smaller, which
    can drop an instance's last row or column; here a crop that fits its box is pasted as is.
    """
    x, y, w, h = box
    left, top = round(x * width), round(y * height)
    right, bottom = round((x + w) * width), round((y + h) * height)
    crop = np.asarray(crop) > 0
    if crop.shape != (bottom - top, right - left) and bottom > top and right > left:
        # Nearest-neighbour resize of a crop stored at another size than its box.
        rows = np.arange(bottom - top) * crop.shape[0] // (bottom - top)
        cols = np.arange(right - left) * crop.shape[1] // (right - left)
        crop = crop[rows][:, cols]
    full = np.zeros((height, width), dtype=bool)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(bottom, height), min(right, width)
    if y1 > y0 and x1 > x0:
        full[y0:y1, x0:x1] = crop[y0 - top : y1 - top, x0 - left : x1 - left]
    return full


def ensure_metadata(collection: fo.core.collections.SampleCollection) -> None:
    """Pixel sizes are needed to convert relative boxes; compute them where missing."""
    missing = collection.exists("metadata", False)
    if len(missing):
        missing.compute_metadata()


def iter_instances(
    collection: fo.core.collections.SampleCollection, gt_field: str
) -> Iterator[GroundTruthInstance]:
    """Every detection of ``gt_field`` in ``collection``, in sample order (metadata required).

    FiftyOne's metadata holds the upright size (EXIF applied), the frame ``load_image`` reads.
    """
    for sample in collection.select_fields(gt_field).iter_samples():
        labels = sample[gt_field]
        if labels is None:
            continue
        width, height = sample.metadata.width, sample.metadata.height
        for detection in labels.detections:
            yield GroundTruthInstance(sample.id, sample.filepath, width, height, detection)


def annotations(
    collection: fo.core.collections.SampleCollection, gt_field: str
) -> tuple[list[dict], dict[str, tuple[int, int]]]:
    """COCO-style annotation dicts of ``gt_field`` for ``ntt_core.fewshot``, and image sizes.

    Ids are FiftyOne ids (label id, sample id), categories are label names and boxes are in
    pixels. Read with ``values`` so that no instance mask is loaded (metadata required).
    """
    path = f"{gt_field}.detections"
    fields = ["id", "metadata.width", "metadata.height"]
    fields += [f"{path}.{key}" for key in ("id", "label", "bounding_box", "iscrowd")]
    columns = collection.values(fields)
    anns, sizes = [], {}
    for sample_id, width, height, ids, labels, boxes, crowds in zip(*columns):
        sizes[sample_id] = (width, height)
        if ids is None:
            continue
        for label_id, label, (x, y, w, h), crowd in zip(ids, labels, boxes, crowds):
            anns.append(
                {
                    "id": label_id,
                    "image_id": sample_id,
                    "category_id": label,
                    "bbox": [x * width, y * height, w * width, h * height],
                    "iscrowd": int(bool(crowd)),
                }
            )
    return anns, sizes


def instance_to_detection(
    rle: dict,
    label: str,
    confidence: float,
    label_id: ObjectId | None = None,
    reasons: Mapping[str, Any] | None = None,
) -> fo.Detection:
    """One predicted instance; the full-resolution mask is decoded only for this instance.
    ``reasons`` (``ntt_core.explain``) become label attributes."""
    mask = mask_utils.decode(rle).astype(bool)
    detection = fo.Detection.from_mask(mask, label=label, confidence=confidence, **(reasons or {}))
    if label_id is not None:
        detection._id = label_id
    return detection


def declare_reasons(dataset: fo.Dataset, field: str) -> None:
    """Declares the reasons' attributes on ``field``'s detections, so that the App's sidebar
    filters and sorts them (undeclared attributes are stored but not shown there)."""
    schema = dataset.get_field_schema(flat=True)
    for name in ATTRIBUTES:
        path = f"{field}.detections.{name}"
        if path not in schema:
            kind = fo.StringField if name in _TEXT_REASONS else fo.FloatField
            dataset.add_sample_field(path, kind)


_TEXT_REASONS = ("runner_up", "nearest_reference")


def instances_to_detections(instances: Instances, seed: str | None = None) -> fo.Detections:
    """An engine result as FiftyOne detections: tight boxes, box-cropped masks, confidences.

    With a ``seed`` (field and sample), each detection's id is derived from it and the mask, so
    the same proposal keeps its id, and with it its tags, when a sample is scored again.
    """
    ids = prediction_ids(seed, instances.rles) if seed is not None else [None] * len(instances)
    reasons = instance_reasons(instances)
    detections = [
        instance_to_detection(rle, name, float(score), label_id, why)
        for rle, name, score, label_id, why in zip(
            instances.rles, instances.label_names, instances.scores, ids, reasons
        )
    ]
    return fo.Detections(detections=detections)


def instance_reasons(instances: Instances) -> list[dict[str, Any]]:
    """Each instance's label attributes saying why it was predicted (none where not computed)."""
    if instances.explanation is None:
        return [{}] * len(instances)
    return instances.explanation.rows()


def prediction_ids(seed: str, rles: list[dict]) -> list[ObjectId]:
    """Stable label ids: a hash of the seed and each mask's RLE (twins get their rank too)."""
    texts = [f"{seed}:{rle['size']}:".encode() + _counts_bytes(rle) for rle in rles]
    return [ObjectId(digest) for digest in _id_digests(texts)]


def prediction_id_strings(seed: str, size: list[int], counts: list[bytes]) -> list[str]:
    """``prediction_ids`` as strings, of one image's masks given as their RLE counts: what
    names thousands of cached proposals at once (``api.explain``), without a dict per mask."""
    prefix = f"{seed}:{size}:".encode()
    return [digest.hex() for digest in _id_digests([prefix + c for c in counts])]


def _id_digests(texts: list[bytes]) -> list[bytes]:
    """The 12 first bytes of each text's SHA-256 (an ObjectId's size); a text seen before gets
    '+' appended until it is new, so identical masks get distinct ids, by rank."""
    digests, seen = [], set()
    for text in texts:
        while text in seen:
            text += b"+"
        seen.add(text)
        digests.append(hashlib.sha256(text).digest()[:12])
    return digests


def _counts_bytes(rle: dict) -> bytes:
    counts = rle["counts"]
    return counts if isinstance(counts, bytes) else counts.encode()


@dataclass
class ScoreEdit:
    """A re-scored sample whose predictions keep their masks: by label id, the labels and the
    confidences that changed and the reasons to write, and the ids of the predictions gone."""

    labels: dict[str, str]
    confidences: dict[str, float]
    removed: list[str]
    reasons: dict[str, dict[str, Any]] = field(default_factory=dict)
    """By label id, the reasons' attributes (``ntt_core.explain``) to write."""

    def changes(self) -> dict[str, dict[str, Any]]:
        """By label id, every attribute to set: label, confidence and reasons."""
        changes: dict[str, dict[str, Any]] = {}
        for label_id, reasons in self.reasons.items():
            changes.setdefault(label_id, {}).update(reasons)
        for label_id, label in self.labels.items():
            changes.setdefault(label_id, {})["label"] = label
        for label_id, confidence in self.confidences.items():
            changes.setdefault(label_id, {})["confidence"] = confidence
        return changes


class FieldWriter:
    """Buffers per-sample values of one field and writes them with one ``set_values`` per batch;
    ``ScoreEdit``s update only the changed labels, confidences and reasons, masks untouched.

    Saving sample by sample costs a database round trip each; a batch costs one. Rewriting a
    sample re-encodes all its masks, which is most of a re-score's time when only scores moved.
    """

    def __init__(self, dataset: fo.Dataset, field: str, batch_size: int) -> None:
        self.dataset = dataset
        self.field = field
        self.batch_size = batch_size
        self._pending: dict[str, fo.Label | None] = {}
        self._edits: dict[str, ScoreEdit] = {}
        self.written = 0
        self.edited = 0
        """Of ``written``, the samples updated by a ``ScoreEdit``."""

    def add(self, sample_id: str, value: fo.Label | ScoreEdit | None) -> None:
        if isinstance(value, ScoreEdit):
            self._edits[sample_id] = value
        else:
            self._pending[sample_id] = value
        # Edits are a few numbers each: many fit in one batch.
        if len(self._pending) >= self.batch_size or len(self._edits) >= 16 * self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            self.dataset.set_values(self.field, self._pending, key_field="id")
            self.written += len(self._pending)
            self._pending = {}
        if self._edits:
            self._apply_edits()
            self.written += len(self._edits)
            self.edited += len(self._edits)
            self._edits = {}

    def _apply_edits(self) -> None:
        """One update per edited prediction, setting its label, confidence and reasons at once:
        ``set_label_values`` would make one pass over the predictions per attribute."""
        path = f"{self.field}.detections.$[label]"
        now = datetime.now(timezone.utc).replace(tzinfo=None)  # as FiftyOne stores it
        updates, sample_ids = [], []
        for sample_id, edit in self._edits.items():
            for label_id, values in edit.changes().items():
                changes = {f"{path}.{name}": value for name, value in values.items()}
                updates.append(
                    UpdateOne(
                        {"_id": ObjectId(sample_id)},
                        {"$set": {**changes, "last_modified_at": now}},
                        array_filters=[{"label._id": ObjectId(label_id)}],
                    )
                )
                sample_ids.append(sample_id)
        if updates:
            self.dataset._bulk_write(updates, ids=sample_ids)
        removed = [label_id for edit in self._edits.values() for label_id in edit.removed]
        if removed:
            self.dataset.delete_labels(ids=removed, fields=self.field)
