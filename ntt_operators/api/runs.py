"""Run records (banks, segment runs) read and written safely on the App's shared dataset object.

The App server keeps one object per dataset and reloads it from other threads (each App request)
while an operator runs. A reload that read the database just before a run was saved, and lands
after, leaves the object without that run: FiftyOne then fails "Dataset has no run key ..." on a
run the database holds, or a save writes the runs without the new one. Every run call of the plugin
goes through here, which checks, reloads and tries again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import fiftyone as fo

from ntt_core import NTTError

Collection = fo.core.collections.SampleCollection
T = TypeVar("T")
TRIES = 5


def _root(collection: Collection) -> fo.Dataset:
    return collection if isinstance(collection, fo.Dataset) else collection._root_dataset


def _retried(dataset: fo.Dataset, call: Callable[[], T]) -> T:
    """``call()``; where the object lost a run to a reload (FiftyOne's "has no run key"), the
    object is reloaded from the database and the call tried again."""
    for attempt in range(TRIES):
        try:
            return call()
        except ValueError as error:
            if "has no run key" not in str(error) or attempt == TRIES - 1:
                raise
            dataset.reload()
    raise AssertionError("unreachable")


def has_run(dataset: fo.Dataset, key: str, method: str | None = None) -> bool:
    """Whether the dataset records run ``key`` (of ``method``); a miss is checked again after a
    reload, since the object may hold an older copy of the runs than the database."""
    if key in dataset.list_runs(method=method):
        return True
    dataset.reload()
    return key in dataset.list_runs(method=method)


def register_run(collection: Collection, key: str, config: Any, overwrite: bool) -> None:
    """``collection.register_run``, checked and retried: a reload between FiftyOne's in-memory
    change and its save makes the save write the runs without this one."""
    dataset = _root(collection)
    for _ in range(TRIES):
        collection.register_run(key, config, overwrite=overwrite)
        if key in dataset.list_runs():
            return
    raise NTTError(f"Run {key!r} could not be recorded in the dataset; run it again")


def save_results(dataset: fo.Dataset, key: str, **values: Any) -> None:
    """Stores ``values`` as the results of the registered run ``key``, replacing any."""

    def save() -> None:
        results = dataset.init_run_results(key, **values)
        dataset.save_run_results(key, results, overwrite=True, cache=False)

    _retried(dataset, save)


def load_results(dataset: fo.Dataset, key: str) -> Any:
    """The stored results of run ``key`` (None: none saved), read from the database."""
    return _retried(dataset, lambda: dataset.load_run_results(key, cache=False, load_view=False))


def run_info(dataset: fo.Dataset, key: str) -> Any:
    """FiftyOne's record of run ``key``: its ``config`` and ``timestamp``."""
    return _retried(dataset, lambda: dataset.get_run_info(key))
