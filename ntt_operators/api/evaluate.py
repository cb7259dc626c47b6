"""Step 4, evaluation: COCO-style mask evaluation with per-sample TP/FP/FN and patches."""

from __future__ import annotations

from typing import Any

import fiftyone as fo

from .common import (
    SEGMENT_METHOD,
    Collection,
    PluginInputError,
    Progress,
    require_detections_field,
    require_run_key,
    root_dataset,
    source_samples,
)
from .records import has_run, run_info
from .segment import segment_run_key


def evaluate(
    dataset_or_view: Collection,
    pred_field: str,
    gt_field: str,
    eval_key: str,
    classes: list[str] | None = None,
    progress: Progress | None = None,
    include_unsegmented: bool = False,
    overwrite: bool = True,
) -> fo.core.evaluation.EvaluationResults:
    """COCO-style evaluation on instance masks, with mAP and per-sample/per-label TP/FP/FN.

    Adds ``<eval_key>_tp/_fp/_fn`` per sample and ``<eval_key>`` per label (``"tp"``/``"fp"``/
    ``"fn"``); ``view.to_evaluation_patches(eval_key)`` shows them one by one. When either field
    has labels without a mask (boxes drawn in the App, a detector's output), the IoUs are those
    of the boxes; ``class_report`` says so.

    Samples the segment run of ``pred_field`` left out (its references, by the tag it recorded)
    are left out here too, unless ``include_unsegmented``: their objects were never predicted,
    so they would count as missed. ``overwrite=False`` refuses an ``eval_key`` already in use.
    """
    dataset_or_view = source_samples(dataset_or_view)
    check_evaluation(dataset_or_view, pred_field, gt_field, eval_key, overwrite)
    # Whether a field has masks is a property of the field, not of the samples evaluated.
    use_masks = not fields_without_masks(root_dataset(dataset_or_view), [pred_field, gt_field])
    if not include_unsegmented:
        dataset_or_view = segmented_samples(dataset_or_view, pred_field)
    unscored = dataset_or_view.count(f"{pred_field}.detections") - dataset_or_view.count(
        f"{pred_field}.detections.confidence"
    )
    if unscored:
        # mAP needs a ranking; FiftyOne would fail halfway through with eval fields written.
        raise PluginInputError(
            f"{unscored} predictions in {pred_field!r} have no confidence; mAP needs one per "
            "prediction"
        )
    report = None
    if progress is not None:
        report = fo.report_progress(lambda bar: progress(bar.progress, "Evaluating"), dt=1.0)
    return dataset_or_view.evaluate_detections(
        pred_field,
        gt_field=gt_field,
        eval_key=eval_key,
        classes=classes,
        use_masks=use_masks,
        compute_mAP=True,
        progress=report,
    )


def fields_without_masks(collection: Collection, fields: list[str]) -> list[str]:
    """The fields among ``fields`` with at least one detection that has no instance mask."""
    missing = []
    for name in fields:
        labels = collection.count(f"{name}.detections")
        with_masks = collection.count(f"{name}.detections.mask") + collection.count(
            f"{name}.detections.mask_path"
        )
        if with_masks < labels:
            missing.append(name)
    return missing


def check_evaluation(
    dataset_or_view: Collection, pred_field: str, gt_field: str, eval_key: str, overwrite: bool
) -> None:
    """Refuses fields and an evaluation key that cannot be evaluated (the form shows these)."""
    require_detections_field(dataset_or_view, pred_field)
    require_detections_field(dataset_or_view, gt_field)
    if pred_field == gt_field:
        raise PluginInputError(
            f"Predictions and ground truth are the same field ({pred_field!r}); pick the field "
            "the segmentation wrote"
        )
    require_run_key(eval_key, "Evaluation key")
    dataset = root_dataset(dataset_or_view)
    if eval_key in dataset.list_evaluations():
        if not overwrite:
            raise PluginInputError(
                f"Evaluation key {eval_key!r} is in use: set overwrite=True to replace that "
                "evaluation, or pick a new key"
            )
    elif eval_key in dataset.list_runs() + dataset.list_brain_runs():
        raise PluginInputError(f"Key {eval_key!r} is taken by another kind of run; pick a new one")


def missing_ground_truth(
    dataset_or_view: Collection, pred_field: str, gt_field: str, include_unsegmented: bool
) -> str | None:
    """Why an evaluation of these samples has nothing to score the predictions against (its mAP
    reads -1), and the choices; None when they hold ground truth. Often all of it is on the
    references, which the segmentation left out."""
    evaluated = (
        dataset_or_view if include_unsegmented else segmented_samples(dataset_or_view, pred_field)
    )
    if evaluated.count(f"{gt_field}.detections"):
        return None
    tag = left_out_tag(dataset_or_view, pred_field)
    on_left_out = dataset_or_view.count(f"{gt_field}.detections")
    if on_left_out and not include_unsegmented and tag:
        return (
            f"The {len(evaluated)} segmented sample(s) hold no ground truth in {gt_field!r}: "
            f"all {on_left_out} of its labels are on the samples tagged {tag!r}, which the "
            "segmentation left out, so no mAP can be computed and every prediction counts as a "
            f"false positive. Either label some segmented samples in {gt_field!r} (accepting "
            f"correct predictions counts), or include the samples tagged {tag!r} "
            "(include_unsegmented=True; their objects were never predicted, so they count as "
            "missed)"
        )
    return (
        f"The evaluated samples hold no ground truth in {gt_field!r}, so no mAP can be computed "
        f"and every prediction counts as a false positive. Label some of them in {gt_field!r}, "
        "or pick the field that holds the ground truth"
    )


def left_out_tag(dataset_or_view: Collection, pred_field: str) -> str | None:
    """The tag of the samples the segment run of ``pred_field`` left out (None: no record)."""
    dataset = root_dataset(dataset_or_view)
    run_key = segment_run_key(pred_field)
    if not has_run(dataset, run_key, SEGMENT_METHOD):
        return None
    return run_info(dataset, run_key).config.exclude_tag or None


def segmented_samples(dataset_or_view: Collection, pred_field: str) -> Collection:
    """``dataset_or_view`` without the samples the segment run of ``pred_field`` left out."""
    tag = left_out_tag(dataset_or_view, pred_field)
    if tag is None:
        return dataset_or_view
    return dataset_or_view.match_tags(tag, bool=False).match_labels(tags=tag, bool=False)


def class_report(results: fo.core.evaluation.EvaluationResults) -> dict[str, Any]:
    """mAP and per-class precision/recall/F1/support, as plain JSON-ready values; ``iou_on``
    says whether instances were matched on masks or on boxes, and ``note`` why."""
    rows = []
    for name, metrics in results.report().items():
        if not isinstance(metrics, dict):
            continue  # "accuracy": a single number when every prediction matched its class
        rows.append(
            {
                "class": name,
                "precision": round(float(metrics["precision"]), 4),
                "recall": round(float(metrics["recall"]), 4),
                "f1": round(float(metrics["f1-score"]), 4),
                "support": int(metrics["support"]),
            }
        )
    config = results.config
    # The samples evaluated are already those chosen: the sentence looks at the whole dataset.
    missing = missing_ground_truth(
        root_dataset(results.samples), config.pred_field, config.gt_field, False
    )
    if missing and results.samples.count(f"{config.gt_field}.detections"):
        missing = None  # include_unsegmented: the references' ground truth was scored
    report = {
        "eval_key": results.key,
        "mAP": None if missing else round(float(results.mAP()), 4),
        "iou_on": "masks" if config.use_masks else "boxes",
        "classes": rows,
    }
    if missing:
        report["no_ground_truth"] = missing
    if not config.use_masks:
        fields = [config.pred_field, config.gt_field]
        boxes = fields_without_masks(root_dataset(results.samples), fields)
        report["note"] = (
            f"Evaluated on boxes, not masks: {', '.join(map(repr, boxes)) or 'a field'} "
            "holds labels without a mask"
        )
    return report
