"""The plugin's four steps as plain functions over a dataset or view (the operators call these).

1. ``sample_references``: tag N references per class, the paper's few-shot way.
2. ``build_memory_bank``: encode the tagged references; the bank is a custom run on the dataset.
3. ``segment``: predict instance masks for target samples into a new ``fo.Detections`` field.
4. ``evaluate``: COCO-style mask evaluation with per-sample TP/FP/FN.

Every refusal is raised before the dataset is changed. The heavy steps also exist as generators
(``iter_build_memory_bank``, ``iter_segment``) that yield ``(fraction, label)`` progress steps and
return the result, so the App can stream a progress bar without threads.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Generator, Iterator, Mapping
from typing import Any, Literal

import fiftyone as fo
import numpy as np

from ntt_core import MemoryBank, NTTConfig, NTTError, NTTPredictor, Reference
from ntt_core.cache import ProposalStore
from ntt_core.errors import BankError, BankMismatchError, ReferenceInputError
from ntt_core.fewshot import sample_references as sample_annotations
from ntt_core.models import encoder_identity
from ntt_core.ray_backend import Result, predict_or_error, segment_on_ray

from . import locks
from .labels import (
    FieldWriter,
    annotations,
    ensure_metadata,
    instances_to_detections,
    iter_instances,
)
from .proposal_cache import proposal_store

Collection = fo.core.collections.SampleCollection
Progress = Callable[[float, str], None]
Steps = Generator[tuple[float, str], None, Any]

BANK_METHOD = "ntt_memory_bank"
SEGMENT_METHOD = "ntt_segment"
RUNNING, COMPLETED = "running", "completed"


class PluginInputError(NTTError, ValueError):
    """A dataset-level input is unusable (missing field, name clash, nothing tagged, ...)."""


# -- 1. references ----------------------------------------------------------------------------


def sample_references(
    dataset_or_view: Collection,
    gt_field: str,
    shots: int,
    seed: int = 33,
    tag: str = "reference",
    classes: list[str] | None = None,
    tag_samples: bool = True,
    tag_labels: bool = True,
) -> dict[str, list[str]]:
    """Picks ``shots`` references per class with the paper's few-shot sampling and tags them.

    The tag is first removed from the collection's samples and ``gt_field`` labels, so after the
    call it marks exactly this draw; the same seed on the same collection draws the same labels.
    Returns class -> label ids.
    """
    _require_detections_field(dataset_or_view, gt_field)
    _require_tag(tag)
    if not (tag_samples or tag_labels):
        raise PluginInputError("Choose to tag the reference samples, their labels, or both")
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
    return label_ids


# -- 2. memory bank ---------------------------------------------------------------------------


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
    full_masks: Mapping[str, np.ndarray] | None = None,
) -> MemoryBank:
    """Encodes the tagged references of ``gt_field`` and stores the bank as run ``bank_name``.

    ``tag_type="sample"``: every instance of the samples tagged ``ref_tag``;
    ``"label"``: only the instances tagged ``ref_tag``. Instances without a mask get SAM2's mask
    for their box. ``config`` defaults to the paper's (``NTTConfig()``). ``full_masks``
    (full-resolution bool masks by label id) replace the labels' own box-cropped masks: the
    COCO protocol passes pycocotools' ``annToMask``, which may reach outside the rounded box
    that FiftyOne crops to.
    """
    return drive_steps(
        iter_build_memory_bank(
            dataset_or_view,
            gt_field,
            bank_name,
            ref_tag,
            tag_type,
            classes,
            config,
            overwrite,
            full_masks,
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
    full_masks: Mapping[str, np.ndarray] | None = None,
) -> Steps:
    """``build_memory_bank`` as progress steps; returns the bank."""
    dataset = _root(dataset_or_view)
    _require_detections_field(dataset_or_view, gt_field)
    _require_run_key(bank_name, "Bank name")
    _require_free_run_key(dataset, bank_name, BANK_METHOD, overwrite, "memory bank")
    refs_view = reference_view(dataset_or_view, gt_field, ref_tag, tag_type)
    ensure_metadata(refs_view)
    instances = list(iter_instances(refs_view, gt_field))
    if not instances:
        raise ReferenceInputError(
            f"No reference found: no {'sample' if tag_type == 'sample' else gt_field + ' label'} "
            f"is tagged {ref_tag!r} (tag_type={tag_type!r}). Tag references first, e.g. with "
            "'Sample references', or pick the tag type you used"
        )
    present = sorted({i.detection.label for i in instances})
    classes = list(classes) if classes else present
    missing = [c for c in classes if c not in present]
    if missing:
        raise ReferenceInputError(
            f"Class(es) {missing} have no reference tagged {ref_tag!r} in {gt_field!r}; "
            f"tag at least one instance of each, or leave them out (tagged: {present})"
        )
    instances = [i for i in instances if i.detection.label in classes]
    config = config or NTTConfig()

    yield 0.0, "Loading models"
    predictor = NTTPredictor(config)
    box_masks = _masks_from_boxes(predictor, instances)
    references = []
    for k, instance in enumerate(instances):
        if full_masks is not None and instance.label_id in full_masks:
            mask = full_masks[instance.label_id]
        else:
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


def reference_view(
    dataset_or_view: Collection, gt_field: str, ref_tag: str, tag_type: str
) -> fo.DatasetView:
    """The references as a view: tagged samples, or only the tagged labels of ``gt_field``."""
    _require_tag(ref_tag)
    if tag_type == "sample":
        return dataset_or_view.match_tags(ref_tag)
    if tag_type == "label":
        return dataset_or_view.select_labels(tags=ref_tag, fields=gt_field)
    raise PluginInputError(f"tag_type must be 'sample' or 'label', got {tag_type!r}")


def list_memory_banks(dataset: fo.Dataset) -> list[str]:
    return dataset.list_runs(method=BANK_METHOD)


def load_memory_bank(dataset: fo.Dataset, bank_name: str) -> MemoryBank:
    _require_bank(dataset, bank_name)
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
    _require_bank(dataset, bank_name)
    config = dict(dataset.get_run_info(bank_name).config.serialize())
    config.pop("cls", None)
    config.pop("type", None)
    return config


def delete_memory_bank(dataset: fo.Dataset, bank_name: str) -> None:
    _require_bank(dataset, bank_name)
    dataset.delete_run(bank_name)


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
        "encoder_image_size": bank.encoder_image_size,
        "gt_field": recorded["gt_field"],
        "ref_tag": recorded["ref_tag"],
        "tag_type": recorded["tag_type"],
        "masks_from_boxes": recorded["masks_from_boxes"],
        "ntt_config": recorded["ntt_config"],
        "created": str(dataset.get_run_info(bank_name).timestamp),
        "quality": per_class,
    }


# -- 3. segmentation --------------------------------------------------------------------------


def segment_run_key(label_field: str) -> str:
    """The run that records how ``label_field`` was produced."""
    return f"ntt_segment_{label_field}"


def segment(
    dataset_or_view: Collection,
    bank_name: str,
    label_field: str,
    exclude_tag: str | None = "reference",
    overwrite: bool = False,
    skip_done: bool = False,
    config: NTTConfig | None = None,
    batch_size: int = 16,
    progress: Progress | None = None,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    num_actors: int = 2,
    gpus_per_actor: float | None = None,
    reuse_proposals: bool = False,
) -> dict[str, Any]:
    """Predicts instance masks for every target sample into ``label_field`` (``fo.Detections``).

    Targets are ``dataset_or_view`` minus samples carrying ``exclude_tag`` (as a sample tag or on
    any label). ``overwrite`` replaces an existing field; ``skip_done`` continues an interrupted
    run into the same field. ``config`` defaults to the one the bank was built with. A sample
    that fails (unreadable image, ...) is listed in ``failed`` and left empty; the run goes on.
    Returns ``processed``, ``skipped``, ``failed`` ({sample id: message}) and ``instances``.

    ``backend="ray"`` predicts on Ray Data actors (``num_actors``, ``gpus_per_actor``; the cluster
    at ``ray_address``, else a local one) with the same per-image function, and this process
    writes their results; see ``ntt_core.ray_backend.segment_on_ray``.

    ``reuse_proposals`` keeps each sample's proposals in the dataset's execution store and
    re-scores them when the same models see the same image again: after a bank changes, only the
    matching reruns (``clear_proposal_cache`` empties the store).
    """
    steps = iter_segment(
        dataset_or_view,
        bank_name,
        label_field,
        exclude_tag=exclude_tag,
        overwrite=overwrite,
        skip_done=skip_done,
        config=config,
        batch_size=batch_size,
        backend=backend,
        ray_address=ray_address,
        num_actors=num_actors,
        gpus_per_actor=gpus_per_actor,
        reuse_proposals=reuse_proposals,
    )
    return drive_steps(steps, progress)


def iter_segment(
    dataset_or_view: Collection,
    bank_name: str,
    label_field: str,
    exclude_tag: str | None = "reference",
    overwrite: bool = False,
    skip_done: bool = False,
    config: NTTConfig | None = None,
    batch_size: int = 16,
    backend: Literal["local", "ray"] = "local",
    ray_address: str | None = None,
    num_actors: int = 2,
    gpus_per_actor: float | None = None,
    reuse_proposals: bool = False,
) -> Steps:
    """``segment`` as progress steps; returns the summary."""
    dataset = _root(dataset_or_view)
    bank = load_memory_bank(dataset, bank_name)
    recorded = memory_bank_config(dataset, bank_name)
    run_key = segment_run_key(label_field)
    exists = _check_output_field(dataset, label_field, recorded["gt_field"], overwrite, skip_done)
    if skip_done and exists:
        _require_same_bank(dataset, run_key, label_field, bank_name)
    if batch_size < 1:
        raise PluginInputError(f"batch_size must be at least 1, got {batch_size}")
    _check_backend(backend, num_actors, reuse_proposals)
    config = config or NTTConfig.from_dict(recorded["ntt_config"])
    targets = dataset_or_view
    if exclude_tag:
        targets = targets.match_tags(exclude_tag, bool=False).match_labels(
            tags=exclude_tag, bool=False
        )
    todo = targets.exists(label_field, False) if (skip_done and exists) else targets
    sample_ids, filepaths = todo.values(["id", "filepath"])
    skipped = len(targets) - len(sample_ids)
    if not len(targets):
        left_out = f" once samples tagged {exclude_tag!r} are left out" if exclude_tag else ""
        raise PluginInputError(
            f"No target sample: the view is empty{left_out}. Select or match the samples to segment"
        )

    # Refuse a bank from another encoder now, on either backend, not once per sample.
    bank.check_compatible(encoder_identity(config), config.encoder_image_size)
    yield 0.0, "Loading models"
    if backend == "ray":
        # Lazy: the actors start when the loop below asks for the first result.
        results = segment_on_ray(
            list(zip(sample_ids, filepaths)),
            bank.to_bytes(),
            config,
            num_actors=num_actors,
            gpus_per_actor=gpus_per_actor,
            address=ray_address,
        )
    else:
        predictor = NTTPredictor(config)
        store = proposal_store(dataset, config) if reuse_proposals else None
        results = _predict_locally(predictor, bank, sample_ids, filepaths, store)

    # One writer per field: a second run would interleave its samples and its run record.
    owner = locks.acquire(dataset, label_field)
    try:
        run_config = targets.init_run(
            method=SEGMENT_METHOD,
            bank_name=bank_name,
            label_field=label_field,
            gt_field=recorded["gt_field"],
            exclude_tag=exclude_tag,
            ntt_config=config.to_dict(),
        )
        # The record says "running" before the field changes, so a partial field never looks done.
        targets.register_run(run_key, run_config, overwrite=True)
        _save_status(
            dataset, run_key, RUNNING, processed=0, skipped=skipped, failed={}, instances=0
        )
        if exists and not skip_done:
            dataset.delete_sample_field(label_field)
        if not dataset.has_sample_field(label_field):
            dataset.add_sample_field(
                label_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
            )

        writer = FieldWriter(dataset, label_field, batch_size)
        failed: dict[str, str] = {}
        instances = 0
        try:
            for k, (sample_id, result, error) in enumerate(results):
                if error is not None:
                    failed[sample_id] = error
                else:
                    writer.add(sample_id, instances_to_detections(result))
                    instances += len(result)
                yield (k + 1) / len(sample_ids), f"Segmented {k + 1}/{len(sample_ids)} samples"
        finally:
            # Whatever happens, finished samples are kept so skip_done can continue from them.
            writer.flush()
        summary = {
            "label_field": label_field,
            "bank_name": bank_name,
            "run_key": run_key,
            "processed": writer.written,
            "skipped": skipped,
            "failed": failed,
            "instances": instances,
        }
        _save_status(dataset, run_key, COMPLETED, **{k: summary[k] for k in _COUNTS})
    finally:
        locks.release(dataset, label_field, owner)
    yield 1.0, f"Segmented {writer.written} samples into {label_field!r}"
    return summary


_COUNTS = ("processed", "skipped", "failed", "instances")


def _predict_locally(
    predictor: NTTPredictor,
    bank: MemoryBank,
    sample_ids: list[str],
    filepaths: list[str],
    store: ProposalStore | None,
) -> Iterator[Result]:
    for sample_id, filepath in zip(sample_ids, filepaths):
        yield sample_id, *predict_or_error(predictor, filepath, bank, store, sample_id)


def _check_backend(backend: str, num_actors: int, reuse_proposals: bool) -> None:
    if backend not in ("local", "ray"):
        raise PluginInputError(f"backend must be 'local' or 'ray', got {backend!r}")
    if backend == "ray" and importlib.util.find_spec("ray") is None:
        raise PluginInputError("backend='ray' needs the optional extra: pip install .[ray]")
    if num_actors < 1:
        raise PluginInputError(f"num_actors must be at least 1, got {num_actors}")
    if backend == "ray" and reuse_proposals:
        # Ray workers never talk to MongoDB, where the cache lives.
        raise PluginInputError("reuse_proposals works with backend='local' only")


def segmented_fields(dataset: fo.Dataset) -> list[str]:
    """The fields this plugin has written predictions to, newest first."""
    keys = dataset.list_runs(method=SEGMENT_METHOD)
    infos = sorted((dataset.get_run_info(k) for k in keys), key=lambda i: i.timestamp)
    return [info.config.label_field for info in reversed(infos)]


def segment_status(dataset: fo.Dataset, label_field: str) -> dict[str, Any] | None:
    """The recorded status and counts of the run that wrote ``label_field`` (None: no record)."""
    run_key = segment_run_key(label_field)
    if run_key not in dataset.list_runs(method=SEGMENT_METHOD):
        return None
    results = dataset.load_run_results(run_key, cache=False, load_view=False)
    return {"status": results.status, **{k: getattr(results, k) for k in _COUNTS}}


def _save_status(dataset: fo.Dataset, run_key: str, status: str, **counts: Any) -> None:
    results = dataset.init_run_results(run_key, status=status, **counts)
    dataset.save_run_results(run_key, results, overwrite=True, cache=False)


def _check_output_field(
    dataset: fo.Dataset, label_field: str, gt_field: str, overwrite: bool, skip_done: bool
) -> bool:
    """Refuses an output field that would clobber data; returns whether it already exists."""
    if not label_field.isidentifier():
        raise PluginInputError(
            f"Output field {label_field!r} must be a new top-level field name (letters, digits, "
            "underscores; not starting with a digit)"
        )
    if label_field == gt_field:
        raise PluginInputError(
            f"Output field {label_field!r} is the bank's ground-truth field; pick a new name"
        )
    if overwrite and skip_done:
        raise PluginInputError(
            "overwrite and skip_done contradict each other: overwrite starts the field afresh, "
            "skip_done continues it. Choose one"
        )
    if not dataset.has_sample_field(label_field):
        return False
    if not _holds_detections(dataset, label_field):
        raise PluginInputError(
            f"Field {label_field!r} already exists and does not hold fo.Detections; pick a new name"
        )
    if not (overwrite or skip_done):
        raise PluginInputError(
            f"Field {label_field!r} already exists: pass overwrite=True to replace it, "
            "skip_done=True to continue it, or pick a new name"
        )
    return True


def _require_same_bank(dataset: fo.Dataset, run_key: str, label_field: str, bank: str) -> None:
    if run_key not in dataset.list_runs(method=SEGMENT_METHOD):
        raise PluginInputError(
            f"Field {label_field!r} was not written by this plugin, so it cannot be continued; "
            "use overwrite=True or a new name"
        )
    recorded = dataset.get_run_info(run_key).config.bank_name
    if recorded != bank:
        raise PluginInputError(
            f"Field {label_field!r} was written with memory bank {recorded!r}, not {bank!r}; "
            "continue with the same bank, or use overwrite=True or a new field"
        )


# -- 4. evaluation ----------------------------------------------------------------------------


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
    _require_detections_field(dataset_or_view, pred_field)
    _require_detections_field(dataset_or_view, gt_field)
    _require_run_key(eval_key, "Evaluation key")
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


# -- shared checks and helpers ----------------------------------------------------------------


def drive_steps(steps: Steps, progress: Progress | None) -> Any:
    """Runs an ``iter_*`` step generator to its end, forwarding its steps to ``progress``;
    returns the generator's result."""
    try:
        while True:
            try:
                fraction, label = next(steps)
            except StopIteration as done:
                return done.value
            if progress is not None:
                progress(fraction, label)
    finally:
        # An interrupted caller (an exception in ``progress``, Ctrl-C) still lets the steps
        # clean up now, e.g. write the samples already segmented.
        steps.close()


def _root(dataset_or_view: Collection) -> fo.Dataset:
    if isinstance(dataset_or_view, fo.Dataset):
        return dataset_or_view
    return dataset_or_view._root_dataset


def _require_detections_field(collection: Collection, field_name: str) -> None:
    if not collection.has_sample_field(field_name):
        raise PluginInputError(
            f"Field {field_name!r} does not exist; label fields: {detection_fields(collection)}"
        )
    if not _holds_detections(collection, field_name):
        raise PluginInputError(
            f"Field {field_name!r} is not an fo.Detections field; instance fields: "
            f"{detection_fields(collection)}"
        )


def _holds_detections(collection: Collection, field_name: str) -> bool:
    field = collection.get_field(field_name)
    return isinstance(field, fo.EmbeddedDocumentField) and issubclass(
        field.document_type, fo.Detections
    )


def detection_fields(collection: Collection) -> list[str]:
    """Top-level ``fo.Detections`` fields of a collection."""
    schema = collection.get_field_schema(embedded_doc_type=fo.Detections)
    return sorted(schema)


def _require_tag(tag: str) -> None:
    if not tag or not tag.strip():
        raise PluginInputError("The reference tag must not be empty")


def _require_run_key(key: str, what: str) -> None:
    if not key.isidentifier():
        raise PluginInputError(
            f"{what} {key!r} is not valid: use letters, digits and underscores, not starting "
            "with a digit (e.g. 'bank_5shot')"
        )


def _require_free_run_key(
    dataset: fo.Dataset, key: str, method: str, overwrite: bool, what: str
) -> None:
    if key not in dataset.list_runs():
        return
    if key not in dataset.list_runs(method=method):
        raise PluginInputError(f"Run key {key!r} is taken by another kind of run; pick a new name")
    if not overwrite:
        raise PluginInputError(
            f"A {what} named {key!r} already exists: pass overwrite=True or pick a new name"
        )


def _require_bank(dataset: fo.Dataset, bank_name: str) -> None:
    if bank_name not in list_memory_banks(dataset):
        raise BankError(
            f"No memory bank named {bank_name!r} on dataset {dataset.name!r}; "
            f"existing banks: {list_memory_banks(dataset)}. Build one with 'Build memory bank'"
        )


__all__ = [
    "BANK_METHOD",
    "SEGMENT_METHOD",
    "PluginInputError",
    "build_memory_bank",
    "class_report",
    "delete_memory_bank",
    "detection_fields",
    "drive_steps",
    "evaluate",
    "iter_build_memory_bank",
    "iter_segment",
    "list_memory_banks",
    "load_memory_bank",
    "memory_bank_config",
    "memory_bank_info",
    "reference_view",
    "sample_references",
    "segment",
    "segment_run_key",
    "segment_status",
    "segmented_fields",
]
