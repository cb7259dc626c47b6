"""Step 4, evaluation: COCO-style mask evaluation with per-sample TP/FP/FN and patches."""

from __future__ import annotations

from typing import Any

import fiftyone as fo

from .common import (
    Collection,
    PluginInputError,
    Progress,
    require_detections_field,
    require_run_key,
)


def evaluate(
    dataset_or_view: Collection,
    pred_field: str,
    gt_field: str,
    eval_key: str,
    classes: list[str] | None = None,
    progress: Progress | None = None,
) -> fo.core.evaluation.EvaluationResults:
    """COCO-style evaluation on instance masks, with mAP and per-sample/per-label TP/FP/FN.

    Adds ``<eval_key>_tp/_fp/_fn`` per sample and ``<eval_key>`` per label (``"tp"``/``"fp"``/
    ``"fn"``); ``view.to_evaluation_patches(eval_key)`` shows them one by one.
    """
    require_detections_field(dataset_or_view, pred_field)
    require_detections_field(dataset_or_view, gt_field)
    require_run_key(eval_key, "Evaluation key")
    if pred_field == gt_field:
        raise PluginInputError("Predictions and ground truth are the same field")
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
        use_masks=True,
        compute_mAP=True,
        progress=report,
    )


def class_report(results: fo.core.evaluation.EvaluationResults) -> dict[str, Any]:
    """mAP and per-class precision/recall/F1/support, as plain JSON-ready values."""
    rows = []
    for name, metrics in results.report().items():
        rows.append(
            {
                "class": name,
                "precision": round(float(metrics["precision"]), 4),
                "recall": round(float(metrics["recall"]), 4),
                "f1": round(float(metrics["f1-score"]), 4),
                "support": int(metrics["support"]),
            }
        )
    return {"eval_key": results.key, "mAP": round(float(results.mAP()), 4), "classes": rows}
