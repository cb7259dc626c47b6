"""Cached proposals in FiftyOne's ExecutionStore: in MongoDB, scoped to the dataset.

One store per proposal-shaping configuration (``ntt_core.cache.proposal_identity``), one key per
sample. FiftyOne deletes a dataset's execution stores with the dataset; ``clear_proposal_cache``
removes them on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

import fiftyone as fo
import fiftyone.core.odm as foo_odm
from fiftyone.factory.repos.execution_store import MongoExecutionStoreRepo
from fiftyone.operators.store import ExecutionStore, ExecutionStoreService

from ntt_core import NTTConfig
from ntt_core.cache import proposal_identity

STORE_PREFIX = "ntt_proposals_"


def proposal_store(dataset: fo.Dataset, config: NTTConfig) -> ExecutionStore:
    """The dataset's store for proposals made with ``config``'s models and grid."""
    return ExecutionStore.create(STORE_PREFIX + proposal_identity(config), dataset._doc.id)


class ProposalCache:
    """The dataset's store for one configuration, with batched reads.

    ``ExecutionStore.get`` costs one database round trip per key; a re-scoring round over
    thousands of images reads its entries a few hundred at a time instead, from the collection
    the store writes to (``execution_store``: store name, dataset id, key, value).
    """

    def __init__(self, dataset: fo.Dataset, config: NTTConfig) -> None:
        self.store = proposal_store(dataset, config)
        self._query = {"store_name": self.store.store_name, "dataset_id": dataset._doc.id}

    def get(self, key: str) -> bytes | None:
        return self.store.get(key)

    def set(self, key: str, value: bytes) -> None:
        self.store.set(key, value)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The entries of ``keys`` that exist, in one query."""
        cursor = self._collection().find(
            {**self._query, "key": {"$in": list(keys)}}, {"key": 1, "value": 1, "_id": 0}
        )
        return {doc["key"]: doc["value"] for doc in cursor if isinstance(doc["value"], bytes)}

    def present(self, keys: Sequence[str], batch_size: int = 5000) -> set[str]:
        """Which of ``keys`` have an entry (without reading the entries)."""
        found: set[str] = set()
        for start in range(0, len(keys), batch_size):
            chunk = list(keys[start : start + batch_size])
            cursor = self._collection().find(
                {**self._query, "key": {"$in": chunk}}, {"key": 1, "_id": 0}
            )
            found.update(doc["key"] for doc in cursor)
        return found

    @staticmethod
    def _collection():
        return foo_odm.get_db_conn()[_STORE_COLLECTION]


class Prefetched:
    """A batch of entries read ahead, in front of the cache (misses and writes go through)."""

    def __init__(self, cache: ProposalCache, blobs: dict[str, bytes]) -> None:
        self.cache, self.blobs = cache, blobs

    def get(self, key: str) -> bytes | None:
        return self.blobs[key] if key in self.blobs else self.cache.get(key)

    def set(self, key: str, value: bytes) -> None:
        self.cache.set(key, value)


_STORE_COLLECTION = MongoExecutionStoreRepo.COLLECTION_NAME


def cached_proposal_count(dataset: fo.Dataset) -> int:
    service = ExecutionStoreService(dataset_id=dataset._doc.id)
    return sum(service.count_keys(name) for name in _store_names(service))


def clear_proposal_cache(dataset: fo.Dataset) -> int:
    """Deletes every cached proposal of the dataset; returns how many entries went."""
    service = ExecutionStoreService(dataset_id=dataset._doc.id)
    removed = 0
    for name in _store_names(service):
        removed += service.count_keys(name)
        service.delete_store(name)
    return removed


def _store_names(service: ExecutionStoreService) -> list[str]:
    return [name for name in service.list_stores() if name.startswith(STORE_PREFIX)]
