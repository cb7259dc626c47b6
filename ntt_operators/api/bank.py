"""Step 2, the memory bank: encode tagged references, stored as a custom run of the dataset.

A bank holds positive references (labels tagged ``reference`` in its reference fields: ground
truth, boxes drawn in the App, accepted predictions) and negative ones (labels tagged ``negative``
in any ``fo.Detections`` field). It records where they come from, so ``update_memory_bank`` can
re-read the tags and encode only what changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import fiftyone as fo
import numpy as np
import torch
from bson import ObjectId

from ntt_core import MemoryBank, Negatives, NTTConfig, NTTPredictor, Reference
from ntt_core.errors import BankError, BankMismatchError, ReferenceInputError
from ntt_core.models import encoder_identity

from ..labels import GroundTruthInstance, ensure_metadata, iter_instances
from .common import (
    BANK_METHOD,
    Collection,
    PluginInputError,
    Progress,
    Steps,
    detection_fields,
    drive_steps,
    load_predictor,
    require_bank,
    require_detections_field,
    require_free_run_key,
    require_run_key,
    require_tag,
    root_dataset,
    source_samples,
)
from .explain import reference_blame
from .records import load_results, register_run, run_info, save_results
from .references import reference_view

FieldOrFields = str | list[str]


def build_memory_bank(
    dataset_or_view: Collection,
    gt_field: FieldOrFields,
    bank_name: str,
    ref_tag: str = "reference",
    tag_type: Literal["sample", "label"] = "label",
    classes: list[str] | None = None,
    config: NTTConfig | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    negative_tag: str | None = "negative",
    full_masks: Mapping[str, np.ndarray] | None = None,
) -> MemoryBank:
    """Encodes the tagged references of ``gt_field`` and stores the bank as run ``bank_name``.

    ``gt_field`` is one ``fo.Detections`` field or a list of them (e.g. ``["ground_truth",
    "ntt_predictions"]``: predictions tagged ``ref_tag`` are accepted as references, their
    predicted mask used as is). ``tag_type="sample"``: every instance of the samples tagged
    ``ref_tag``; ``"label"``: only the instances tagged ``ref_tag``. Instances without a mask
    (boxes drawn in the App) get SAM2's mask for their box. Labels tagged ``negative_tag`` in any
    ``fo.Detections`` field become negative references of their class (None: no negatives).
    ``config`` defaults to the paper's (``NTTConfig()``). ``full_masks`` (full-resolution bool
    masks by label id) replace the labels' own box-cropped masks: the COCO protocol passes
    pycocotools' ``annToMask``, which may reach outside the rounded box FiftyOne crops to.
    """
    return drive_steps(
        iter_build_memory_bank(
            dataset_or_view, gt_field, bank_name, ref_tag, tag_type, classes, config, overwrite,
            negative_tag, full_masks,
        ),
        progress,
    )  # fmt: skip


def iter_build_memory_bank(
    dataset_or_view: Collection,
    gt_field: FieldOrFields,
    bank_name: str,
    ref_tag: str = "reference",
    tag_type: Literal["sample", "label"] = "label",
    classes: list[str] | None = None,
    config: NTTConfig | None = None,
    overwrite: bool = False,
    negative_tag: str | None = "negative",
    full_masks: Mapping[str, np.ndarray] | None = None,
) -> Steps:
    """``build_memory_bank`` as progress steps; returns the bank."""
    dataset_or_view = source_samples(dataset_or_view)
    dataset = root_dataset(dataset_or_view)
    sources = BankSources(
        ref_fields=_field_list(gt_field),
        ref_tag=ref_tag,
        tag_type=tag_type,
        negative_tag=negative_tag or None,
        classes=list(classes) if classes else None,
    )
    sources.check(dataset_or_view)
    check_new_bank_name(dataset, bank_name, overwrite)
    check_references(
        dataset_or_view, sources.ref_fields, ref_tag, tag_type, classes, sources.negative_tag
    )
    config = config or NTTConfig()
    wanted = collect_entries(dataset_or_view, sources)
    bank, encoded, box_only = yield from _assemble(
        wanted, sources, config, previous=None, full_masks=full_masks
    )
    _store(dataset, bank_name, bank, sources, config, box_only, overwrite)
    yield 1.0, f"Memory bank {bank_name!r}: {_describe(bank)}"
    return bank


def update_memory_bank(
    dataset: fo.Dataset,
    bank_name: str,
    add_fields: list[str] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Brings a bank up to date with its sources' tags, encoding only what changed.

    Re-reads the fields and tags recorded at build time over the whole dataset: labels newly
    tagged as references or negatives are encoded and added, entries whose label lost its tag
    (or changed class) are dropped, the others keep their features and their date. An entry whose
    label no longer exists (re-scoring dropped that prediction, say) is kept, so a correction is
    never lost silently; rebuild the bank to drop such entries. The result equals a rebuild from
    scratch over the same labels. ``add_fields`` adds reference fields from now on (e.g. the
    predictions field, to accept predictions tagged as references). Returns what was added,
    removed and kept.
    """
    return drive_steps(iter_update_memory_bank(dataset, bank_name, add_fields), progress)


def iter_update_memory_bank(
    dataset: fo.Dataset, bank_name: str, add_fields: list[str] | None = None
) -> Steps:
    """``update_memory_bank`` as progress steps; returns the summary."""
    dataset = root_dataset(dataset)
    plan = _plan_update(dataset, bank_name, add_fields)
    previous, sources, config, wanted = plan.previous, plan.sources, plan.config, plan.wanted
    kept_vanished = sorted(e.ref_id for e in wanted if e.vanished)
    if plan.changes() == ([], []) and not plan.fields_added:
        # Nothing tagged or untagged since: the bank and its record stay as they are.
        yield 1.0, f"Memory bank {bank_name!r}: nothing changed since the last update"
        return _update_summary(bank_name, previous, previous, set(), kept_vanished) | {
            "nothing_changed": True
        }
    bank, encoded, box_only = yield from _assemble(wanted, sources, config, previous)
    _store(dataset, bank_name, bank, sources, config, box_only, overwrite=True)
    yield 1.0, f"Memory bank {bank_name!r} updated: {_describe(bank)}"
    return _update_summary(bank_name, previous, bank, encoded, kept_vanished) | {
        "nothing_changed": False
    }


def _update_summary(
    bank_name: str, previous: MemoryBank, bank: MemoryBank, encoded: set[str], kept_vanished: list
) -> dict[str, Any]:
    before = set(previous.ref_ids) | set(previous.negative_ids)
    after = set(bank.ref_ids) | set(bank.negative_ids)
    return {
        "bank_name": bank_name,
        "added": sorted(after - before),
        "removed": sorted(before - after),
        "re_encoded": sorted(encoded & before & after),
        "kept_vanished": kept_vanished,
        "references": len(bank.ref_ids),
        "negatives": len(bank.negative_ids),
        "encoded": len(encoded),
    }


@dataclass
class _UpdatePlan:
    previous: MemoryBank
    sources: BankSources
    """The recorded sources, plus the fields added now."""
    config: NTTConfig
    wanted: list[Entry]
    """The entries the sources designate now, vanished ones kept (classes not yet selected)."""
    fields_added: list[str]

    def changes(self) -> tuple[list[Entry], list[tuple[str, bool, str]]]:
        """The entries to add, and the (ref id, negative, class) keys to remove."""
        _, kept = _keep_classes(self.wanted, self.sources)
        now = {(e.ref_id, e.negative, e.label): e for e in kept}
        held = set(_known_features(self.previous))
        return [e for key, e in now.items() if key not in held], sorted(held - set(now))


def _plan_update(dataset: fo.Dataset, bank_name: str, add_fields: list[str] | None) -> _UpdatePlan:
    """What an update starts from, read from the dataset's tags without encoding anything."""
    previous = load_memory_bank(dataset, bank_name)
    recorded = memory_bank_config(dataset, bank_name)
    sources = BankSources.from_record(recorded)
    fields_added = list(dict.fromkeys(f for f in add_fields or [] if f not in sources.ref_fields))
    sources.ref_fields += fields_added
    sources.check(dataset)
    config = NTTConfig.from_dict(recorded["ntt_config"])
    wanted = collect_entries(dataset, sources)
    wanted += _vanished_entries(dataset, previous, wanted)
    return _UpdatePlan(previous, sources, config, wanted, fields_added)


def pending_changes(
    dataset: fo.Dataset, bank_name: str, add_fields: list[str] | None = None
) -> dict[str, Any]:
    """What ``update_memory_bank(dataset, bank_name, add_fields)`` would change, without
    encoding or writing anything; refuses what the update would refuse.

    ``rows``: per field, class, role and change, how many entries; an entry whose class changed
    counts as removed from its old class and added to its new one. A removed entry's field is
    the one its (untagged) label lies in, "" when the label is gone. ``fields_added``: the
    reference fields the update would record from now on. ``ignored``: per field the bank does
    not take references from, how many labels are tagged as references there.
    """
    dataset = root_dataset(dataset)
    plan = _plan_update(dataset, bank_name, add_fields)
    added, removed = plan.changes()
    where = _label_fields(dataset, {ref_id for ref_id, _, _ in removed})
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for e in added:
        counts[(e.field, e.label, _role(e.negative), "added")] += 1
    for ref_id, negative, label in removed:
        counts[(where.get(ref_id, ""), label, _role(negative), "removed")] += 1
    rows = [
        {"field": f, "class": c, "role": role, "change": change, "count": n}
        for (f, c, role, change), n in sorted(counts.items())
    ]
    return {
        "references_added": sum(1 for e in added if not e.negative),
        "negatives_added": sum(1 for e in added if e.negative),
        "removed": len(removed),
        "rows": rows,
        "fields_added": plan.fields_added,
        "ignored": _ignored_references(dataset, plan.sources),
        "nothing_changed": not rows and not plan.fields_added,
    }


def _ignored_references(dataset: fo.Dataset, sources: BankSources) -> dict[str, int]:
    """field -> how many of its labels are tagged as references although the bank does not take
    references from it (a tag that landed there by mistake, or a field to add)."""
    if sources.tag_type != "label":
        return {}
    ignored = {}
    for field_name in detection_fields(dataset):
        if field_name not in sources.ref_fields:
            count = dataset.count_label_tags(label_fields=field_name).get(sources.ref_tag, 0)
            if count:
                ignored[field_name] = count
    return ignored


def _role(negative: bool) -> Literal["reference", "negative"]:
    return "negative" if negative else "reference"


def _label_fields(dataset: fo.Dataset, ref_ids: set[str]) -> dict[str, str]:
    """ref id -> the ``fo.Detections`` field its label lies in now (absent: the label is gone)."""
    if not ref_ids:
        return {}
    by_label = {ref_id.split(":")[-1]: ref_id for ref_id in ref_ids}
    samples = dataset.select(
        sorted({r.split(":")[0] for r in ref_ids if ObjectId.is_valid(r.split(":")[0])})
    )
    found = {}
    for field_name in detection_fields(dataset):
        for label_id in samples.values(f"{field_name}.detections.id", unwind=True):
            if label_id in by_label:
                found[by_label[label_id]] = field_name
    return found


@dataclass
class BankSources:
    """Where a bank's entries come from: recorded with the bank, re-read by an update."""

    ref_fields: list[str]
    ref_tag: str
    tag_type: str
    negative_tag: str | None
    classes: list[str] | None
    """The classes asked for at build time (None: every class referenced)."""

    @classmethod
    def from_record(cls, recorded: dict[str, Any]) -> BankSources:
        # Banks built before negatives existed recorded one gt_field and no negative tag.
        return cls(
            ref_fields=list(recorded.get("ref_fields") or [recorded["gt_field"]]),
            ref_tag=recorded["ref_tag"],
            tag_type=recorded["tag_type"],
            negative_tag=recorded.get("negative_tag", "negative"),
            classes=recorded.get("requested_classes"),
        )

    def check(self, collection: Collection) -> None:
        if not self.ref_fields or not detection_fields(collection):
            raise PluginInputError(NO_FIELD_ROUTE)
        for field_name in self.ref_fields:
            require_detections_field(collection, field_name)
        require_tag(self.ref_tag)
        if self.tag_type not in ("sample", "label"):
            raise PluginInputError(f"tag_type must be 'sample' or 'label', got {self.tag_type!r}")
        if self.negative_tag == self.ref_tag:
            raise PluginInputError(
                f"The negative tag and the reference tag are both {self.ref_tag!r}; "
                "use two different tags"
            )

    def record(self) -> dict[str, Any]:
        return {
            "gt_field": self.ref_fields[0],
            "ref_fields": self.ref_fields,
            "ref_tag": self.ref_tag,
            "tag_type": self.tag_type,
            "negative_tag": self.negative_tag,
            "requested_classes": self.classes,
        }


@dataclass
class Entry:
    """A label the bank holds or will hold: a positive reference or a negative one."""

    instance: GroundTruthInstance | None
    negative: bool
    ref_id: str
    label: str
    vanished: bool = False
    """The label no longer exists; the entry is kept from the previous bank as it was."""
    field: str = ""
    """The ``fo.Detections`` field the label lies in ("" for a vanished entry)."""


NO_FIELD_ROUTE = (
    "This dataset has no fo.Detections field to take references from. Draw some in the App: "
    "open a sample, Annotate tab -> Add schema -> New field (Label, Detections, your classes) "
    "-> draw boxes -> tag them 'reference' (Edit form, or Explore) -> Build memory bank"
)


def _field_list(fields: FieldOrFields) -> list[str]:
    return [fields] if isinstance(fields, str) else list(fields)


def collect_entries(collection: Collection, sources: BankSources) -> list[Entry]:
    """The positive and negative references the sources designate now, in a stable order."""
    ensure_metadata(collection)
    negatives = []
    if sources.negative_tag:
        for field_name in detection_fields(collection):
            tagged = collection.select_labels(tags=sources.negative_tag, fields=field_name)
            negatives += [_entry(i, True, field_name) for i in iter_instances(tagged, field_name)]
    negative_ids = {e.ref_id for e in negatives}
    positives = []
    for field_name in sources.ref_fields:
        refs_view = reference_view(collection, field_name, sources.ref_tag, sources.tag_type)
        for instance in iter_instances(refs_view, field_name):
            if instance.ref_id not in negative_ids:
                positives.append(_entry(instance, False, field_name))
            elif sources.ref_tag in instance.detection.tags:
                raise PluginInputError(
                    f"Label {instance.label_id} of sample {instance.sample_id} is tagged both "
                    f"{sources.ref_tag!r} and {sources.negative_tag!r}; remove one of the tags"
                )
    if not positives:
        what = "sample" if sources.tag_type == "sample" else f"label of {sources.ref_fields}"
        raise ReferenceInputError(
            f"No reference found: no {what} is tagged {sources.ref_tag!r} "
            f"(tag_type={sources.tag_type!r}). Tag references first (in the App, or with "
            "'Sample references'), or pick the tag type you used"
        )
    return positives + negatives


def _entry(instance: GroundTruthInstance, negative: bool, field: str) -> Entry:
    label = instance.detection.label
    if not label or not str(label).strip():
        role = "negative" if negative else "reference"
        raise ReferenceInputError(
            f"The {role} label {instance.label_id} of sample {instance.sample_id} has no class "
            "(its label is empty): give it a class or untag it"
        )
    instance.box_xywh()  # refuses a missing or sub-pixel box now, with the label's id
    return Entry(instance, negative, instance.ref_id, str(label), field=field)


def _vanished_entries(
    dataset: fo.Dataset, previous: MemoryBank, wanted: list[Entry]
) -> list[Entry]:
    """Entries of ``previous`` whose label is gone from every field (kept, see the update)."""
    present = {e.ref_id for e in wanted}
    held = [(ref_id, False, k) for k, ref_id in enumerate(previous.ref_ids)]
    held += [(ref_id, True, k) for k, ref_id in enumerate(previous.negative_ids)]
    candidates = [(ref_id, neg, k) for ref_id, neg, k in held if ref_id not in present]
    if not candidates:
        return []
    existing = _existing_label_ids(dataset, {ref_id.split(":")[0] for ref_id, _, _ in candidates})
    vanished = []
    for ref_id, negative, k in candidates:
        if ref_id.split(":")[-1] in existing:
            continue  # the label is still there, untagged: the curator removed it
        labels = previous.negative_labels if negative else previous.labels
        label = previous.classes[int(labels[k])]
        vanished.append(Entry(None, negative, ref_id, label, vanished=True))
    return vanished


def _existing_label_ids(dataset: fo.Dataset, sample_ids: set[str]) -> set[str]:
    samples = dataset.select(sorted(s for s in sample_ids if ObjectId.is_valid(s)))
    ids: set[str] = set()
    for field_name in detection_fields(dataset):
        ids.update(i for i in samples.values(f"{field_name}.detections.id", unwind=True) if i)
    return ids


def _assemble(
    wanted: list[Entry],
    sources: BankSources,
    config: NTTConfig,
    previous: MemoryBank | None,
    full_masks: Mapping[str, np.ndarray] | None = None,
) -> Steps:
    """The bank of ``wanted``: features from ``previous`` where it holds the same entry, else
    encoded now (models load only then). Returns (bank, ids encoded now, how many entries are
    box-only labels, whose masks SAM2 made)."""
    classes, wanted = _keep_classes(wanted, sources)
    known = _known_features(previous)
    todo = [e for e in wanted if (e.ref_id, e.negative, e.label) not in known]
    yield 0.0, "Loading models" if todo else "Nothing new to encode"
    fresh: dict[tuple, tuple] = {}
    if todo:
        # A build checks every checkpoint now (segmentation will use them); an update, whose
        # config was checked at build time, loads SAM2 only for box-only labels.
        predictor = yield from load_predictor(config, load=previous is None)
        box_masks = _masks_from_boxes(predictor, [e.instance for e in todo])
        given = full_masks or {}
        references = [
            _reference(e.instance, given.get(e.instance.label_id, box_masks.get(k)), e.label)
            for k, e in enumerate(todo)
        ]
        yield 0.5, f"Encoding {len(references)} reference(s)"
        features = predictor.encode(references)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for k, e in enumerate(todo):
            fresh[(e.ref_id, e.negative, e.label)] = (features[k], now)
    rows = {**known, **fresh}
    positives = [e for e in wanted if not e.negative]
    negatives = [e for e in wanted if e.negative]
    channels = next(iter(rows.values()))[0].shape[-1]
    bank = MemoryBank.from_features(
        _stack([rows[(e.ref_id, False, e.label)][0] for e in positives], channels),
        labels=[e.label for e in positives],
        ref_ids=[e.ref_id for e in positives],
        encoder=encoder_identity(config),
        encoder_image_size=config.encoder_image_size,
        classes=classes,
        negatives=Negatives(
            features=_stack([rows[(e.ref_id, True, e.label)][0] for e in negatives], channels),
            labels=[e.label for e in negatives],
            ids=[e.ref_id for e in negatives],
            added=[rows[(e.ref_id, True, e.label)][1] for e in negatives],
        ),
        ref_added=[rows[(e.ref_id, False, e.label)][1] for e in positives],
    )
    box_only = sum(1 for e in wanted if e.instance and not e.instance.detection.has_mask)
    return bank, {key[0] for key in fresh}, box_only


def _keep_classes(wanted: list[Entry], sources: BankSources) -> tuple[list[str], list[Entry]]:
    """The bank's classes (those asked for, else every class referenced) and the entries of
    those classes; refuses a class asked for without a reference."""
    present = sorted({e.label for e in wanted if not e.negative})
    classes = sources.classes or present
    missing = [c for c in classes if c not in present]
    if missing:
        raise ReferenceInputError(
            f"Class(es) {missing} have no reference tagged {sources.ref_tag!r} in "
            f"{sources.ref_fields}; tag at least one instance of each, or leave them out "
            f"(tagged: {present})"
        )
    return classes, [e for e in wanted if e.label in classes]


def _known_features(bank: MemoryBank | None) -> dict[tuple, tuple]:
    """(ref id, negative, class) -> (feature, added) of the entries a bank holds."""
    if bank is None:
        return {}
    known = {}
    for k, ref_id in enumerate(bank.ref_ids):
        label = bank.classes[int(bank.labels[k])]
        known[(ref_id, False, label)] = (bank.features[k], bank.ref_added[k])
    for k, ref_id in enumerate(bank.negative_ids):
        label = bank.classes[int(bank.negative_labels[k])]
        known[(ref_id, True, label)] = (bank.negative_features[k], bank.negative_added[k])
    return known


def _stack(rows: list[torch.Tensor], channels: int) -> torch.Tensor:
    return torch.stack(rows) if rows else torch.zeros(0, channels)


def _reference(instance: GroundTruthInstance, mask: np.ndarray | None, label: str) -> Reference:
    """The instance as a reference; ``mask`` (SAM2's for a bare box, or a given full mask)
    replaces its own."""
    mask = mask if mask is not None else instance.full_mask()
    return Reference(
        image=instance.filepath,
        mask=mask,
        label=label,
        ref_id=instance.ref_id,
        box_xywh=instance.box_xywh(),
    )


def _store(
    dataset: fo.Dataset,
    bank_name: str,
    bank: MemoryBank,
    sources: BankSources,
    config: NTTConfig,
    box_only: int,
    overwrite: bool,
) -> None:
    """Records the bank as a custom run: its sources (so an update can re-read them) and data.

    The run's view is the samples of its positive references."""
    sample_ids = sorted({ref_id.split(":")[0] for ref_id in bank.ref_ids})
    run_config = dataset.select(sample_ids).init_run(
        method=BANK_METHOD,
        **sources.record(),
        classes=bank.classes,
        encoder=bank.encoder,
        num_references=len(bank),
        num_negatives=len(bank.negative_ids),
        masks_from_boxes=box_only,
        reference_ids=[ref_id.split(":")[-1] for ref_id in bank.ref_ids],
        negative_ids=[ref_id.split(":")[-1] for ref_id in bank.negative_ids],
        ntt_config=config.to_dict(),
    )
    # register_run before init_run_results: results can only attach to a registered key.
    register_run(dataset.select(sample_ids), bank_name, run_config, overwrite)
    save_results(dataset, bank_name, bank=bank.to_bytes())


def _describe(bank: MemoryBank) -> str:
    negatives = f", {len(bank.negative_ids)} negatives" if bank.negative_ids else ""
    return f"{len(bank)} references{negatives}, {len(bank.classes)} classes"


def check_new_bank_name(dataset: fo.Dataset, bank_name: str, overwrite: bool) -> None:
    """Refuses a bank name that is not a valid run key, or taken without ``overwrite``."""
    require_run_key(bank_name, "Bank name")
    require_free_run_key(dataset, bank_name, BANK_METHOD, overwrite, "memory bank")


def check_references(
    dataset_or_view: Collection,
    gt_field: FieldOrFields,
    ref_tag: str,
    tag_type: str,
    classes: list[str] | None = None,
    negative_tag: str | None = None,
) -> list[str]:
    """Refuses a build with no reference tagged, a reference without a class, a label tagged
    both ``ref_tag`` and ``negative_tag``, or a requested class without a reference; returns the
    classes the bank will hold (all tagged ones when ``classes`` is empty)."""
    fields = _field_list(gt_field)
    for name in fields:
        _refuse_classless_references(reference_view(dataset_or_view, name, ref_tag, tag_type), name)
    if negative_tag:
        _refuse_double_tags(dataset_or_view, ref_tag, negative_tag)
    present = sorted(
        {
            label
            for name in fields
            for label in reference_view(dataset_or_view, name, ref_tag, tag_type).distinct(
                f"{name}.detections.label"
            )
        }
    )
    where = repr(fields[0]) if len(fields) == 1 else str(fields)
    if not present:
        what = "sample" if tag_type == "sample" else f"{' or '.join(fields)} label"
        raise ReferenceInputError(
            f"No reference found: no {what} is tagged {ref_tag!r}. Tag references first (in the "
            "App, or with 'Sample references'), or pick the tag and tag type you used"
        )
    missing = [c for c in classes or [] if c not in present]
    if missing:
        raise ReferenceInputError(
            f"Class(es) {missing} have no reference tagged {ref_tag!r} in {where}; "
            f"tag at least one instance of each, or leave them out (tagged: {present})"
        )
    return list(classes) if classes else present


def _refuse_classless_references(references: Collection, field_name: str) -> None:
    ids, labels = references.values(
        [f"{field_name}.detections.id", f"{field_name}.detections.label"], unwind=True
    )
    blank = [i for i, label in zip(ids, labels) if not label or not str(label).strip()]
    if blank:
        raise ReferenceInputError(
            f"The reference label {blank[0]} of {field_name!r} has no class (its label is "
            f"empty){f' nor do {len(blank) - 1} other(s)' if len(blank) > 1 else ''}: give it "
            "a class or untag it"
        )


def _refuse_double_tags(collection: Collection, ref_tag: str, negative_tag: str) -> None:
    if negative_tag == ref_tag:
        raise PluginInputError(
            f"The negative tag and the reference tag are both {ref_tag!r}; use two different tags"
        )
    for field_name in detection_fields(collection):
        both = collection.select_labels(tags=ref_tag, fields=field_name).select_labels(
            tags=negative_tag, fields=field_name
        )
        ids = both.values(f"{field_name}.detections.id", unwind=True)
        if ids:
            raise PluginInputError(
                f"Label {ids[0]} of {field_name!r} is tagged both {ref_tag!r} and "
                f"{negative_tag!r}; remove one of the tags"
            )


def _masks_from_boxes(predictor: NTTPredictor, instances: list) -> dict[int, np.ndarray]:
    """SAM2 masks of the box-only instances, by position; each image is embedded once."""
    by_image: dict[str, list[int]] = {}
    for k, instance in enumerate(instances):
        if not instance.detection.has_mask:
            by_image.setdefault(instance.filepath, []).append(k)
    masks = {}
    for filepath, positions in by_image.items():
        boxes = [instances[k].box_xyxy() for k in positions]
        masks.update(zip(positions, predictor.masks_from_boxes(filepath, boxes)))
    return masks


REBUILD = "rebuild it: build a bank of that name again, replacing it"
"""Said by every refusal of a damaged bank; in any form's words (no option named, since the
Segment form's 'overwrite' is another option than the Build form's)."""


def load_memory_bank(dataset: fo.Dataset, bank_name: str) -> MemoryBank:
    require_bank(dataset, bank_name)
    blob = getattr(load_results(dataset, bank_name), "bank", None)
    if not isinstance(blob, bytes):
        raise BankError(
            f"Memory bank {bank_name!r} has no stored data (its build was interrupted?); {REBUILD}"
        )
    try:
        bank = MemoryBank.from_bytes(blob)
    except BankError as error:
        message = f"Memory bank {bank_name!r}: {error}; {REBUILD}"
        raise BankError(message) from error
    recorded = run_info(dataset, bank_name).config
    if (bank.classes, bank.encoder) != (list(recorded.classes), recorded.encoder):
        # The stored bytes were swapped or edited after the build: refuse rather than guess.
        raise BankMismatchError(
            f"Memory bank {bank_name!r} holds classes {bank.classes} from {bank.encoder!r}, but "
            f"its record says {list(recorded.classes)} from {recorded.encoder!r}; {REBUILD}"
        )
    return bank


def memory_bank_config(dataset: fo.Dataset, bank_name: str) -> dict[str, Any]:
    """What was recorded when the bank was built (fields, tag, models, reference ids)."""
    require_bank(dataset, bank_name)
    config = dict(run_info(dataset, bank_name).config.serialize())
    config.pop("cls", None)
    config.pop("type", None)
    return config


def delete_memory_bank(dataset: fo.Dataset, bank_name: str) -> dict[str, Any]:
    """Deletes the bank; returns what was removed (fields segmented with it are kept)."""
    recorded = memory_bank_config(dataset, bank_name)
    dataset.delete_run(bank_name)
    return {
        "deleted": bank_name,
        "classes": list(recorded["classes"]),
        "num_references": recorded["num_references"],
    }


def memory_bank_info(dataset: fo.Dataset, bank_name: str) -> dict[str, Any]:
    """Classes, references per class, encoder, and each class's reference quality summary.

    Quality is a reference's similarity to the other references of its class (in [0, 1]); the
    lowest one per class is named, since it is the first to check for a wrong or odd reference.
    ``blame`` says, per reference and field segmented with the bank, how many predictions it is
    the nearest reference of, and how many of those are false positives (``reference_blame``).
    """
    bank = load_memory_bank(dataset, bank_name)
    recorded = memory_bank_config(dataset, bank_name)
    sources = BankSources.from_record(recorded)
    quality = bank.reference_quality().numpy()
    labels = bank.labels.numpy()
    per_class = []
    for k, name in enumerate(bank.classes):
        members = np.flatnonzero(labels == k)
        scores = quality[members]
        row = {
            "class": name,
            "references": int(members.size),
            "negatives": bank.negatives_per_class[name],
        }
        if members.size > 1:
            worst = int(members[np.argmin(scores)])
            row |= {
                "mean_quality": round(float(scores.mean()), 4),
                "min_quality": round(float(scores.min()), 4),
                "lowest_reference": bank.ref_ids[worst],
            }
        per_class.append(row)
    return {
        "name": bank_name,
        "classes": bank.classes,
        "references_per_class": bank.references_per_class,
        "num_references": len(bank),
        "encoder": bank.encoder,
        "sam_model": recorded["ntt_config"]["sam_model"],
        "encoder_image_size": bank.encoder_image_size,
        "gt_field": recorded["gt_field"],
        "ref_fields": sources.ref_fields,
        "ref_tag": recorded["ref_tag"],
        "tag_type": recorded["tag_type"],
        "negative_tag": sources.negative_tag,
        "num_negatives": len(bank.negative_ids),
        "negatives_per_class": bank.negatives_per_class,
        "masks_from_boxes": recorded["masks_from_boxes"],
        "ntt_config": recorded["ntt_config"],
        "created": str(run_info(dataset, bank_name).timestamp),
        "quality": per_class,
        "blame": reference_blame(dataset, bank_name, bank),
    }
