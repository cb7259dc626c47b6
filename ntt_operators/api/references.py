"""Step 1, references: tag N references per class the way the paper samples its N-shot sets."""

from __future__ import annotations

import fiftyone as fo

from ntt_core.fewshot import sample_references as sample_annotations

from ..labels import annotations, ensure_metadata
from .common import (
    Collection,
    PluginInputError,
    require_detections_field,
    require_tag,
    root_dataset,
    source_samples,
)
from .records import update_info


def sample_references(
    dataset_or_view: Collection,
    gt_field: str,
    shots: int,
    seed: int = 33,
    tag: str = "reference",
    classes: list[str] | None = None,
    tag_samples: bool = True,
    tag_labels: bool = True,
    replace_tags: bool = False,
) -> dict[str, list[str]]:
    """Picks ``shots`` references per class with the paper's few-shot sampling and tags them.

    The tag is first removed from the collection's samples and ``gt_field`` labels, so after the
    call it marks exactly this draw; the same seed on the same collection draws the same labels.
    Tags it did not place (a curator's, by hand) are never removed silently: the call is refused
    unless ``replace_tags``. What it places is recorded in the dataset's ``info``.
    Returns class -> label ids.
    """
    dataset_or_view = source_samples(dataset_or_view)
    check_sampling(dataset_or_view, gt_field, tag, tag_samples, tag_labels, replace_tags, classes)
    dataset = root_dataset(dataset_or_view)
    placed = _placed(dataset, tag)
    ensure_metadata(dataset_or_view)
    anns, sizes = annotations(dataset_or_view, gt_field)
    picks = sample_annotations(anns, sizes, classes, shots=shots, seed=seed)
    label_ids = {cls: [a for c in choices for a in c["ann_ids"]] for cls, choices in picks.items()}
    chosen = [label_id for ids in label_ids.values() for label_id in ids]
    sample_ids = sorted({c["img_id"] for choices in picks.values() for c in choices})

    dataset_or_view.untag_samples(tag)
    dataset_or_view.untag_labels(tag, label_fields=gt_field)
    if tag_samples:
        dataset_or_view.select(sample_ids).tag_samples(tag)
    if tag_labels:
        dataset_or_view.select_labels(ids=chosen, fields=gt_field).tag_labels(
            tag, label_fields=gt_field
        )
    placed_now = {
        "labels": sorted(set(placed["labels"]) | (set(chosen) if tag_labels else set())),
        "samples": sorted(set(placed["samples"]) | (set(sample_ids) if tag_samples else set())),
    }
    update_info(dataset, _PLACED_KEY, lambda record: {**(record or {}), tag: placed_now})
    return label_ids


def check_sampling(
    dataset_or_view: Collection,
    gt_field: str,
    tag: str,
    tag_samples: bool,
    tag_labels: bool,
    replace_tags: bool,
    classes: list[str] | None = None,
) -> None:
    """Refuses what ``sample_references`` would refuse, reading labels and tags only (the
    form's check; too few usable instances for the shots asked is found when sampling)."""
    dataset_or_view = source_samples(dataset_or_view)
    require_detections_field(dataset_or_view, gt_field)
    require_tag(tag)
    if not (tag_samples or tag_labels):
        raise PluginInputError("Choose to tag the reference samples, their labels, or both")
    if not len(dataset_or_view):
        raise PluginInputError("No sample to draw references from: the view is empty")
    present = dataset_or_view.distinct(f"{gt_field}.detections.label")
    missing = [c for c in classes or [] if c not in present]
    if missing:
        raise PluginInputError(
            f"Class(es) {missing} have no instance in {gt_field!r} here (its classes: {present})"
        )
    if not replace_tags:
        placed = _placed(root_dataset(dataset_or_view), tag)
        _refuse_hand_placed_tags(dataset_or_view, gt_field, tag, placed)


def _placed(dataset: fo.Dataset, tag: str) -> dict[str, list[str]]:
    return dataset.info.get(_PLACED_KEY, {}).get(tag, {"labels": [], "samples": []})


_PLACED_KEY = "ntt_sampled_references"
"""``dataset.info`` key: per tag, the label and sample ids that Sample references tagged."""


def _refuse_hand_placed_tags(
    collection: Collection, gt_field: str, tag: str, placed: dict[str, list[str]]
) -> None:
    labels = collection.select_labels(tags=tag, fields=gt_field).values(
        f"{gt_field}.detections.id", unwind=True
    )
    by_hand = sorted(set(labels) - set(placed["labels"]))
    samples = sorted(set(collection.match_tags(tag).values("id")) - set(placed["samples"]))
    if by_hand or samples:
        example = f"label {by_hand[0]}" if by_hand else f"sample {samples[0]}"
        raise PluginInputError(
            f"{len(by_hand)} label(s) of {gt_field!r} and {len(samples)} sample(s) already carry "
            f"the tag {tag!r} that Sample references did not place (e.g. {example}); sampling "
            "would remove it. Use another tag, or replace_tags=True ('Replace tags placed by "
            "hand') to untag them"
        )


def reference_view(
    dataset_or_view: Collection, gt_field: str, ref_tag: str, tag_type: str
) -> fo.DatasetView:
    """The references as a view: tagged samples, or only the tagged labels of ``gt_field``."""
    require_tag(ref_tag)
    if tag_type == "sample":
        return dataset_or_view.match_tags(ref_tag)
    if tag_type == "label":
        return dataset_or_view.select_labels(tags=ref_tag, fields=gt_field)
    raise PluginInputError(f"tag_type must be 'sample' or 'label', got {tag_type!r}")
