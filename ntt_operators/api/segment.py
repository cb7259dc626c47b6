"""Step 3, segmentation: predict instance masks for target samples into a label field."""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import fiftyone as fo
import torch
from fiftyone.core.odm.utils import validate_field_name

from ntt_core import Instances, MemoryBank, NTTConfig, NTTError, NTTPredictor
from ntt_core.cache import file_checksum
from ntt_core.models import encoder_identity
from ntt_core.ray_backend import Result, predict_or_error, segment_on_ray

from .. import locks
from ..labels import (
    FieldWriter,
    ScoreEdit,
    declare_reasons,
    instance_reasons,
    instances_to_detections,
    prediction_ids,
)
from ..messages import sentence
from ..proposal_cache import Prefetched, ProposalCache
from .bank import load_memory_bank, memory_bank_config
from .common import (
    SEGMENT_METHOD,
    Collection,
    PluginInputError,
    Progress,
    Steps,
    drive_steps,
    holds_detections,
    load_predictor,
    root_dataset,
    source_samples,
)
from .records import (
    has_run,
    load_results,
    on_current_object,
    register_run,
    run_info,
    save_results,
)
from .rescore import Screen, Stamping, plan_stamping

RUNNING, COMPLETED, FAILED, CANCELLED = "running", "completed", "failed", "cancelled"
UNCHANGED = object()
"""A result that equals what the field holds (``rescore.Screen``): nothing to compare or write."""


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
    rescore: bool = False,
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

    ``reuse_proposals`` keeps each sample's proposals in the database (``proposal_cache``) and
    re-scores them when the same models see the same image again: after a bank changes, only the
    matching reruns (``clear_proposal_cache`` empties the dataset's cache). When every target is
    cached, no model is loaded at all.

    ``rescore`` updates an existing field of this plugin in place, the correction round's way:
    each prediction keeps its id and tags while its proposal survives (ids derive from the
    field, the sample and the mask), only samples whose predictions changed are written, and
    samples outside the targets (the references, accepted predictions included) are left as
    they are. A sample whose predictions all keep their masks gets only their new labels and
    confidences (counted in ``edited``; masks are not rewritten and the list keeps its order).
    Replacing a field (``overwrite`` or ``rescore``) deletes the evaluations computed on it,
    listed in ``deleted_evaluations``.
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
        rescore=rescore,
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
    rescore: bool = False,
) -> Steps:
    """``segment`` as progress steps; returns the summary."""
    dataset_or_view = source_samples(dataset_or_view)
    dataset = root_dataset(dataset_or_view)
    bank = load_memory_bank(dataset, bank_name)
    recorded = memory_bank_config(dataset, bank_name)
    run_key = segment_run_key(label_field)
    exists = check_output_field(dataset, bank_name, label_field, overwrite, skip_done, rescore)
    if batch_size < 1:
        raise PluginInputError(f"batch_size must be at least 1, got {batch_size}")
    check_backend(backend, num_actors, reuse_proposals)
    config = config or NTTConfig.from_dict(recorded["ntt_config"])
    targets = segment_targets(dataset_or_view, exclude_tag)
    todo = targets.exists(label_field, False) if (skip_done and exists) else targets
    previous = _previous_predictions(todo, label_field) if (rescore and exists) else None
    sample_ids, filepaths = todo.values(["id", "filepath"])
    skipped = len(targets) - len(sample_ids)

    # Refuse a bank from another encoder now, on either backend, not once per sample.
    bank.check_compatible(encoder_identity(config), config.encoder_image_size)
    timings = dict.fromkeys(("read_cache", "screen", "score", "compare", "write"), 0.0)
    stamping = None
    if backend == "ray":
        yield 0.0, "Loading models"
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
        cache = ProposalCache(dataset, config) if reuse_proposals else None
        # Re-scoring cached proposals needs no model: load them only when a target is new.
        all_cached = cache is not None and len(cache.present(sample_ids)) == len(sample_ids)
        yield 0.0, "Re-scoring cached proposals" if all_cached else "Loading models"
        predictor = yield from load_predictor(config, load=not all_cached)
        if cache is not None:
            screen = rescore and exists
            stamping = plan_stamping(dataset, run_key, bank, config, screen, label_field)
        results = _predict_locally(predictor, bank, sample_ids, filepaths, cache, timings, stamping)

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
        register_run(targets, run_key, run_config, overwrite=True)
        recorded_stamps = stamping.record() if stamping else {}
        _save_status(
            dataset,
            run_key,
            RUNNING,
            processed=0,
            skipped=skipped,
            failed={},
            instances=0,
            **recorded_stamps,
        )
        writer = FieldWriter(dataset, label_field, batch_size)
        failed: dict[str, str] = {}
        instances = unchanged = 0
        ended = None  # how the run ended, when it did not complete
        try:
            # A re-score changes the field only where it writes: its evaluations go only then.
            stale_now = exists and not rescore
            deleted_evaluations = _delete_evaluations(dataset, label_field) if stale_now else []
            if exists and not (skip_done or rescore):
                dataset.delete_sample_field(label_field)
            if not dataset.has_sample_field(label_field):
                dataset.add_sample_field(
                    label_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections
                )
            on_current_object(dataset, lambda: declare_reasons(dataset, label_field))
            for k, (sample_id, result, error) in enumerate(results):
                if error is not None:
                    failed[sample_id] = error
                elif result is UNCHANGED:
                    unchanged += 1
                    instances += len(previous.get(sample_id, ([], {}))[0])
                else:
                    instances += len(result)
                    with _timed(timings, "compare"):
                        detections = _detections(result, label_field, sample_id, previous)
                    if detections is None:
                        unchanged += 1
                    else:
                        with _timed(timings, "write"):
                            writer.add(sample_id, detections)
                yield (k + 1) / len(sample_ids), f"Segmented {k + 1}/{len(sample_ids)} samples"
        except (GeneratorExit, KeyboardInterrupt):
            ended = {"status": CANCELLED}
            raise
        except Exception as error:
            ended = {"status": FAILED, "error": sentence(error)}
            raise
        finally:
            # Whatever happens, finished samples are kept so skip_done can continue from them.
            with _timed(timings, "write"):
                writer.flush()
            if rescore and exists and writer.written:
                deleted_evaluations = _delete_evaluations(dataset, label_field)
            if ended is not None:
                # Only a killed process leaves "running" behind; skip_done continues any of them.
                counts = dict(processed=writer.written + unchanged, skipped=skipped, failed=failed)
                counts |= {"instances": instances, **recorded_stamps}
                _save_status(dataset, run_key, **ended, **counts)
        if stamping is not None:
            stamping.stamp_scored(cache, [i for i in sample_ids if i not in failed])
        summary = {
            "label_field": label_field,
            "bank_name": bank_name,
            "run_key": run_key,
            "processed": writer.written + unchanged,
            "written": writer.written,
            "edited": writer.edited,
            "unchanged": unchanged,
            "skipped": skipped,
            "failed": failed,
            "instances": instances,
            "models_loaded": backend == "ray" or predictor.models_loaded,
            "deleted_evaluations": deleted_evaluations,
            "screened_unchanged": stamping.screened if stamping else 0,
            "timings": {key: round(value, 3) for key, value in timings.items()},
        }
        counts = {k: summary[k] for k in _COUNTS}
        _save_status(dataset, run_key, COMPLETED, **counts, **recorded_stamps)
    finally:
        locks.release(dataset, label_field, owner)
    yield 1.0, f"Segmented {summary['processed']} samples into {label_field!r}"
    return summary


def segment_targets(dataset_or_view: Collection, exclude_tag: str | None) -> Collection:
    """The samples a run segments: those without ``exclude_tag`` (as a sample or label tag);
    refuses an empty target."""
    targets = dataset_or_view
    if exclude_tag:
        targets = targets.match_tags(exclude_tag, bool=False).match_labels(
            tags=exclude_tag, bool=False
        )
    if not len(targets):
        left_out = f" once samples tagged {exclude_tag!r} are left out" if exclude_tag else ""
        raise PluginInputError(
            f"No target sample: the view is empty{left_out}. Select or match the samples to segment"
        )
    return targets


@contextlib.contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[phase] += time.perf_counter() - start


Previous = dict[str, tuple[list, dict[str, list[str]]]]
"""sample id -> ((id, label, confidence, compared reasons) per prediction, label id -> tags)."""
COMPARED_REASONS = ("margin",)
"""The reasons compared with what the field holds (``margin``); each one read costs a column.
The others move only with the confidence (they are similarities to the prediction's own
class), except ``nearest_negative_similarity`` where a negative is no nearer than the class
prototype: then it has no effect on the prediction and may keep its old value (README)."""


def _previous_predictions(collection: Collection, label_field: str) -> Previous:
    """What the field holds now for ``collection``'s samples, without loading any mask."""
    path = f"{label_field}.detections"
    columns = collection.values(
        ["id", f"{path}.id", f"{path}.label", f"{path}.confidence", f"{path}.tags"]
        + [f"{path}.{name}" for name in COMPARED_REASONS]
    )
    previous = {}
    for sample_id, ids, labels, confidences, tags, *reasons in zip(*columns):
        ids, labels, confidences, tags = (v or [] for v in (ids, labels, confidences, tags))
        reasons = [v or [None] * len(ids) for v in reasons]
        rows = [
            (*row, tuple(v[k] for v in reasons))
            for k, row in enumerate(zip(ids, labels, confidences))
        ]
        previous[sample_id] = (rows, {i: t for i, t in zip(ids, tags) if t})
    return previous


def _detections(
    result: Instances, label_field: str, sample_id: str, previous: Previous | None
) -> fo.Detections | ScoreEdit | None:
    """What to write for the sample: None when its predictions equal what the field holds, a
    ``ScoreEdit`` when every new prediction is already there (same mask, so same id) with
    another label or confidence, else the new detections, with the tags of those that persist.
    """
    seed = f"{label_field}:{sample_id}"
    if previous is None:
        return instances_to_detections(result, seed=seed)
    rows, tags = previous.get(sample_id, ([], {}))
    ids = [str(i) for i in prediction_ids(seed, result.rles)]
    reasons = dict(zip(ids, instance_reasons(result)))
    compared = [tuple(why.get(name) for name in COMPARED_REASONS) for why in reasons.values()]
    new = dict(zip(ids, zip(result.label_names, map(float, result.scores), compared)))
    old = {label_id: (label, confidence, why) for label_id, label, confidence, why in rows}
    if new == old:
        return None
    if new.keys() <= old.keys():
        return ScoreEdit(
            labels={i: label for i, (label, _, _) in new.items() if label != old[i][0]},
            confidences={i: score for i, (_, score, _) in new.items() if score != old[i][1]},
            removed=[i for i in old if i not in new],
            reasons={i: why for i, why in reasons.items() if why},
        )
    detections = instances_to_detections(result, seed=seed)
    for detection in detections.detections:
        detection.tags = list(tags.get(detection.id, []))
    return detections


def evaluations_on(dataset: fo.Dataset, label_field: str) -> list[str]:
    """The keys of the evaluations computed on ``label_field`` (as predictions or truth): a run
    that replaces or re-scores the field deletes them."""
    keys = []
    for key in dataset.list_evaluations():
        config = dataset.get_evaluation_info(key).config
        if label_field in (getattr(config, "pred_field", None), getattr(config, "gt_field", None)):
            keys.append(key)
    return keys


def _delete_evaluations(dataset: fo.Dataset, label_field: str) -> list[str]:
    """Deletes the evaluations of ``label_field``: they describe predictions that are about to
    change. Returns their keys."""
    stale = evaluations_on(dataset, label_field)
    for key in stale:
        dataset.delete_evaluation(key)
    return stale


_COUNTS = ("processed", "skipped", "failed", "instances")


def _predict_locally(
    predictor: NTTPredictor,
    bank: MemoryBank,
    sample_ids: list[str],
    filepaths: list[str],
    cache: ProposalCache | None,
    timings: dict[str, float],
    stamping: Stamping | None = None,
) -> Iterator[Result]:
    """Per-sample results, cached proposals read ahead in batches; ``UNCHANGED`` for an image
    the bank change cannot affect (``rescore.Screen``)."""
    if cache is None:
        for sample_id, filepath in zip(sample_ids, filepaths):
            with _timed(timings, "score"):
                outcome = predict_or_error(predictor, filepath, bank)
            yield sample_id, *outcome
        return
    screen = stamping.screen if stamping else None
    label_field = stamping.label_field if stamping else None
    batches = _read_ahead(cache, sample_ids, filepaths, timings, screen, label_field)
    for keys, paths, store, kept in batches:
        records: dict[str, bytes] = {}
        for sample_id, filepath in zip(keys, paths):
            if sample_id in kept:
                yield sample_id, UNCHANGED, None
                continue
            cached = sample_id in store.blobs
            checksum = store.checksums.get(sample_id)
            record = store.record(sample_id)
            with _timed(timings, "score"), _one_thread() if cached else contextlib.nullcontext():
                outcome = predict_or_error(
                    predictor, filepath, bank, store, sample_id, checksum, record
                )
            made = outcome[0].decay_record if outcome[0] is not None else None
            if label_field and made is not None and made is not record:  # a new one
                records[sample_id] = made.to_bytes()
            yield sample_id, *outcome
        if label_field:
            cache.save_records(label_field, records)


def _read_ahead(
    cache: ProposalCache,
    sample_ids: list[str],
    filepaths: list[str],
    timings: dict[str, float],
    screen: Screen | None = None,
    stamped_field: str | None = None,
    batch: int = 128,
) -> Iterator[tuple[list[str], list[str], Prefetched, set[str]]]:
    """The samples in batches, each with the cache in front of it and the samples ``screen``
    leaves unchanged. Per batch of ``batch`` samples: stamps (for ``stamped_field``), image
    checksums, the screen's verdicts, then the entries of the samples it did not clear; the
    next batches are worked out in threads while this one is scored (``timings["read_cache"]``
    is the wait left, ``timings["screen"]`` the threads' screening). Hashing, reading and
    matrix products release the GIL, so the threads work beside the scoring."""
    starts = range(0, len(sample_ids), batch)
    batches = [(sample_ids[i : i + batch], filepaths[i : i + batch]) for i in starts]

    def read(keys: list[str], paths: list[str]) -> tuple[Prefetched, set[str]]:
        stamps = cache.stamps(keys, stamped_field) if stamped_field else {}
        checksums = {key: _checksum_or_none(path) for key, path in zip(keys, paths)}
        kept = set()
        if screen:
            with _timed(timings, "screen"):
                kept = screen.unchanged(cache, keys, stamps, checksums)
        blobs = cache.get_many([key for key in keys if key not in kept])
        cache.index_features(blobs)  # entries cached before the float16 rows existed
        return Prefetched(cache, blobs, stamps, checksums), kept

    # Two batches ahead, in two threads: while one waits on the disk or the database, the other
    # screens (a new negative's round is all reading and screening).
    with ThreadPoolExecutor(_READERS, thread_name_prefix="ntt-cache-read") as reader:
        pending = deque(reader.submit(read, *b) for b in batches[:_READERS])
        for index, (keys, paths) in enumerate(batches):
            with _timed(timings, "read_cache"):
                store, kept = pending.popleft().result()
            if index + _READERS < len(batches):
                pending.append(reader.submit(read, *batches[index + _READERS]))
            yield keys, paths, store, kept


_READERS = 2
"""Batches read ahead at once, each in its own thread."""


def _checksum_or_none(path: str) -> str | None:
    """None for a file that cannot be read: scoring it reports why, for that sample only."""
    try:
        return file_checksum(path)
    except NTTError:
        return None


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Scoring cached proposals works on tensors of a few hundred rows, where waking torch's
    thread pool costs more than the work (7x slower on a busy 2-core machine): one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_backend(backend: str, num_actors: int, reuse_proposals: bool) -> None:
    """Refuses a backend that cannot run here, or settings it cannot use."""
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
    infos = sorted((run_info(dataset, k) for k in keys), key=lambda i: i.timestamp)
    return [info.config.label_field for info in reversed(infos)]


def segment_status(dataset: fo.Dataset, label_field: str) -> dict[str, Any] | None:
    """The recorded status and counts of the run that wrote ``label_field`` (None: no record).

    ``status``: ``running`` (or a process killed while running), ``completed``, ``cancelled``
    or ``failed`` (then ``error`` says why). ``processed``: the samples written or found
    unchanged."""
    run_key = segment_run_key(label_field)
    if not has_run(dataset, run_key, SEGMENT_METHOD):
        return None
    results = load_results(dataset, run_key)
    status = {"status": results.status, **{k: getattr(results, k) for k in _COUNTS}}
    return status | ({"error": results.error} if results.status == FAILED else {})


def _save_status(dataset: fo.Dataset, run_key: str, status: str, **counts: Any) -> None:
    save_results(dataset, run_key, status=status, **counts)


def check_output_field(
    dataset: fo.Dataset,
    bank_name: str,
    label_field: str,
    overwrite: bool,
    skip_done: bool,
    rescore: bool = False,
) -> bool:
    """Refuses an output field that would clobber data or mix two banks' results; returns
    whether the field already exists. The Segment form shows the same refusal on the field."""
    recorded = memory_bank_config(dataset, bank_name)
    ref_fields = list(recorded.get("ref_fields") or [recorded["gt_field"]])
    exists = _check_output_field(dataset, label_field, ref_fields, overwrite, skip_done, rescore)
    if skip_done and exists:
        _require_same_bank(dataset, segment_run_key(label_field), label_field, bank_name)
    return exists


def _check_output_field(
    dataset: fo.Dataset,
    label_field: str,
    ref_fields: list[str],
    overwrite: bool,
    skip_done: bool,
    rescore: bool,
) -> bool:
    """Refuses an output field that would clobber data; returns whether it already exists."""
    if not label_field.isidentifier():
        raise PluginInputError(
            f"Output field {label_field!r} must be a new top-level field name (letters, digits, "
            "underscores; not starting with a digit)"
        )
    try:
        validate_field_name(label_field, media_type=dataset.media_type)
    except ValueError as error:
        raise PluginInputError(f"FiftyOne refuses output field {label_field!r}: {error}") from error
    if sum((overwrite, skip_done, rescore)) > 1:
        raise PluginInputError(
            "overwrite=True starts the field afresh, skip_done=True continues it and "
            "rescore=True updates it in place: choose one"
        )
    ours = has_run(dataset, segment_run_key(label_field), SEGMENT_METHOD)
    if label_field in ref_fields and not (rescore and ours):
        # Its references (accepted predictions included) would be deleted or mixed up.
        hint = " (or rescore=True to update it in place)" if ours else ""
        raise PluginInputError(
            f"Output field {label_field!r} is a reference (ground-truth) field of the bank: it "
            f"is never replaced; pick a new name{hint}"
        )
    if not dataset.has_sample_field(label_field):
        return False
    if not holds_detections(dataset, label_field):
        raise PluginInputError(
            f"Field {label_field!r} already exists and does not hold fo.Detections; pick a new name"
        )
    if rescore and not ours:
        raise PluginInputError(
            f"Field {label_field!r} was not written by this plugin, so it cannot be re-scored in "
            "place; pick a new name"
        )
    if not (overwrite or skip_done or rescore):
        raise PluginInputError(
            f"Field {label_field!r} already exists: set overwrite=True to replace it, "
            "set rescore=True to update it in place, set skip_done=True to continue it, or pick "
            "a new name"
        )
    return True


def _require_same_bank(dataset: fo.Dataset, run_key: str, label_field: str, bank: str) -> None:
    if not has_run(dataset, run_key, SEGMENT_METHOD):
        raise PluginInputError(
            f"Field {label_field!r} was not written by this plugin, so it cannot be continued; "
            "set overwrite=True instead, or pick a new name"
        )
    recorded = run_info(dataset, run_key).config.bank_name
    if recorded != bank:
        raise PluginInputError(
            f"Field {label_field!r} was written with memory bank {recorded!r}, not {bank!r}; "
            "continue with the same bank, set overwrite=True instead, or pick a new name"
        )
