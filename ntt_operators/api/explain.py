"""Finding what went wrong: the review queue and which reference a prediction came from.

Every prediction this plugin writes carries its reasons (``ntt_core.explain``): SAM2's
predicted IoU, the similarity to its class prototype, the runner-up class and the margin to it,
its nearest reference and the similarity to its class's nearest negative. This module turns them
into views and tables.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal

import fiftyone as fo
from fiftyone import ViewField as F

from ntt_core import MemoryBank
from ntt_core.explain import label_id

from .common import SEGMENT_METHOD, Collection, PluginInputError, require_detections_field

ReviewOrder = Literal["margin", "negative"]
_SORT_KEYS = {"margin": ("margin", False), "negative": ("nearest_negative_similarity", True)}


def review_view(
    collection: Collection, pred_field: str, order: ReviewOrder = "margin"
) -> fo.DatasetView:
    """The predictions of ``pred_field`` as patches, what the method is least sure of first.

    ``"margin"``: smallest margin to the runner-up class first (the two prototypes were nearly
    as similar: the class could as well be the other). ``"negative"``: the highest similarity to
    a negative of the class first (the prediction looks like a known false positive). Predictions
    without the value (a one-class bank has no runner-up; a class without negatives) are left out.
    """
    if order not in _SORT_KEYS:
        raise PluginInputError(f"order must be 'margin' or 'negative', got {order!r}")
    require_detections_field(collection, pred_field)
    attribute, reverse = _SORT_KEYS[order]
    path = f"{pred_field}.detections.{attribute}"
    if path not in collection.get_field_schema(flat=True):
        raise PluginInputError(
            f"The predictions in {pred_field!r} carry no {attribute!r}: they were written before "
            "predictions explained themselves. Re-score the field (segment with rescore=True)"
        )
    value = F(attribute)
    having = collection.filter_labels(pred_field, value.exists())
    return having.to_patches(pred_field).sort_by(F(f"{pred_field}.{attribute}"), reverse=reverse)


def reference_view(collection: Collection, pred_field: str, reference: str) -> fo.DatasetView:
    """The predictions of ``pred_field`` whose nearest reference is ``reference`` (a label id,
    or a bank id ``sample_id:label_id``), as patches."""
    require_detections_field(collection, pred_field)
    nearest = F("nearest_reference") == label_id(reference)
    return collection.filter_labels(pred_field, nearest).to_patches(pred_field)


def reference_blame(dataset: fo.Dataset, bank_name: str, bank: MemoryBank) -> list[dict[str, Any]]:
    """For each reference of the bank and each field segmented with it: how many predictions it
    is the nearest reference of and, when the field has an evaluation (its newest), how many of
    those are false positives. Worst first (most false positives, then most predictions)."""
    rows = []
    for field in _fields_of_bank(dataset, bank_name):
        eval_key = _newest_evaluation(dataset, field)
        nearest = _flat(dataset.values(f"{field}.detections.nearest_reference"))
        outcomes = _flat(dataset.values(f"{field}.detections.{eval_key}")) if eval_key else None
        predictions = Counter(nearest)
        false_positives = Counter(
            ref for ref, outcome in zip(nearest, outcomes or []) if outcome == "fp"
        )
        for ref_id, k in zip(bank.ref_ids, bank.labels.tolist()):
            reference = label_id(ref_id)
            rows.append(
                {
                    "field": field,
                    "reference": reference,
                    "sample_id": ref_id.split(":")[0],
                    "class": bank.classes[k],
                    "predictions": predictions[reference],
                    "false_positives": false_positives[reference] if eval_key else None,
                    "evaluation": eval_key,
                }
            )
    return sorted(rows, key=lambda r: (-(r["false_positives"] or 0), -r["predictions"]))


def _fields_of_bank(dataset: fo.Dataset, bank_name: str) -> list[str]:
    """The fields segmented with ``bank_name`` whose predictions carry their reasons."""
    schema = dataset.get_field_schema(flat=True)
    fields = []
    for key in dataset.list_runs(method=SEGMENT_METHOD):
        config = dataset.get_run_info(key).config
        field = config.label_field
        if config.bank_name == bank_name and f"{field}.detections.nearest_reference" in schema:
            fields.append(field)
    return fields


def _newest_evaluation(dataset: fo.Dataset, pred_field: str) -> str | None:
    infos = [dataset.get_evaluation_info(key) for key in dataset.list_evaluations()]
    ours = [i for i in infos if getattr(i.config, "pred_field", None) == pred_field]
    return max(ours, key=lambda i: i.timestamp).key if ours else None


def _flat(per_sample: list[list | None]) -> list:
    return [value for values in per_sample if values for value in values]
