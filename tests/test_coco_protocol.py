"""The COCO protocol: generated data, RLE results, COCOeval per split, FiftyOne's agreement."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from ntt_core.coco import (
    STAT_NAMES,
    encode_mask,
    evaluate_coco,
    format_paper_table,
    load_ground_truth,
    results_from_detections,
)
from ntt_core.synthetic import make_scene, write_coco_dataset

CLASSES = ["disc", "square", "triangle", "ring"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowded")
    return write_coco_dataset(root, 24, CLASSES, seed=7, crowd_fraction=0.2)


@pytest.fixture(scope="module")
def crowd_free(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowd_free")
    return write_coco_dataset(root, 16, CLASSES[:3], seed=11)


def gt_masks(gt: COCO):
    for a in gt.dataset["annotations"]:
        yield a, gt.annToMask(a).astype(bool)


def results_for(anns_masks_scores):
    """COCO results for (annotation-like, mask, score) triples; boxes are tight around masks."""
    results = []
    for a, mask, score in anns_masks_scores:
        rle = encode_mask(mask)
        box = mask_utils.toBbox(rle).tolist()
        results += results_from_detections(a["image_id"], [box], [score], [a["category_id"]], [rle])
    return results


def in_memory_gt(images, annotations, category_ids):
    gt = COCO()
    gt.dataset = {
        "images": [{"id": i, "width": w, "height": h} for i, (w, h) in images.items()],
        "annotations": [
            {"id": n, "area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, **a}
            for n, a in enumerate(annotations, 1)
        ],
        "categories": [{"id": c, "name": f"c{c}"} for c in category_ids],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def box_mask(box, size=(100, 200)):
    x, y, w, h = box
    mask = np.zeros(size, bool)
    mask[y : y + h, x : x + w] = True
    return mask


def test_generated_dataset_is_real_coco(crowded):
    data = json.loads(crowded.read_text())
    category_ids = [c["id"] for c in data["categories"]]
    assert category_ids != list(range(1, len(CLASSES) + 1))
    segs = [a["segmentation"] for a in data["annotations"]]
    assert any(isinstance(s, list) for s in segs)
    assert any(isinstance(s, dict) and isinstance(s["counts"], str) for s in segs)
    crowds = [a for a in data["annotations"] if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    gt = load_ground_truth(crowded)
    for a, mask in gt_masks(gt):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert a["area"] == mask.sum() > 0
        assert a["bbox"] == mask_utils.toBbox(rle).tolist()
        assert (crowded.parent.parent / "val2017" / gt.imgs[a["image_id"]]["file_name"]).exists()


def test_scene_masks_match_polygons_and_visibility():
    rng = np.random.default_rng(0)
    for _ in range(10):
        image, instances = make_scene(rng, 120, 160, CLASSES, max_instances=6)
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8
        union = np.zeros((120, 160), int)
        for inst in instances:
            union += inst.mask
            if inst.polygons is not None:
                drawn = mask_utils.decode(
                    mask_utils.merge(mask_utils.frPyObjects(inst.polygons, 120, 160))
                )
                assert (drawn.astype(bool) == inst.mask).all()
        assert union.max() <= 1  # visible masks never overlap


def test_results_round_trip_through_pycocotools(crowded):
    gt = load_ground_truth(crowded)
    triples = [(a, m, 0.5 + 0.01 * (a["id"] % 40)) for a, m in gt_masks(gt)]
    results = json.loads(json.dumps(results_for(triples)))
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
    for (a, mask, score), d in zip(triples, dt.dataset["annotations"], strict=True):
        assert (d["image_id"], d["category_id"], d["score"]) == (
            a["image_id"],
            a["category_id"],
            score,
        )
        assert (mask_utils.decode(d["segmentation"]).astype(bool) == mask).all()
        assert d["bbox"] == a["bbox"]


@pytest.mark.parametrize("dataset", ["crowded", "crowd_free"])
def test_perfect_predictions_score_one(dataset, request):
    path = request.getfixturevalue(dataset)
    gt = load_ground_truth(path)
    triples = [(a, m, 1.0) for a, m in gt_masks(gt) if not a["iscrowd"]]
    stats = evaluate_coco(path, results_for(triples))
    for iou_type in ("bbox", "segm"):
        assert set(stats[iou_type]) == set(STAT_NAMES)
        # AR1 is capped when an image holds two instances of a class, so it is left out.
        measured = [v for k, v in stats[iou_type].items() if v != -1 and k != "AR1"]
        assert len(measured) >= 6 and all(v == pytest.approx(1.0) for v in measured)


def test_no_predictions_score_zero(crowd_free):
    stats = evaluate_coco(crowd_free, [])
    assert stats["bbox"]["AP"] == stats["segm"]["AP"] == stats["segm"]["AR100"] == 0.0


def test_iou_just_above_half_counts_at_one_threshold_of_ten():
    # GT 40x40, prediction 40x77 over it: IoU = 40/77 = 0.519, a match at 0.50 only.
    box = [10, 10, 40, 40]
    truth = {
        "image_id": 1,
        "category_id": 5,
        "bbox": box,
        "segmentation": encode_mask(box_mask(box)),
    }
    gt = in_memory_gt({1: (200, 100)}, [truth], [5])
    pred = box_mask([10, 10, 40, 77], size=(100, 200))
    results = results_for([({"image_id": 1, "category_id": 5}, pred, 0.9)])
    stats = evaluate_coco(gt, results)
    for iou_type in ("bbox", "segm"):
        assert stats[iou_type]["AP"] == pytest.approx(0.1)
        assert stats[iou_type]["AP50"] == pytest.approx(1.0)
        assert stats[iou_type]["AP75"] == 0.0


def test_false_positive_ranked_between_true_positives():
    # Ranked TP, FP, TP over 2 GT: recall [.5, .5, 1], interpolated precision [1, 2/3, 2/3];
    # 51 recall thresholds 0..0.50 read 1, the other 50 read 2/3.
    boxes = [[10, 10, 40, 40], [100, 40, 50, 50]]
    gt = in_memory_gt(
        {1: (200, 100)}, [{"image_id": 1, "category_id": 3, "bbox": b} for b in boxes], [3]
    )
    preds = [(boxes[0], 0.9), ([60, 5, 30, 30], 0.8), (boxes[1], 0.7)]
    results = [r for b, s in preds for r in results_from_detections(1, [b], [s], [3])]
    stats = evaluate_coco(gt, results, iou_types=("bbox",))
    assert stats["bbox"]["AP"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_split_restriction_keeps_every_image():
    # Image 2 has no object of the split's class 3, so a class-3 detection there is a false
    # positive; the class-9 detection is outside the split and ignored.
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 40, 40]},
        {"image_id": 2, "category_id": 9, "bbox": [10, 10, 40, 40]},
    ]
    gt = in_memory_gt({1: (200, 100), 2: (200, 100)}, anns, [3, 9])
    results = results_from_detections(2, [[10, 10, 40, 40]] * 2, [0.95, 0.9], [3, 9])
    results += results_from_detections(1, [[10, 10, 40, 40]], [0.8], [3])
    split = evaluate_coco(gt, results, category_ids=[3], iou_types=("bbox",))
    assert split["bbox"]["AP"] == pytest.approx(0.5)
    both = evaluate_coco(gt, results, iou_types=("bbox",))
    assert both["bbox"]["AP"] == pytest.approx((0.5 + 1.0) / 2)


def test_bad_results_are_refused(crowd_free):
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_coco(crowd_free, results_from_detections(99999, [[0, 0, 5, 5]], [1.0], [1]))
    with pytest.raises(ValueError, match="segmentation"):
        evaluate_coco(crowd_free, results_from_detections(1, [[0, 0, 5, 5]], [1.0], [1]))
    with pytest.raises(ValueError, match="masks for"):
        results_from_detections(1, [[0, 0, 5, 5]], [1.0], [1], rles=[])


def jittered_predictions(gt: COCO, seed: int):
    """Shifted, dropped, duplicated and invented masks with random scores: a realistic mess."""
    rng = np.random.default_rng(seed)
    category_ids = gt.getCatIds()
    triples = []
    for a, mask in gt_masks(gt):
        if rng.random() < 0.15:
            continue
        for _ in range(1 + (rng.random() < 0.2)):
            shifted = np.roll(mask, tuple(rng.integers(-4, 5, size=2)), axis=(0, 1))
            triples.append((a, shifted, float(rng.random())))
    for image_id, image in gt.imgs.items():
        _, invented = make_scene(rng, image["height"], image["width"], CLASSES, max_instances=2)
        for inst in invented:
            fake = {"image_id": image_id, "category_id": int(rng.choice(category_ids))}
            triples.append((fake, inst.mask, float(rng.random())))
    return results_for(triples)


def test_fiftyone_map_agrees_with_cocoeval_without_crowds(crowd_free):
    import fiftyone as fo
    import fiftyone.utils.coco as fouc

    gt = load_ground_truth(crowd_free)
    results = jittered_predictions(gt, seed=0)
    segm_ap = evaluate_coco(crowd_free, results, iou_types=("segm",))["segm"]["AP"]
    assert 0.2 < segm_ap < 0.9  # a number that tells right from wrong

    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(crowd_free.parent.parent / "val2017"),
        labels_path=str(crowd_free),
        label_types="segmentations",
        label_field="gt",
        include_id=True,
    )
    try:
        categories = gt.dataset["categories"]
        fouc.add_coco_labels(
            dataset,
            "pred",
            results,
            categories,
            label_type="segmentations",
            coco_id_field="gt_coco_id",
        )
        evaluation = dataset.evaluate_detections(
            "pred", gt_field="gt_segmentations", use_masks=True, compute_mAP=True
        )
        assert evaluation.mAP() == pytest.approx(segm_ap, abs=1e-3)
    finally:
        dataset.delete()


def test_paper_table_matches_pycocotools_summary(crowded):
    gt = load_ground_truth(crowded)
    results = jittered_predictions(gt, seed=1)
    stats = evaluate_coco(crowded, results)
    table = format_paper_table(stats)
    blocks = table.split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["BBOX RESULTS:", "SEGM RESULTS:"]
    for block, iou_type in zip(blocks, ("bbox", "segm"), strict=True):
        drop = "bbox" if iou_type == "segm" else "segmentation"
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([{k: v for k, v in r.items() if k != drop} for r in results])
            evaluator = COCOeval(gt, dt, iou_type)
            evaluator.evaluate()
            evaluator.accumulate()
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            evaluator.summarize()
        assert block.splitlines()[1:] == printed.getvalue().splitlines()
    assert " Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = " in table
