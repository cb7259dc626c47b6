"""Checks and helpers shared by the steps: field and name checks, progress driving.

Every check raises ``PluginInputError`` (or an engine error) with a message that says what to do,
before anything in the dataset changes.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fiftyone as fo

from ntt_core import NTTConfig, NTTError, NTTPredictor
from ntt_core.errors import BankError

from .records import has_run

Collection = fo.core.collections.SampleCollection
Progress = Callable[[float, str], None]
Steps = Generator[tuple[float, str], None, Any]

BANK_METHOD = "ntt_memory_bank"
SEGMENT_METHOD = "ntt_segment"


class PluginInputError(NTTError, ValueError):
    """A dataset-level input is unusable (missing field, name clash, nothing tagged, ...)."""


def mapped_steps(steps: Steps, each: Callable[[float, str], Any]) -> Generator[Any, None, Any]:
    """Yields ``each(fraction, label)`` for every step; returns the steps' result. Closing it
    closes the steps, so an interrupted run still lets them clean up (write what is done)."""
    try:
        while True:
            try:
                fraction, label = next(steps)
            except StopIteration as done:
                return done.value
            yield each(fraction, label)
    finally:
        steps.close()


def drive_steps(steps: Steps, progress: Progress | None) -> Any:
    """Runs an ``iter_*`` step generator to its end, forwarding its steps to ``progress``;
    returns the generator's result. An interrupted caller (an exception in ``progress``,
    Ctrl-C) still lets the steps clean up now, e.g. write the samples already segmented."""
    forwarded = mapped_steps(steps, progress or (lambda fraction, label: None))
    try:
        while True:
            next(forwarded)
    except StopIteration as done:
        return done.value
    finally:
        forwarded.close()


def load_predictor(
    config: NTTConfig, load: bool = True
) -> Generator[tuple[float, str], None, NTTPredictor]:
    """Builds the predictor in a worker thread, yielding what loading does as it goes.

    Loading can take minutes (a checkpoint download); the App's progress bar and the CLI show
    each label ("Downloading sam2.1_hiera_large.pt: 120.0 / 898.1 MB") instead of freezing.
    ``load=False`` defers each model to its first use (see ``NTTPredictor``).
    """
    labels: queue.Queue[str | None] = queue.Queue()
    with ThreadPoolExecutor(1, thread_name_prefix="ntt-load") as worker:
        loading = worker.submit(NTTPredictor, config, load=load, progress=labels.put)
        loading.add_done_callback(lambda _: labels.put(None))  # after its last label
        while (label := labels.get()) is not None:
            yield 0.0, label
        return loading.result()  # re-raises what went wrong in the worker


def root_dataset(dataset_or_view: Collection) -> fo.Dataset:
    if isinstance(dataset_or_view, fo.Dataset):
        return dataset_or_view
    return dataset_or_view._root_dataset


def source_samples(collection: Collection) -> Collection:
    """The samples behind a patches view (the evaluation patches a curator corrects in, say);
    any other collection as it is. Every step works on whole samples."""
    if not collection._is_patches:
        return collection
    return root_dataset(collection).select(collection.distinct("sample_id"))


def require_detections_field(collection: Collection, field_name: str) -> None:
    if not collection.has_sample_field(field_name):
        raise PluginInputError(
            f"Field {field_name!r} does not exist; label fields: {detection_fields(collection)}"
        )
    if not holds_detections(collection, field_name):
        raise PluginInputError(
            f"Field {field_name!r} is not an fo.Detections field; instance fields: "
            f"{detection_fields(collection)}"
        )


def holds_detections(collection: Collection, field_name: str) -> bool:
    field = collection.get_field(field_name)
    return isinstance(field, fo.EmbeddedDocumentField) and issubclass(
        field.document_type, fo.Detections
    )


def detection_fields(collection: Collection) -> list[str]:
    """Top-level ``fo.Detections`` fields of a collection."""
    schema = collection.get_field_schema(embedded_doc_type=fo.Detections)
    return sorted(schema)


def require_tag(tag: str) -> None:
    if not tag or not tag.strip():
        raise PluginInputError("The reference tag must not be empty")


def require_run_key(key: str, what: str) -> None:
    if not key.isidentifier():
        raise PluginInputError(
            f"{what} {key!r} is not valid: use letters, digits and underscores, not starting "
            "with a digit (e.g. 'bank_5shot')"
        )


def require_free_run_key(
    dataset: fo.Dataset, key: str, method: str, overwrite: bool, what: str
) -> None:
    if not has_run(dataset, key):
        return
    if not has_run(dataset, key, method):
        raise PluginInputError(f"Run key {key!r} is taken by another kind of run; pick a new name")
    if not overwrite:
        raise PluginInputError(
            f"A {what} named {key!r} already exists: set overwrite=True to replace it, or pick "
            "a new name"
        )


def list_memory_banks(dataset: fo.Dataset) -> list[str]:
    return dataset.list_runs(method=BANK_METHOD)


def require_bank(dataset: fo.Dataset, bank_name: str) -> None:
    if not has_run(dataset, bank_name, BANK_METHOD):
        raise BankError(
            f"No memory bank named {bank_name!r} on dataset {dataset.name!r}; "
            f"existing banks: {list_memory_banks(dataset)}. Build one with 'Build memory bank'"
        )
