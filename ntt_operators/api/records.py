"""What the plugin records on a dataset (runs, fields, ``dataset.info``), read and written safely
on the App's shared dataset object.

The App server keeps one object per dataset and reloads it from other threads while an operator
runs (it polls the database and reloads a dataset that changed, and each App request loads it).
A reload that read the database just before a write, and lands after, leaves the object without
what was just written: FiftyOne then refuses a run or a field the database holds ("Dataset has no
run key ...", "non-existent sample field ..."), or a save writes nothing. A reader's copy of a
run can also name a results file that the writing thread has just replaced. Every such record of
the plugin goes through here, which checks, reloads and tries again.
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


STALE = ("has no run key", "non-existent sample field", "'str' object has no attribute 'decode'")
"""How FiftyOne refuses a run or a field that the object lost to a reload, and how it fails to
read run results that another thread replaced since the object read their file's id
(mongoengine's GridFS proxy answers a read of the deleted file with "")."""


def on_current_object(dataset: fo.Dataset, call: Callable[[], T]) -> T:
    """``call()``; where FiftyOne refuses a run or field the object lost to a reload, or reads
    results replaced under it, the object is reloaded from the database and the call tried
    again."""
    for attempt in range(TRIES):
        try:
            return call()
        except (ValueError, ReferenceError, AttributeError) as error:
            # ReferenceError: the reload freed the document FiftyOne was changing.
            stale = isinstance(error, ReferenceError) or any(s in str(error) for s in STALE)
            if not stale or attempt == TRIES - 1:
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
        try:
            collection.register_run(key, config, overwrite=overwrite)
        except ReferenceError:
            # The reload freed the document FiftyOne was changing (its runs hold it weakly).
            dataset.reload()
            continue
        if key in dataset.list_runs():
            return
    raise NTTError(f"Run {key!r} could not be recorded in the dataset; run it again")


def save_results(dataset: fo.Dataset, key: str, **values: Any) -> None:
    """Stores ``values`` as the results of the registered run ``key``, replacing any."""

    def save() -> None:
        results = dataset.init_run_results(key, **values)
        dataset.save_run_results(key, results, overwrite=True, cache=False)

    on_current_object(dataset, save)


def load_results(dataset: fo.Dataset, key: str) -> Any:
    """The stored results of run ``key`` (None: none saved), read from the database."""

    def load() -> Any:
        return dataset.load_run_results(key, cache=False, load_view=False)

    return on_current_object(dataset, load)


def run_info(dataset: fo.Dataset, key: str) -> Any:
    """FiftyOne's record of run ``key``: its ``config`` and ``timestamp``."""
    return on_current_object(dataset, lambda: dataset.get_run_info(key))


def update_info(dataset: fo.Dataset, key: str, change: Callable[[Any], Any]) -> None:
    """Sets ``dataset.info[key]`` to ``change(current value)``, from the database's current
    value, and checks that the save landed (a reload between the change and the save would make
    it write nothing)."""
    for _ in range(TRIES):
        dataset.reload()
        value = change(dataset.info.get(key))
        dataset.info[key] = value
        dataset.save()
        dataset.reload()
        if dataset.info.get(key) == value:
            return
    raise NTTError(f"dataset.info[{key!r}] could not be saved; run it again")
