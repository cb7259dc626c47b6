"""Cached proposals in FiftyOne's ExecutionStore: in MongoDB, scoped to the dataset.

One store per proposal-shaping configuration (``ntt_core.cache.proposal_identity``), one key per
sample. FiftyOne deletes a dataset's execution stores with the dataset; ``clear_proposal_cache``
removes them on demand.
"""

from __future__ import annotations

import fiftyone as fo
from fiftyone.operators.store import ExecutionStore, ExecutionStoreService

from ntt_core import NTTConfig
from ntt_core.cache import proposal_identity

STORE_PREFIX = "ntt_proposals_"


def proposal_store(dataset: fo.Dataset, config: NTTConfig) -> ExecutionStore:
    """The dataset's store for proposals made with ``config``'s models and grid."""
    return ExecutionStore.create(STORE_PREFIX + proposal_identity(config), dataset._doc.id)


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
