"""COCO evaluation plumbing: RLE results, COCOeval restricted to a class split, the paper's layout.

The paper scores with pycocotools' COCOeval ("bbox" and "segm", 100 detections per image) on every
val image, with only the split's categories evaluated.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats, in order: (name, is precision, IoU threshold or None for .50:.95, area, maxDets).
STATS = (
    ("AP", True, None, "all", 100),
    ("AP50", True, 0.5, "all", 100),
    ("AP75", True, 0.75, "all", 100),
    ("APs", True, None, "small", 100),
    ("APm", True, None, "medium", 100),
    ("APl", True, None, "large", 100),
    ("AR1", False, None, "all", 1),
    ("AR10", False, None, "all", 10),
    ("AR100", False, None, "all", 100),
    ("ARs", False, None, "small", 100),
    ("ARm", False, None, "medium", 100),
    ("ARl", False, None, "large", 100),
)
STAT_NAMES = tuple(s[0] for s in STATS)


def encode_mask(mask: np.ndarray) -> dict:
    """A boolean HxW mask as a JSON-ready compressed RLE (``counts`` as str)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return json_ready_rle(rle)


def json_ready_rle(rle: Mapping) -> dict:
    """An RLE with str counts (pycocotools gives bytes), ready for JSON and BSON."""
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": list(rle["size"]), "counts": counts}


def paper_boxes_xywh(rles: Sequence[Mapping]) -> np.ndarray:
    """COCO (x, y, w, h) boxes of RLE masks in the paper's convention: (N, 4) float64.

    The paper's box ends on the last foreground column and row (torchvision's
    ``masks_to_boxes``) and its width is ``x2 - x1``: one pixel less than pycocotools' ``toBbox``
    of the same mask. Its bbox AP was computed on these boxes.
    """
    if not rles:
        return np.zeros((0, 4))
    boxes = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"]} for r in rles])
    boxes[:, 2:] = np.maximum(boxes[:, 2:] - 1, 0)
    return boxes


def results_from_detections(
    image_id: int,
    boxes_xywh: Iterable[Sequence[float]],
    scores: Iterable[float],
    category_ids: Iterable[int],
    rles: Iterable[Mapping] | None = None,
) -> list[dict]:
    """COCO result dicts for one image's detections; ``rles`` adds segmentations for "segm"."""
    results = [
        {
            "image_id": image_id,
            "category_id": int(c),
            "bbox": [float(v) for v in b],
            "score": float(s),
        }
        for b, s, c in zip(boxes_xywh, scores, category_ids, strict=True)
    ]
    if rles is not None:
        rles = list(rles)
        if len(rles) != len(results):
            raise ValueError(f"{len(rles)} masks for {len(results)} detections")
        for result, rle in zip(results, rles, strict=True):
            result["segmentation"] = json_ready_rle(rle)
    return results


def _quietly(fn, *args):
    # pycocotools prints progress on every call; keep the caller's output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def load_ground_truth(gt: str | Path | COCO) -> COCO:
    """A COCO ground-truth object from an annotation json path (or the object itself)."""
    return gt if isinstance(gt, COCO) else _quietly(COCO, str(gt))


def _detections(gt: COCO, results: list[dict], iou_type: str) -> COCO:
    """The results as a COCO object, keeping only what ``iou_type`` should see.

    Like detectron2, segm results drop their box so a detection's area (used for the small /
    medium / large ranges) is its mask area, and bbox results drop their mask.
    """
    need, drop = ("segmentation", "bbox") if iou_type == "segm" else ("bbox", "segmentation")
    if any(need not in r for r in results):
        raise ValueError(f"{iou_type!r} evaluation needs a {need!r} in every result")
    anns = [{k: v for k, v in copy.deepcopy(r).items() if k != drop} for r in results]
    if anns:
        return _quietly(gt.loadRes, anns)
    # loadRes cannot take an empty list; no detections at all simply scores zero.
    empty = COCO()
    empty.dataset = {
        "images": gt.dataset["images"],
        "categories": gt.dataset["categories"],
        "annotations": [],
    }
    _quietly(empty.createIndex)
    return empty


def _check_image_ids(gt: COCO, results: list[dict]) -> None:
    unknown = {r["image_id"] for r in results} - set(gt.getImgIds())
    if unknown:
        raise ValueError(
            f"results refer to {len(unknown)} images not in the ground truth "
            f"(e.g. {next(iter(unknown))!r}); evaluate against the annotation file they came from"
        )


def evaluate_coco(
    gt: str | Path | COCO,
    results: list[dict],
    category_ids: Iterable[int] | None = None,
    iou_types: Sequence[str] = ("bbox", "segm"),
) -> dict[str, dict[str, float]]:
    """COCOeval over every ground-truth image, restricted to ``category_ids`` (the split).

    Returns, per IoU type, the 12 COCO summary numbers by name (``STAT_NAMES``); -1 marks a
    number with no ground truth to measure, as in pycocotools. A ``COCO`` object passed as ``gt``
    gets its polygons turned into RLE, as COCOeval always does.
    """
    gt = load_ground_truth(gt)
    _check_image_ids(gt, results)
    stats = {}
    for iou_type in iou_types:
        evaluator = COCOeval(gt, _detections(gt, results, iou_type), iou_type)
        if category_ids is not None:
            evaluator.params.catIds = sorted(category_ids)
        for step in (evaluator.evaluate, evaluator.accumulate, evaluator.summarize):
            _quietly(step)
        stats[iou_type] = dict(zip(STAT_NAMES, map(float, evaluator.stats), strict=True))
    return stats


def _summary_line(is_precision: bool, iou: float | None, area: str, max_dets: int, value: float):
    # The exact line format of COCOeval.summarize().
    title, kind = ("Average Precision", "(AP)") if is_precision else ("Average Recall", "(AR)")
    iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}"
    return (
        f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] "
        f"= {value:0.3f}"
    )


def format_paper_table(stats: Mapping[str, Mapping[str, float]]) -> str:
    """The evaluation as the paper's README prints it: ``BBOX RESULTS:``, ``SEGM RESULTS:``, each
    followed by COCOeval's 12 summary lines."""
    blocks = []
    for iou_type, values in stats.items():
        lines = [f"{iou_type.upper()} RESULTS:"]
        lines += [_summary_line(*spec[1:], values[spec[0]]) for spec in STATS]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
