"""Step 2, the memory bank: encode tagged references, stored as a custom run of the dataset."""

from __future__ import annotations

from typing import Any, Literal

import fiftyone as fo
import numpy as np

from ntt_core import MemoryBank, NTTConfig, NTTPredictor, Reference
from ntt_core.errors import BankError, BankMismatchError, ReferenceInputError

from ..labels import ensure_metadata, iter_instances
from .common import (
    BANK_METHOD,
    Collection,
    Progress,
    Steps,
    drive_steps,
    load_predictor,
    require_bank,
    require_detections_field,
    require_free_run_key,
    require_run_key,
    root_dataset,
)
from .references import reference_view


def build_memory_bank(
    dataset_or_view: Collection,
    gt_field: str,
    bank_name: str,
    ref_tag: str = "reference",
    tag_type: Literal["sample", "label"] = "label",
    classes: list[str] | None = None,
    config: NTTConfig | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> MemoryBank:
    """Encodes the tagged references of ``gt_field`` and stores the bank as run ``bank_name``.

    ``tag_type="sample"``: every instance of the samples tagged ``ref_tag``;
    ``"label"``: only the instances tagged ``ref_tag``. Instances without a mask get SAM2's mask
    for their box. ``config`` defaults to the paper's (``NTTConfig()``).
    """
    return drive_steps(
        iter_build_memory_bank(
            dataset_or_view, gt_field, bank_name, ref_tag, tag_type, classes, config, overwrite
        ),
        progress,
    )


def iter_build_memory_bank(
    dataset_or_view: Collection,
    gt_field: str,
    bank_name: str,
    ref_tag: str = "reference",
    tag_type: Literal["sample", "label"] = "label",
    classes: list[str] | None = None,
    config: NTTConfig | None = None,
    overwrite: bool = False,
) -> Steps:
    """``build_memory_bank`` as progress steps; returns the bank."""
    dataset = root_dataset(dataset_or_view)
    require_detections_field(dataset_or_view, gt_field)
    check_new_bank_name(dataset, bank_name, overwrite)
    classes = check_references(dataset_or_view, gt_field, ref_tag, tag_type, classes)
    refs_view = reference_view(dataset_or_view, gt_field, ref_tag, tag_type)
    ensure_metadata(refs_view)
    instances = list(iter_instances(refs_view, gt_field))
    instances = [i for i in instances if i.detection.label in classes]
    config = config or NTTConfig()

    yield 0.0, "Loading models"
    predictor = yield from load_predictor(config)
    box_masks = _masks_from_boxes(predictor, instances)
    references = []
    for k, instance in enumerate(instances):
        mask = box_masks[k] if k in box_masks else instance.full_mask()
        references.append(
            Reference(
                image=instance.filepath,
                mask=mask,
                label=instance.detection.label,
                ref_id=instance.ref_id,
                box_xywh=instance.box_xywh(),
            )
        )
        yield 0.5 * (k + 1) / len(instances), f"Prepared {k + 1}/{len(instances)} references"
    yield 0.5, f"Encoding {len(references)} references"
    bank = predictor.build_bank(references, classes)
    run_config = refs_view.init_run(
        method=BANK_METHOD,
        gt_field=gt_field,
        ref_tag=ref_tag,
        tag_type=tag_type,
        classes=bank.classes,
        encoder=bank.encoder,
        num_references=len(bank),
        masks_from_boxes=len(box_masks),
        reference_ids=[i.label_id for i in instances],
        ntt_config=config.to_dict(),
    )
    # register_run before init_run_results: results can only attach to a registered key.
    refs_view.register_run(bank_name, run_config, overwrite=overwrite)
    dataset.save_run_results(bank_name, dataset.init_run_results(bank_name, bank=bank.to_bytes()))
    yield 1.0, f"Memory bank {bank_name!r}: {len(bank)} references, {len(bank.classes)} classes"
    return bank


def check_new_bank_name(dataset: fo.Dataset, bank_name: str, overwrite: bool) -> None:
    """Refuses a bank name that is not a valid run key, or taken without ``overwrite``."""
    require_run_key(bank_name, "Bank name")
    require_free_run_key(dataset, bank_name, BANK_METHOD, overwrite, "memory bank")


def check_references(
    dataset_or_view: Collection,
    gt_field: str,
    ref_tag: str,
    tag_type: str,
    classes: list[str] | None = None,
) -> list[str]:
    """Refuses a build with no reference tagged, or a requested class without one; returns the
    classes the bank will hold (all tagged ones when ``classes`` is empty)."""
    refs_view = reference_view(dataset_or_view, gt_field, ref_tag, tag_type)
    present = sorted(refs_view.distinct(f"{gt_field}.detections.label"))
    if not present:
        what = "sample" if tag_type == "sample" else f"{gt_field} label"
        raise ReferenceInputError(
            f"No reference found: no {what} is tagged {ref_tag!r}. Tag references first (e.g. "
            "with 'Sample references'), or pick the tag and tag type you used"
        )
    missing = [c for c in classes or [] if c not in present]
    if missing:
        raise ReferenceInputError(
            f"Class(es) {missing} have no reference tagged {ref_tag!r} in {gt_field!r}; "
            f"tag at least one instance of each, or leave them out (tagged: {present})"
        )
    return list(classes) if classes else present


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


def load_memory_bank(dataset: fo.Dataset, bank_name: str) -> MemoryBank:
    require_bank(dataset, bank_name)
    results = dataset.load_run_results(bank_name, cache=False, load_view=False)
    blob = getattr(results, "bank", None)
    if not isinstance(blob, bytes):
        raise BankError(
            f"Memory bank {bank_name!r} has no stored data (its build was interrupted?); "
            "rebuild it with overwrite=True"
        )
    try:
        bank = MemoryBank.from_bytes(blob)
    except BankError as error:
        message = f"Memory bank {bank_name!r}: {error}; rebuild it with overwrite=True"
        raise BankError(message) from error
    recorded = dataset.get_run_info(bank_name).config
    if (bank.classes, bank.encoder) != (list(recorded.classes), recorded.encoder):
        # The stored bytes were swapped or edited after the build: refuse rather than guess.
        raise BankMismatchError(
            f"Memory bank {bank_name!r} holds classes {bank.classes} from {bank.encoder!r}, but "
            f"its record says {list(recorded.classes)} from {recorded.encoder!r}; rebuild it "
            "with overwrite=True"
        )
    return bank


def memory_bank_config(dataset: fo.Dataset, bank_name: str) -> dict[str, Any]:
    """What was recorded when the bank was built (fields, tag, models, reference ids)."""
    require_bank(dataset, bank_name)
    config = dict(dataset.get_run_info(bank_name).config.serialize())
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
    """
    bank = load_memory_bank(dataset, bank_name)
    recorded = memory_bank_config(dataset, bank_name)
    quality = bank.reference_quality().numpy()
    labels = bank.labels.numpy()
    per_class = []
    for k, name in enumerate(bank.classes):
        members = np.flatnonzero(labels == k)
        scores = quality[members]
        row = {"class": name, "references": int(members.size)}
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
        "ref_tag": recorded["ref_tag"],
        "tag_type": recorded["tag_type"],
        "masks_from_boxes": recorded["masks_from_boxes"],
        "ntt_config": recorded["ntt_config"],
        "created": str(dataset.get_run_info(bank_name).timestamp),
        "quality": per_class,
    }
