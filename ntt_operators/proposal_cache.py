"""Cached proposals in a collection of their own in FiftyOne's MongoDB database.

One entry per (dataset, proposal-shaping configuration, sample): the configuration is
``ntt_core.cache.proposal_identity``, the value the engine's bytes (``proposals_to_bytes``).
Small stamp documents beside them record, per label field, what each sample was last scored
from (``api.rescore``) and what that scoring decided from the masks (``DecayRecord``, so that
the next re-score can leave them alone); replacing an entry drops its stamps.

Not FiftyOne's ExecutionStore: the App server polls that store and sends every changed value to
the App as JSON, and it cannot encode bytes, so each poll failed and started over (hundreds of
tracebacks, and the whole cache re-read every second). Here FiftyOne does not delete a dataset's
entries with the dataset, so entries of deleted datasets are removed whenever a cache is opened;
``clear_proposal_cache`` removes a dataset's entries on demand.

Each entry's features are also kept as float16 rows in a file per dataset and configuration
(``ntt_core.cache.FeatureFile``, under the NTT cache directory), indexed by small documents of
their own: the re-score's screen reads only those rows, never the entries with their masks.
An index document records the image checksum of its entry, so rows of a changed image are
never used; its entry, read to be scored again, replaces them.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import fiftyone as fo
import fiftyone.core.odm as foo_odm
import torch
from bson import ObjectId
from pymongo import ASCENDING, UpdateOne
from pymongo.collection import Collection

from ntt_core import NTTConfig
from ntt_core.cache import (
    CACHE_VERSION,
    FeatureFile,
    cached_features,
    entry_checksum,
    proposal_identity,
)
from ntt_core.decay_record import DecayRecord
from ntt_core.registry import cache_dir

COLLECTION = "ntt_proposal_cache"
STAMPS = "ntt_proposal_stamps"
FEATURE_ROWS = "ntt_proposal_feature_rows"


class ProposalCache:
    """The dataset's cached proposals for one configuration, with batched reads, and per field
    the stamps that say what each sample was last scored from (``api.rescore``)."""

    def __init__(self, dataset: fo.Dataset, config: NTTConfig) -> None:
        self._entries, self._stamps, self._rows = _entries(), _stamps(), _feature_rows()
        _remove_entries_of_deleted_datasets(self._entries, self._stamps, self._rows)
        identity = proposal_identity(config)
        self._query = {"dataset_id": dataset._doc.id, "identity": identity}
        self._files: dict[int, FeatureFile] = {}
        self._folder = _feature_folder(dataset._doc.id) / identity

    def get(self, key: str) -> bytes | None:
        doc = self._entries.find_one({**self._query, "sample_id": key}, {"value": 1})
        return bytes(doc["value"]) if doc else None

    def set(self, key: str, value: bytes) -> None:
        entry = {**self._query, "sample_id": key}
        self._stamps.delete_many(entry)  # they describe the proposals being replaced
        self._entries.replace_one(entry, {**entry, "value": value}, upsert=True)
        self._index_features(key, value)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The entries of ``keys`` that exist, in one query."""
        cursor = self._entries.find(
            {**self._query, "sample_id": {"$in": list(keys)}}, {"sample_id": 1, "value": 1}
        )
        return {doc["sample_id"]: bytes(doc["value"]) for doc in cursor}

    def index_features(self, blobs: dict[str, bytes]) -> None:
        """Adds the float16 rows of the entries ``blobs`` that have none (entries cached before
        the rows existed)."""
        if not blobs:
            return
        indexed = self._feature_rows(list(blobs))
        for key, blob in blobs.items():
            if key not in indexed:
                self._index_features(key, blob)

    def screening_features(
        self, keys: Sequence[str], checksums: dict[str, str | None]
    ) -> tuple[list[str], torch.Tensor, list[int]]:
        """The float16 features of the entries of ``keys`` made for the image whose checksum
        ``checksums`` gives, read from their rows only: the keys found, in the order of
        ``keys``, their proposals' rows stacked (R, C), and how many rows each has. The rows
        are valid until the next call (``FeatureFile.read_many``)."""
        found = self._feature_rows(keys)
        valid = [
            key for key in keys if key in found and found[key]["checksum"] == checksums.get(key)
        ]  # an image changed since its entry was made is proposed again
        if not valid:
            return [], torch.zeros(0, 0, dtype=torch.float16), []
        spans = [(found[key]["start"], found[key]["count"]) for key in valid]
        # One configuration, one encoder: every row of it has the same size.
        rows, present = self._file(found[valid[0]]["channels"]).read_many(spans)
        counts = [count for (_, count), ok in zip(spans, present) if ok]
        return [key for key, ok in zip(valid, present) if ok], rows, counts

    def _feature_rows(self, keys: Sequence[str]) -> dict[str, dict]:
        cursor = self._rows.find(
            {**self._query, "version": CACHE_VERSION, "sample_id": {"$in": list(keys)}},
            {"_id": 0, "sample_id": 1, "checksum": 1, "channels": 1, "start": 1, "count": 1},
        )
        return {doc.pop("sample_id"): doc for doc in cursor}

    def _index_features(self, key: str, blob: bytes) -> None:
        checksum = entry_checksum(blob)
        features = cached_features(blob, checksum, self._query["identity"]) if checksum else None
        if features is None:
            return  # an entry this version cannot read is recomputed, never screened
        channels = int(features.shape[1])
        start = self._file(channels).append(features)
        entry = {**self._query, "sample_id": key}
        row = {"version": CACHE_VERSION, "checksum": checksum, "channels": channels}
        self._rows.replace_one(
            entry, {**entry, **row, "start": start, "count": len(features)}, upsert=True
        )

    def _file(self, channels: int) -> FeatureFile:
        if channels not in self._files:
            self._files[channels] = FeatureFile(self._folder / f"features-{channels}.f16", channels)
        return self._files[channels]

    def stamps(self, keys: Sequence[str], field: str) -> dict[str, dict]:
        """The stamps of ``keys`` for ``field``: {sample id: {"epoch", "state", "record"}},
        each key where recorded (``record``: the bytes of the last scoring's ``DecayRecord``)."""
        cursor = self._stamps.find(
            {**self._query, "field": field, "sample_id": {"$in": list(keys)}},
            {"sample_id": 1, "epoch": 1, "state": 1, "record": 1, "_id": 0},
        )
        return {doc.pop("sample_id"): doc for doc in cursor}

    def save_records(self, field: str, records: dict[str, bytes]) -> None:
        """Keeps each sample's ``DecayRecord`` bytes beside its stamp for ``field``. Unlike a
        stamp, a record needs no completed run to be trusted: it is checked where it is used."""
        if records:
            updates = [
                UpdateOne(
                    {**self._query, "field": field, "sample_id": key},
                    {"$set": {"record": value}},
                    upsert=True,
                )
                for key, value in records.items()
            ]
            self._stamps.bulk_write(updates, ordered=False)

    def stamp(self, keys: Sequence[str], field: str, stamp: dict, batch_size: int = 5000) -> None:
        """Records, for the samples ``keys``, what ``field`` was last scored from (a run's epoch
        and scoring state). Existing stamps are updated in place: one command per batch."""
        for start in range(0, len(keys), batch_size):
            chunk = list(keys[start : start + batch_size])
            query = {**self._query, "field": field, "sample_id": {"$in": chunk}}
            if self._stamps.update_many(query, {"$set": stamp}).matched_count == len(chunk):
                continue
            stamped = set(self._stamps.distinct("sample_id", query))
            self._stamps.insert_many(
                [
                    {**self._query, "field": field, "sample_id": key, **stamp}
                    for key in chunk
                    if key not in stamped
                ]
            )

    def present(self, keys: Sequence[str], batch_size: int = 5000) -> set[str]:
        """Which of ``keys`` have an entry (without reading the entries)."""
        found: set[str] = set()
        for start in range(0, len(keys), batch_size):
            chunk = list(keys[start : start + batch_size])
            cursor = self._entries.find(
                {**self._query, "sample_id": {"$in": chunk}}, {"sample_id": 1, "_id": 0}
            )
            found.update(doc["sample_id"] for doc in cursor)
        return found


class Prefetched:
    """A batch of entries read ahead, in front of the cache (misses and writes go through),
    with their stamps and the checksums of their image files (None: unreadable)."""

    def __init__(
        self,
        cache: ProposalCache,
        blobs: dict[str, bytes],
        stamps: dict[str, dict] | None = None,
        checksums: dict[str, str | None] | None = None,
    ) -> None:
        self.cache, self.blobs = cache, blobs
        self.stamps, self.checksums = stamps or {}, checksums or {}

    def get(self, key: str) -> bytes | None:
        return self.blobs[key] if key in self.blobs else self.cache.get(key)

    def set(self, key: str, value: bytes) -> None:
        self.cache.set(key, value)

    def record(self, key: str) -> DecayRecord | None:
        """The ``DecayRecord`` of the sample's last scoring into the stamped field, if kept."""
        blob = self.stamps.get(key, {}).get("record")
        return DecayRecord.from_bytes(bytes(blob)) if blob else None


def cached_proposal_count(dataset: fo.Dataset) -> int:
    """How many images of the dataset have cached proposals (any configuration)."""
    return _entries().count_documents({"dataset_id": dataset._doc.id})


def clear_proposal_cache(dataset: fo.Dataset) -> int:
    """Deletes every cached proposal of the dataset; returns how many entries went."""
    _stamps().delete_many({"dataset_id": dataset._doc.id})
    _feature_rows().delete_many({"dataset_id": dataset._doc.id})
    shutil.rmtree(_feature_folder(dataset._doc.id), ignore_errors=True)
    return _entries().delete_many({"dataset_id": dataset._doc.id}).deleted_count


def _feature_folder(dataset_id: ObjectId) -> Path:
    """Where the dataset's float16 feature rows live, one file per configuration."""
    return cache_dir() / "proposal-features" / str(dataset_id)


def _entries() -> Collection:
    entries = foo_odm.get_db_conn()[COLLECTION]
    entries.create_index(
        [("dataset_id", ASCENDING), ("identity", ASCENDING), ("sample_id", ASCENDING)],
        unique=True,
    )  # a no-op once the index exists
    return entries


def _stamps() -> Collection:
    stamps = foo_odm.get_db_conn()[STAMPS]
    stamps.create_index(
        [(key, ASCENDING) for key in ("dataset_id", "identity", "field", "sample_id")],
        unique=True,
    )
    return stamps


def _feature_rows() -> Collection:
    rows = foo_odm.get_db_conn()[FEATURE_ROWS]
    rows.create_index(
        [(key, ASCENDING) for key in ("dataset_id", "identity", "sample_id")], unique=True
    )
    return rows


def _remove_entries_of_deleted_datasets(
    entries: Collection, stamps: Collection, rows: Collection
) -> None:
    cached: list[ObjectId] = entries.distinct("dataset_id")
    existing = set(foo_odm.get_db_conn().datasets.distinct("_id", {"_id": {"$in": cached}}))
    deleted = [dataset_id for dataset_id in cached if dataset_id not in existing]
    if deleted:
        entries.delete_many({"dataset_id": {"$in": deleted}})
        stamps.delete_many({"dataset_id": {"$in": deleted}})
        rows.delete_many({"dataset_id": {"$in": deleted}})
        for dataset_id in deleted:
            shutil.rmtree(_feature_folder(dataset_id), ignore_errors=True)
