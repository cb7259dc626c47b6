"""The curation loop as functions: a label field to draw in, references and negatives from a
selection, one round (bank built or updated, then segmentation), and where the loop stands.

The App's panel (``ntt_operators.panel``) is these functions and nothing more; a script reaches
every step the same way.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import fiftyone as fo

from ntt_core import NTTConfig

from ..messages import sentence
from ..proposal_cache import ProposalCache
from .bank import iter_build_memory_bank, iter_update_memory_bank, memory_bank_config
from .common import (
    BANK_METHOD,
    PluginInputError,
    Progress,
    Steps,
    detection_fields,
    drive_steps,
    mapped_steps,
)
from .evaluate import class_report, evaluate
from .explain import REVIEW_ORDERS
from .explain import review_view as explain_view
from .records import has_run, run_info, update_info
from .request import SegmentMode, SegmentRequest
from .segment import SEGMENT_METHOD, segment_run_key, segmented_fields

REFERENCE, NEGATIVE = "reference", "negative"
ROUNDS_KEY = "ntt_rounds"
"""``dataset.info[ROUNDS_KEY][label_field]``: the rounds run into that field, oldest first."""
FAILURES_KEY = "ntt_round_failures"
"""``dataset.info[FAILURES_KEY][label_field]``: why the last round into that field failed."""
ROUND_EVAL_KEY = "ntt_round"
LARGE_ROUND = 200
"""Targets whose proposals are not cached yet above which a round is offered as a scheduled run."""


def create_label_field(
    dataset: fo.Dataset, field_name: str, classes: Iterable[str]
) -> dict[str, Any]:
    """Adds an empty ``fo.Detections`` field with a label schema of ``classes``, active, so the
    App's Annotate tab offers its box tool on it (as the Annotate tab's own New field does).
    Returns the field's label schema."""
    classes = sorted({c.strip() for c in classes if c and c.strip()})
    if not field_name.isidentifier():
        raise PluginInputError(
            f"Field name {field_name!r} is not valid: use letters, digits and underscores, not "
            "starting with a digit (e.g. 'boxes')"
        )
    if dataset.has_sample_field(field_name):
        raise PluginInputError(f"Field {field_name!r} already exists; pick a new name")
    if not classes:
        raise PluginInputError("Type at least one class, e.g. 'cat, dog'")
    dataset.add_sample_field(field_name, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    schema = dataset.generate_label_schemas(field_name, scan_samples=False)
    schema.update(classes=classes, component="radio" if len(classes) <= 5 else "dropdown")
    dataset.update_label_schema(field_name, schema)
    dataset.activate_label_schemas(field_name)
    return schema


def mark_labels(
    dataset: fo.Dataset, selected_labels: list[dict], fields: list[str], role: str | None
) -> int:
    """Tags the selected labels of ``fields`` as references (``role="reference"``), negatives
    (``"negative"``) or neither (None), removing the other role's tag; labels of other fields
    in the selection are left alone. ``selected_labels`` is the App's selection (dicts with
    ``label_id``, ``sample_id``, ``field``). Returns how many labels were marked."""
    if role not in (REFERENCE, NEGATIVE, None):
        raise PluginInputError(f"role must be 'reference', 'negative' or None, got {role!r}")
    fields = [f for f in fields if dataset.has_sample_field(f)]
    chosen = [s for s in selected_labels if s.get("field") in fields]
    if not chosen:
        return 0
    labels = [{k: s[k] for k in ("label_id", "sample_id", "field")} for s in chosen]
    view = dataset.select_labels(labels=labels)
    view.untag_labels([t for t in (REFERENCE, NEGATIVE) if t != role], label_fields=fields)
    if role:
        view.tag_labels(role, label_fields=fields)
    return len(labels)


def mark_samples(dataset: fo.Dataset, sample_ids: list[str], field: str, role: str | None) -> int:
    """``mark_labels`` for every label of ``field`` in the samples ``sample_ids`` (the boxes a
    curator drew in them, say). Returns how many labels were marked."""
    samples = dataset.select(sample_ids)
    ids, labels = samples.values(["id", f"{field}.detections.id"])
    selection = [
        {"label_id": label_id, "sample_id": sample_id, "field": field}
        for sample_id, label_ids in zip(ids, labels)
        for label_id in label_ids or []
    ]
    return mark_labels(dataset, selection, [field], role)


def patch_labels(patches: fo.DatasetView, patch_ids: list[str], field: str) -> list[dict]:
    """The labels behind patches of ``field`` (``to_patches``, the *Review* grid), in the
    App's selected-label form: ticking a patch selects its one label."""
    chosen = patches.select(patch_ids)
    label_ids, sample_ids = chosen.values([f"{field}.id", "sample_id"])
    return [
        {"label_id": label_id, "sample_id": str(sample_id), "field": field}
        for label_id, sample_id in zip(label_ids, sample_ids)
    ]


def tagged_per_class(dataset: fo.Dataset, ref_fields: list[str]) -> list[dict[str, Any]]:
    """Per class, the labels tagged as references (in ``ref_fields``) and as negatives (in any
    ``fo.Detections`` field) now, whether or not a bank holds them yet."""
    references: Counter = Counter()
    negatives: Counter = Counter()
    for name in detection_fields(dataset):
        path = f"{name}.detections.label"
        if name in ref_fields:
            references.update(dataset.select_labels(tags=REFERENCE, fields=name).count_values(path))
        negatives.update(dataset.select_labels(tags=NEGATIVE, fields=name).count_values(path))
    classes = sorted(set(references) | set(negatives))
    return [{"class": c, "references": references[c], "negatives": negatives[c]} for c in classes]


def tagged_view(dataset: fo.Dataset, role: str, fields: list[str]) -> fo.DatasetView:
    """The labels tagged ``role`` in ``fields``, for the grid."""
    return dataset.select_labels(tags=role, fields=fields)


def accepted_fields(dataset: fo.Dataset, label_field: str) -> list[str] | None:
    """The predictions field when some of its labels are tagged as references: a round (and
    its preview) accepts them, and the field becomes a reference field of the bank."""
    return [label_field] if _has_tagged(dataset, label_field, REFERENCE) else None


def describe_pending(pending: dict) -> str:
    """``pending_changes`` in words: '3 references and 1 negative tagged since the last update',
    or that the bank is up to date."""
    parts = [
        _count(pending["references_added"], "reference"),
        _count(pending["negatives_added"], "negative"),
    ]
    parts = [p for p in parts if p]
    text = " and ".join(parts) + " tagged since the last update" if parts else ""
    if pending["removed"]:
        untagged = f"{_count(pending['removed'], 'entry', 'entries')} untagged"
        text = f"{text}; {untagged}" if text else f"{untagged} since the last update"
    return text or "The bank is up to date with the tags"


def _count(n: int, one: str, many: str | None = None) -> str:
    if not n:
        return ""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def predictions_of_bank(dataset: fo.Dataset, bank_name: str) -> str | None:
    """The newest field segmented with ``bank_name`` (None: none yet)."""
    for field in segmented_fields(dataset):
        if run_info(dataset, segment_run_key(field)).config.bank_name == bank_name:
            return field
    return None


def plan_round(
    dataset: fo.Dataset,
    bank_name: str,
    label_field: str,
    config: NTTConfig | None = None,
    exclude_tag: str = REFERENCE,
) -> dict[str, Any]:
    """What the next round will do: build or update the bank, the segmentation mode, how many
    targets and how many of them still need the models (no cached proposals), and whether the
    round is large enough to be scheduled rather than run now."""
    build = not has_run(dataset, bank_name, BANK_METHOD)
    if not build:
        config = NTTConfig.from_dict(memory_bank_config(dataset, bank_name)["ntt_config"])
    config = config or NTTConfig()
    ours = has_run(dataset, segment_run_key(label_field), SEGMENT_METHOD)
    mode = (
        SegmentMode.RESCORE if ours and dataset.has_sample_field(label_field) else SegmentMode.NEW
    )
    targets = dataset.match_tags(exclude_tag, bool=False).match_labels(tags=exclude_tag, bool=False)
    sample_ids = targets.values("id")
    uncached = len(sample_ids) - len(ProposalCache(dataset, config).present(sample_ids))
    return {
        "build": build,
        "mode": mode,
        "targets": len(sample_ids),
        "uncached": uncached,
        "large": uncached > LARGE_ROUND,
        "iteration": len(round_history(dataset, label_field)) + 1,
    }


def run_round(
    dataset: fo.Dataset,
    bank_name: str,
    ref_fields: list[str],
    label_field: str,
    config: NTTConfig | None = None,
    gt_field: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One round of the loop: builds the bank from the tagged references (first round) or
    updates it with the tags (predictions tagged as references are accepted), then segments
    every untagged sample into ``label_field``: the first time with proposals cached, later
    re-scored in place from the cache (ids and tags kept). With ``gt_field``, evaluates the
    field against it. The round's summary is appended to the field's history and returned."""
    steps = iter_run_round(dataset, bank_name, ref_fields, label_field, config, gt_field)
    return drive_steps(steps, progress)


BANK_SHARE = 0.2
"""The part of a round's progress bar the bank takes (segmentation takes the rest)."""


def iter_run_round(
    dataset: fo.Dataset,
    bank_name: str,
    ref_fields: list[str],
    label_field: str,
    config: NTTConfig | None = None,
    gt_field: str | None = None,
) -> Steps:
    """``run_round`` as progress steps; returns the round's summary. A failure is recorded for
    the field (``round_failure``) before it is raised, so the panel shows it whoever ran the
    round (a scheduled run, a script), until a round succeeds."""
    iteration = len(round_history(dataset, label_field)) + 1
    try:
        return (yield from _round(dataset, bank_name, ref_fields, label_field, config, gt_field))
    except Exception as error:
        _record_failure(dataset, label_field, f"Round {iteration} failed: {sentence(error)}")
        raise


def _round(
    dataset: fo.Dataset,
    bank_name: str,
    ref_fields: list[str],
    label_field: str,
    config: NTTConfig | None,
    gt_field: str | None,
) -> Steps:
    started = time.perf_counter()
    plan = plan_round(dataset, bank_name, label_field, config)
    step = f"Round {plan['iteration']}"
    if plan["build"]:
        bank = yield from _within(
            iter_build_memory_bank(dataset, ref_fields, bank_name, config=config),
            0.0,
            BANK_SHARE,
            step,
        )
        references, negatives = len(bank), len(bank.negative_ids)
        added = references + negatives
    else:
        accepted = accepted_fields(dataset, label_field)
        update = yield from _within(
            iter_update_memory_bank(dataset, bank_name, add_fields=accepted), 0.0, BANK_SHARE, step
        )
        references, negatives = update["references"], update["negatives"]
        added = len(update["added"])
    before = _predictions(dataset, label_field)
    request = SegmentRequest(dataset, bank_name, label_field, plan["mode"], reuse_proposals=True)
    summary = yield from _within(request.steps(), BANK_SHARE, 1.0, step)
    after = _predictions(dataset, label_field)
    changed = sum(1 for i, row in after.items() if i in before and before[i] != row)
    if gt_field:
        yield 1.0, f"{step}: evaluating {label_field!r} against {gt_field!r}"
    record = {
        "iteration": plan["iteration"],
        "mode": plan["mode"].value,
        "bank_entries_added": added,
        "references": references,
        "negatives": negatives,
        "samples_written": summary["written"],
        "predictions": len(after),
        "predictions_changed": changed,
        "predictions_kept": len(after.keys() & before.keys()),
        "failed": len(summary["failed"]),
        "seconds": round(time.perf_counter() - started, 1),
        "mAP": _map(dataset, label_field, gt_field) if gt_field else None,
    }
    _append_history(dataset, label_field, record)
    yield 1.0, f"{step} done"
    return record


def _within(steps: Steps, start: float, end: float, round_name: str) -> Steps:
    """The steps named after their round, their fractions mapped into [start, end] of it."""
    return mapped_steps(
        steps, lambda fraction, label: (start + (end - start) * fraction, f"{round_name}: {label}")
    )


def _has_tagged(dataset: fo.Dataset, field_name: str, tag: str) -> bool:
    if not dataset.has_sample_field(field_name):
        return False
    return bool(dataset.count_label_tags(label_fields=field_name).get(tag))


def _predictions(dataset: fo.Dataset, label_field: str) -> dict[str, tuple]:
    """Label id -> (label, confidence) of the field, without loading masks."""
    if not dataset.has_sample_field(label_field):
        return {}
    path = f"{label_field}.detections"
    ids, labels, scores = dataset.values(
        [f"{path}.id", f"{path}.label", f"{path}.confidence"], unwind=True
    )
    return {i: (label, score) for i, label, score in zip(ids, labels, scores)}


def _map(dataset: fo.Dataset, label_field: str, gt_field: str) -> float | None:
    """The round's mAP; None where the segmented samples hold no ground truth."""
    return class_report(evaluate(dataset, label_field, gt_field, ROUND_EVAL_KEY))["mAP"]


def round_history(dataset: fo.Dataset, label_field: str) -> list[dict[str, Any]]:
    """The rounds run into ``label_field``, oldest first."""
    return list((dataset.info.get(ROUNDS_KEY) or {}).get(label_field) or [])


def round_failure(dataset: fo.Dataset, label_field: str) -> str | None:
    """Why the last round into ``label_field`` failed, in one sentence; None once a round
    succeeded since."""
    return (dataset.info.get(FAILURES_KEY) or {}).get(label_field)


def _append_history(dataset: fo.Dataset, label_field: str, record: dict[str, Any]) -> None:
    def appended(rounds: dict | None) -> dict:
        rounds = dict(rounds or {})
        return rounds | {label_field: [*rounds.get(label_field, []), record]}

    update_info(dataset, ROUNDS_KEY, appended)
    update_info(dataset, FAILURES_KEY, lambda failures: _without(failures, label_field))


def _record_failure(dataset: fo.Dataset, label_field: str, text: str) -> None:
    update_info(dataset, FAILURES_KEY, lambda failures: {**(failures or {}), label_field: text})


def _without(mapping: dict | None, key: str) -> dict:
    return {k: v for k, v in (mapping or {}).items() if k != key}


def review_view(dataset: fo.Dataset, label_field: str) -> tuple[fo.DatasetView, str]:
    """The predictions of ``label_field`` one patch each, those most worth a look first, in
    ``explain.review_view``'s order: the smallest class margin or, where the predictions carry
    none (a one-class bank), the closest to a negative; by confidence, lowest first, where they
    carry neither. Returns the view and a sentence saying which order it is."""
    schema = dataset.get_field_schema(flat=True)
    for order, (attribute, highest_first) in REVIEW_ORDERS.items():
        path = f"{label_field}.detections.{attribute}"
        if path in schema and dataset.count(path):
            words = f"{attribute} {'highest' if highest_first else 'lowest'} first"
            return explain_view(dataset, label_field, order), f"Predictions by {words}"
    view = dataset.to_patches(label_field).sort_by(f"{label_field}.confidence")
    return view, (
        "Predictions by confidence, lowest first (they carry no margin or negative similarity "
        "yet: segment with a plugin version that writes explanations)"
    )
