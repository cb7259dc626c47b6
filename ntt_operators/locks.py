"""One writer per output field: an atomic lock in the dataset's execution store.

Two segment runs into one field would interleave their writes and their run record, so the second
one is refused. The lock names its owner (host, pid, process start time): a lock whose owner died
on this host (SIGKILL, OOM) is taken over, so a killed run never blocks its resume.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import fiftyone as fo
import psutil
from fiftyone.operators.store import ExecutionStore

from ntt_core import NTTError

STORE_NAME = "ntt_field_locks"

Owner = dict[str, Any]


class FieldBusyError(NTTError):
    """Another live run is writing the same output field."""


def acquire(dataset: fo.Dataset, field: str) -> Owner:
    """Takes the lock on ``field`` or raises ``FieldBusyError``; returns the owner to release."""
    store = _store(dataset)
    owner = _this_process()
    if store.set_if_absent(field, owner):
        return owner
    held = store.get(field)
    # compare_and_set: if two resumes find the same dead owner, only one of them takes over.
    if held is not None and not _alive(held) and store.compare_and_set(field, held, owner):
        return owner
    if held is None and store.set_if_absent(field, owner):  # released in between
        return owner
    raise FieldBusyError(_busy_message(field, held))


def release(dataset: fo.Dataset, field: str, owner: Owner) -> None:
    """Gives the lock back, unless it is no longer ours (taken over or broken)."""
    store = _store(dataset)
    if store.get(field) == owner:
        store.delete(field)


def break_lock(dataset: fo.Dataset, field: str) -> bool:
    """Removes the lock on ``field`` whoever holds it: for an owner on another host known dead."""
    return _store(dataset).delete(field)


def holder(dataset: fo.Dataset, field: str) -> Owner | None:
    return _store(dataset).get(field)


def _store(dataset: fo.Dataset) -> ExecutionStore:
    return ExecutionStore.create(STORE_NAME, dataset_id=dataset._doc.id)


def _this_process() -> Owner:
    process = psutil.Process()
    return {
        "host": socket.gethostname(),
        "pid": process.pid,
        "process_started": process.create_time(),
        "acquired": time.time(),
        "token": uuid.uuid4().hex,  # two runs of one process are two owners
    }


def _alive(owner: Owner) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another host's processes cannot be checked from here
    try:
        process = psutil.Process(owner["pid"])
        # A different start time means the pid was reused by an unrelated process.
        same = abs(process.create_time() - owner["process_started"]) < 1.0
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, KeyError, TypeError):
        return False


def _busy_message(field: str, owner: Owner | None) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["acquired"])) if owner else "?"
    who = f"pid {owner['pid']} on {owner['host']}" if owner else "another run"
    return (
        f"Field {field!r} is being written by another segment run ({who}, since {since}); "
        "two runs into one field would mix their results. Wait for it to finish (then continue "
        "with skip_done=True), or write to another field. If that process is gone on another "
        f"host, remove the lock with ntt_operators.locks.break_lock(dataset, {field!r})"
    )
