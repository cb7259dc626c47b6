"""Finding what went wrong: the review queue and which reference a prediction came from.

Every prediction this plugin writes carries its reasons (``ntt_core.explain``): SAM2's
predicted IoU, the similarity to its class prototype, the runner-up class and the margin to it,
its nearest reference and the similarity to its class's nearest negative. This module turns them
into views and tables.
"""

from __future__ import annotations

import importlib.util
import time
from collections import Counter
from typing import Any, Literal

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

from ntt_core import MemoryBank, NTTConfig, NTTError
from ntt_core.cache import cached_features_and_counts, file_checksum, proposal_identity
from ntt_core.explain import label_id

from ..labels import prediction_id_strings
from ..proposal_cache import ProposalCache
from .common import (
    SEGMENT_METHOD,
    Collection,
    PluginInputError,
    require_detections_field,
    root_dataset,
)
from .records import has_run, run_info

ReviewOrder = Literal["margin", "negative"]
REVIEW_ORDERS: dict[str, tuple[str, bool]] = {
    "margin": ("margin", False),
    "negative": ("nearest_negative_similarity", True),
}
"""Each review order's attribute, and whether its highest value comes first."""


def review_view(
    collection: Collection, pred_field: str, order: ReviewOrder = "margin"
) -> fo.DatasetView:
    """The predictions of ``pred_field`` as patches, what the method is least sure of first.

    ``"margin"``: smallest margin to the runner-up class first (the two prototypes were nearly
    as similar: the class could as well be the other). ``"negative"``: the highest similarity to
    a negative of the class first (the prediction looks like a known false positive). Predictions
    without the value (a one-class bank has no runner-up; a class without negatives) are left out.
    """
    if order not in REVIEW_ORDERS:
        raise PluginInputError(f"order must be 'margin' or 'negative', got {order!r}")
    require_detections_field(collection, pred_field)
    attribute, reverse = REVIEW_ORDERS[order]
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
        config = run_info(dataset, key).config
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


# -- look-alikes and the map: FiftyOne Brain over the cached features ------------------------


def similarity_key(pred_field: str) -> str:
    """The Brain run that indexes ``pred_field``'s predictions."""
    return f"ntt_similarity_{pred_field}"


def visualization_key(pred_field: str) -> str:
    return f"ntt_map_{pred_field}"


def build_similarity_index(dataset: fo.Dataset, pred_field: str) -> dict[str, Any]:
    """Indexes ``pred_field``'s predictions by their proposals' cached DINOv2 features (no
    model runs), so that the App's grid sorts patches by similarity to a selected one.

    A FiftyOne Brain similarity run (scikit-learn backend) with ``patches_field=pred_field``,
    under ``similarity_key(pred_field)``. It is rebuilt, not updated, each time it is asked for:
    a re-score changes which predictions exist, and rebuilding from the cache takes seconds.
    Returns the key, the number of predictions indexed and the seconds it took.
    """
    import fiftyone.brain as fob

    start = time.perf_counter()
    embeddings, count = prediction_features(dataset, pred_field)
    key = similarity_key(pred_field)
    if key in dataset.list_brain_runs():
        dataset.delete_brain_run(key)
    fob.compute_similarity(
        dataset.exists(pred_field),
        patches_field=pred_field,
        embeddings=embeddings,
        brain_key=key,
        backend="sklearn",
        metric="cosine",
        progress=False,
    )
    return {"brain_key": key, "predictions": count, "seconds": time.perf_counter() - start}


def build_embeddings_map(dataset: fo.Dataset, pred_field: str) -> dict[str, Any]:
    """A 2-D map of ``pred_field``'s predictions from their cached features, for the App's
    Embeddings panel (colour by ``label``). UMAP when ``umap-learn`` is installed, else PCA
    (scikit-learn); ``method`` says which ran."""
    import fiftyone.brain as fob

    start = time.perf_counter()
    embeddings, count = prediction_features(dataset, pred_field)
    method = "umap" if importlib.util.find_spec("umap") else "pca"
    key = visualization_key(pred_field)
    if key in dataset.list_brain_runs():
        dataset.delete_brain_run(key)
    fob.compute_visualization(
        dataset.exists(pred_field),
        patches_field=pred_field,
        embeddings=embeddings,
        brain_key=key,
        method=method,
        progress=False,
    )
    return {
        "brain_key": key,
        "predictions": count,
        "method": method,
        "seconds": time.perf_counter() - start,
    }


def prediction_features(dataset: fo.Dataset, pred_field: str) -> tuple[dict[str, np.ndarray], int]:
    """By sample id, the (num predictions, C) cached features of ``pred_field``'s predictions,
    in the field's order, and their count. A prediction's id derives from its mask
    (``labels.prediction_ids``), so it names the cached proposal it came from."""
    dataset = root_dataset(dataset)
    config = _segment_config(dataset, pred_field)
    cache, identity = ProposalCache(dataset, config), proposal_identity(config)
    sample_ids, filepaths, label_ids = dataset.exists(pred_field).values(
        ["id", "filepath", f"{pred_field}.detections.id"]
    )
    embeddings, missing = {}, 0
    for start in range(0, len(sample_ids), 256):
        batch = slice(start, start + 256)
        blobs = cache.get_many(sample_ids[batch])
        for sample_id, filepath, wanted in zip(
            sample_ids[batch], filepaths[batch], label_ids[batch]
        ):
            seed = f"{pred_field}:{sample_id}"
            features = _features_by_id(blobs.get(sample_id), filepath, identity, seed)
            rows = [features.get(i) for i in wanted or []]
            missing += sum(row is None for row in rows)
            if rows and missing == 0:
                embeddings[sample_id] = np.stack(rows)
    if missing:
        raise PluginInputError(
            f"{missing} predictions of {pred_field!r} have no cached proposal (segmented without "
            "the proposal cache, or edited since): segment the field again with "
            "reuse_proposals=True, then build the index"
        )
    return embeddings, sum(len(rows) for rows in embeddings.values())


def _features_by_id(
    blob: bytes | None, filepath: str, identity: str, seed: str
) -> dict[str, np.ndarray]:
    """The cached proposals' features by the id their prediction would have (none: no entry).
    Read straight from the entry's bytes: building its ``Proposals`` and hashing each mask's
    RLE as a dict took most of an index's time."""
    if blob is None:
        return {}
    try:
        checksum = file_checksum(filepath)
    except NTTError:
        return {}
    cached = cached_features_and_counts(blob, checksum, identity)
    if cached is None:
        return {}
    features, counts, size = cached
    return dict(zip(prediction_id_strings(seed, size, counts), features))


def _segment_config(dataset: fo.Dataset, pred_field: str) -> NTTConfig:
    """The settings the segment run of ``pred_field`` used (they key its cached proposals)."""
    from .segment import segment_run_key  # segment -> bank -> this module: imported late

    run_key = segment_run_key(pred_field)
    if not has_run(dataset, run_key, SEGMENT_METHOD):
        raise PluginInputError(
            f"Field {pred_field!r} was not segmented by this plugin: there are no cached "
            "features to index"
        )
    return NTTConfig.from_dict(run_info(dataset, run_key).config.ntt_config)
