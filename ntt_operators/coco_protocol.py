"""The paper's COCO few-shot benchmark, run through FiftyOne and the plugin's own API.

References are sampled on the raw train2017 annotation file (the exact picks of the paper's tool
for a seed), only their images are imported, their ground-truth instances are tagged, and the
bank is built from those tags. val2017 is segmented and scored twice: by pycocotools' COCOeval on
the original annotation file (the paper's numbers) and by FiftyOne's own COCO-style evaluation.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F
from pycocotools.coco import COCO

from ntt_core.coco import (
    encode_mask,
    evaluate_coco,
    load_ground_truth,
    paper_boxes_xywh,
    results_from_detections,
)
from ntt_core.config import NTTConfig
from ntt_core.errors import NTTError, ReferenceInputError
from ntt_core.fewshot import ReferenceChoice, class_ids_by_name, sample_references
from ntt_core.registry import resolve_checkpoint
from ntt_operators import api
from ntt_operators.api.common import Progress
from ntt_operators.coco_download import (
    COCO_URL,
    annotation_path,
    ensure_annotations,
    ensure_images,
    image_dir,
)
from ntt_operators.labels import paste_mask

GT_FIELD = "ground_truth"
COCO_ID_FIELD = "coco_id"  # sample field: COCO image id; on each ground-truth label: annotation id
TRAIN_TAG, VAL_TAG = "train2017", "val2017"
_INFO_KEY = "ntt_coco"

Log = Callable[[str], None]


@dataclass(frozen=True)
class ReproduceSettings:
    """One benchmark run: the data, the protocol (split, shots, seed) and the method's config."""

    coco_root: Path
    shots: int
    seed: int
    classes: list[str]
    """The split's class names (the evaluation is restricted to them)."""
    split: str
    config: NTTConfig = field(default_factory=NTTConfig)
    max_samples: int | None = None
    dataset_name: str | None = None
    download: bool = True
    base_url: str = COCO_URL
    resume: bool = False
    batch_size: int = 16
    backend: str = "local"
    """``api.segment``'s execution backend: ``local`` or ``ray`` (with the three below)."""
    ray_address: str | None = None
    num_actors: int = 2
    gpus_per_actor: float | None = None

    @property
    def run_name(self) -> str:
        return f"{self.split}_{self.shots}shot_seed{self.seed}"

    @property
    def dataset(self) -> str:
        if self.dataset_name:
            return self.dataset_name
        return "ntt-coco2017" + (f"-val{self.max_samples}" if self.max_samples else "")


@dataclass
class ReproduceReport:
    stats: dict[str, dict[str, float]]
    """pycocotools' 12 numbers per IoU type ("bbox", "segm")."""
    fiftyone_map: float
    references: dict[str, list[ReferenceChoice]]
    """The sampled references per class name, in the paper's format."""
    dataset: str
    ref_tag: str
    bank: str
    label_field: str
    eval_key: str
    num_images: int
    num_predictions: int
    segmentation: dict[str, Any] = field(default_factory=dict)
    """``api.segment``'s summary (processed, skipped, failed: {sample id: message}, ...)."""
    segmentation_seconds: float = 0.0


@dataclass
class CocoData:
    """What a run needs from the COCO files: the sampled references and the images to import."""

    root: Path
    references: dict[str, list[ReferenceChoice]]
    train: dict
    """train2017 restricted to the reference images (the full file is large)."""
    val: dict
    val_images: list[dict]
    """The val2017 images to segment and score (the first ``max_samples``, or all)."""


def reproduce(
    settings: ReproduceSettings, log: Log = print, progress: Progress | None = None
) -> ReproduceReport:
    """Samples, imports, tags, builds the bank, segments val2017 and evaluates it.

    ``log`` receives the run's story line by line; ``progress`` the bank's and the
    segmentation's ``(fraction, label)`` steps.
    """
    _check_checkpoints(settings.config)
    names = _names(settings)
    data = prepare_coco(settings, log)
    dataset = open_dataset(settings.dataset, data.root, data.val, data.val_images, log)
    add_images(dataset, data.root, TRAIN_TAG, data.train, data.train["images"], log)
    tag_references(dataset, data.references, names["ref_tag"])
    log(f"Tagged {settings.shots} references x {len(data.references)} classes")
    _build_bank(dataset, settings, names, data.train, log, progress)
    val_view = dataset.match_tags(VAL_TAG)
    started = time.monotonic()
    segmentation = _segment(val_view, settings, names, log, progress)
    seconds = time.monotonic() - started
    report = _evaluate(dataset, val_view, settings, data, names)
    report.segmentation, report.segmentation_seconds = segmentation, seconds
    return report


def prepare_coco(settings: ReproduceSettings, log: Log) -> CocoData:
    """Samples the references on the raw train file; fetches the files the run needs."""
    root = Path(settings.coco_root).expanduser()
    fetch = {"download": settings.download, "base_url": settings.base_url}
    ensure_annotations(root, **fetch)
    train = _load_json(annotation_path(root, TRAIN_TAG), log)
    references = sample_coco_references(train, settings.classes, settings.shots, settings.seed)
    image_ids = {r["img_id"] for refs in references.values() for r in refs}
    train = _subset(train, [image for image in train["images"] if image["id"] in image_ids])
    ensure_images(root, TRAIN_TAG, [i["file_name"] for i in train["images"]], **fetch)
    val = _load_json(annotation_path(root, VAL_TAG), log)
    val_images = val["images"][: settings.max_samples]
    ensure_images(root, VAL_TAG, [i["file_name"] for i in val_images], **fetch)
    return CocoData(root, references, train, val, val_images)


def _names(settings: ReproduceSettings) -> dict[str, str]:
    run = settings.run_name
    return {
        "ref_tag": f"ref_{run}",
        "bank": f"coco_{run}",
        "label_field": f"ntt_{run}",
        "eval_key": f"eval_{run}",
    }


def _check_checkpoints(config: NTTConfig) -> None:
    # Fail (or download) before the long data preparation, not an hour into it.
    if config.weights == "official":
        resolve_checkpoint(config.sam_model)
        resolve_checkpoint(config.encoder_model)


def _load_json(path: Path, log: Log) -> dict:
    log(f"Reading {path}")
    with open(path) as f:
        return json.load(f)


# -- sampling ---------------------------------------------------------------------------------


def sample_coco_references(
    coco: Mapping, classes: list[str], shots: int, seed: int
) -> dict[str, list[ReferenceChoice]]:
    """The paper's picks for ``classes`` on a COCO annotation dict, keyed by class name."""
    ids = class_ids_by_name(coco["categories"], classes)
    name_of = {c["id"]: c["name"] for c in coco["categories"]}
    picks = sample_references(
        coco["annotations"], coco["images"], ids, shots, seed, category_names=name_of
    )
    return {name_of[category]: refs for category, refs in picks.items()}


# -- the FiftyOne dataset ---------------------------------------------------------------------


def open_dataset(
    name: str, root: Path, val: Mapping, val_images: list[dict], log: Log
) -> fo.Dataset:
    """The persistent dataset holding ``val_images``: reused when it holds exactly these."""
    expected = {"root": str(root.resolve()), "val_images": [i["id"] for i in val_images]}
    if fo.dataset_exists(name):
        dataset = fo.load_dataset(name)
        if dataset.info.get(_INFO_KEY) != expected:
            raise NTTError(
                f"FiftyOne dataset {name!r} exists but holds other COCO data (another root or "
                "other val images); pass --dataset-name NAME, or delete it with "
                f"`fiftyone datasets delete {name}`"
            )
        log(f"Reusing FiftyOne dataset {name!r}")
        return dataset
    dataset = fo.Dataset(name, persistent=True)
    add_images(dataset, root, VAL_TAG, val, val_images, log)
    # Recorded last: a dataset whose import was interrupted is never mistaken for a complete one.
    dataset.info[_INFO_KEY] = expected
    dataset.save()
    return dataset


def add_images(
    dataset: fo.Dataset, root: Path, split: str, coco: Mapping, images: list[dict], log: Log
) -> None:
    """Imports the ``images`` of a COCO split not yet in ``dataset``, with instance masks."""
    present = set()
    if dataset.has_sample_field(COCO_ID_FIELD):
        present = set(dataset.match_tags(split).values(COCO_ID_FIELD))
    missing = [image for image in images if image["id"] not in present]
    if not missing:
        return
    log(f"Importing {len(missing)} {split} images into {dataset.name!r}")
    with tempfile.TemporaryDirectory() as tmp:
        labels_path = Path(tmp) / f"instances_{split}.json"
        labels_path.write_text(json.dumps(_subset(coco, missing)))
        dataset.add_dir(
            dataset_type=fo.types.COCODetectionDataset,
            data_path=str(image_dir(root, split)),
            labels_path=str(labels_path),
            label_types="segmentations",
            # A dict names both fields; a plain name would be prefixed ("gt_segmentations").
            label_field={"segmentations": GT_FIELD, "coco_id": COCO_ID_FIELD},
            include_id=True,
            include_annotation_id=True,
            tags=[split],
        )


def _subset(coco: Mapping, images: list[dict]) -> dict:
    """A COCO annotation dict with only ``images`` and their annotations."""
    ids = {image["id"] for image in images}
    annotations = [a for a in coco["annotations"] if a["image_id"] in ids]
    return {"images": images, "annotations": annotations, "categories": coco["categories"]}


def tag_references(
    dataset: fo.Dataset, references: Mapping[str, list[ReferenceChoice]], tag: str
) -> None:
    """Tags exactly the sampled ground-truth instances (and their samples) with ``tag``."""
    ann_ids = {a for refs in references.values() for r in refs for a in r["ann_ids"]}
    view = dataset.match_tags(TRAIN_TAG).filter_labels(GT_FIELD, F(COCO_ID_FIELD).is_in(ann_ids))
    found = set(view.values(f"{GT_FIELD}.detections.{COCO_ID_FIELD}", unwind=True))
    if found != ann_ids:
        raise ReferenceInputError(
            f"{len(ann_ids - found)} sampled annotations (e.g. id {min(ann_ids - found)}) are "
            f"not in dataset {dataset.name!r}; delete it and run again"
        )
    # A tag left by an earlier, different run must not add references to this one.
    dataset.untag_labels(tag, label_fields=[GT_FIELD])
    dataset.untag_samples(tag)
    view.tag_labels(tag, label_fields=[GT_FIELD])
    view.tag_samples(tag)


def reference_masks(dataset: fo.Dataset, tag: str, train: Mapping) -> dict[str, np.ndarray]:
    """pycocotools' ``annToMask`` of each reference tagged ``tag``, by FiftyOne label id.

    The paper's references are these masks; FiftyOne's imported ones are cropped to the rounded
    box and lose the rare pixel outside it.
    """
    view = dataset.match_tags(TRAIN_TAG).select_labels(tags=tag, fields=GT_FIELD)
    paths = [f"{GT_FIELD}.detections.id", f"{GT_FIELD}.detections.{COCO_ID_FIELD}"]
    label_ids, ann_ids = view.values(paths, unwind=True)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints on createIndex
        coco = COCO()
        coco.dataset = dict(train)
        coco.createIndex()
    return {
        label_id: coco.annToMask(coco.anns[ann_id]).astype(bool)
        for label_id, ann_id in zip(label_ids, ann_ids)
    }


def _build_bank(
    dataset: fo.Dataset,
    settings: ReproduceSettings,
    names: dict,
    train: Mapping,
    log: Log,
    progress: Progress | None = None,
) -> None:
    if settings.resume and names["bank"] in api.list_memory_banks(dataset):
        log(f"Reusing memory bank {names['bank']!r} (--resume)")
        return
    log(f"Building memory bank {names['bank']!r}")
    api.build_memory_bank(
        dataset,
        GT_FIELD,
        names["bank"],
        ref_tag=names["ref_tag"],
        tag_type="label",
        classes=settings.classes,
        config=settings.config,
        overwrite=True,
        progress=progress,
        full_masks=reference_masks(dataset, names["ref_tag"], train),
    )


def _segment(
    view: fo.DatasetView,
    settings: ReproduceSettings,
    names: dict,
    log: Log,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``api.segment``'s summary; a failed image scores as empty (it is a missed image)."""
    log(f"Segmenting {len(view)} val2017 images into {names['label_field']!r}")
    return api.segment(
        view,
        names["bank"],
        names["label_field"],
        exclude_tag=names["ref_tag"],
        overwrite=not settings.resume,
        skip_done=settings.resume,
        config=settings.config,
        batch_size=settings.batch_size,
        backend=settings.backend,
        ray_address=settings.ray_address,
        num_actors=settings.num_actors,
        gpus_per_actor=settings.gpus_per_actor,
        progress=progress,
    )


# -- evaluation -------------------------------------------------------------------------------


def _evaluate(
    dataset: fo.Dataset,
    view: fo.DatasetView,
    settings: ReproduceSettings,
    data: CocoData,
    names: dict,
) -> ReproduceReport:
    """pycocotools on the original annotations (the paper's numbers), then FiftyOne's mAP."""
    results = coco_results(view, names["label_field"], data.val, settings.classes)
    gt = _ground_truth(data, settings.max_samples)
    category_ids = class_ids_by_name(data.val["categories"], settings.classes)
    stats = evaluate_coco(gt, results, category_ids)
    fo_results = api.evaluate(
        view, names["label_field"], GT_FIELD, names["eval_key"], classes=settings.classes
    )
    return ReproduceReport(
        stats=stats,
        fiftyone_map=float(fo_results.mAP(classes=_present(fo_results, settings.classes))),
        references=data.references,
        dataset=dataset.name,
        num_images=len(view),
        num_predictions=len(results),
        **names,
    )


def coco_results(
    view: fo.DatasetView, label_field: str, coco: Mapping, classes: list[str]
) -> list[dict]:
    """COCO result dicts (xywh px boxes, full-size RLE masks) of the predictions in ``view``."""
    image_of = {image["id"]: image for image in coco["images"]}
    category_of = dict(zip(classes, class_ids_by_name(coco["categories"], classes)))
    results = []
    for sample in view.select_fields([label_field, COCO_ID_FIELD]).iter_samples():
        predictions = sample[label_field]
        if predictions is not None:
            image = image_of[sample[COCO_ID_FIELD]]
            results += _image_results(image, predictions.detections, category_of)
    return results


def _image_results(image: Mapping, detections: list, category_of: Mapping) -> list[dict]:
    """One image's results; boxes are the masks' boxes in the paper's convention (its bbox AP
    was computed so), not the FiftyOne boxes, which contain the mask (one pixel wider)."""
    width, height = image["width"], image["height"]
    # Not det.to_segmentation(): it resamples the crop and can drop a row or column.
    rles = [
        encode_mask(paste_mask(det.get_mask(), det.bounding_box, width, height))
        for det in detections
    ]
    scores = [det.confidence for det in detections]
    category_ids = [category_of[det.label] for det in detections]
    boxes = paper_boxes_xywh(rles)
    return results_from_detections(image["id"], boxes, scores, category_ids, rles)


def _ground_truth(data: CocoData, max_samples: int | None) -> COCO:
    if max_samples is None:
        return load_ground_truth(annotation_path(data.root, VAL_TAG))
    # A quick look scores its first N images only, not the whole of val2017.
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints on createIndex
        gt = COCO()
        gt.dataset = _subset(data.val, data.val_images)
        gt.createIndex()
    return gt


def _present(results, classes: list[str]) -> list[str]:
    # FiftyOne's mAP refuses classes it never saw; the split's other classes have no GT here.
    return [c for c in classes if c in results.classes]
