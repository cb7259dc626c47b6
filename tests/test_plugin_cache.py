"""Re-scoring from cached proposals, through the plugin API and the plugin's cache collection."""

import json
from pathlib import Path

import fiftyone as fo
import fiftyone.core.odm as foo_odm
import fiftyone.operators as foo
import pytest
import torch
from fiftyone.factory.repos.execution_store import MongoExecutionStoreRepo
from fiftyone.operators.delegated import DelegatedOperationService

from ntt_core import NTTConfig, NTTPredictor
from ntt_core.cache import cached_features, file_checksum, proposal_identity
from ntt_core.registry import cache_dir
from ntt_operators import api
from ntt_operators.api import PluginInputError
from ntt_operators.api.segment import _read_ahead
from ntt_operators.proposal_cache import (
    COLLECTION,
    FEATURE_ROWS,
    STAMPS,
    ProposalCache,
    cached_proposal_count,
    clear_proposal_cache,
)

TINY = NTTConfig.tiny(weights="random", device="cpu")
PLUGIN = "@ntt/no_time_to_train"


def run(name: str, view, delegated: bool = False, **params):
    result = foo.execute_operator(
        f"{PLUGIN}/{name}", ctx={"view": view.view(), "params": params},
        request_delegation=delegated,
    )  # fmt: skip
    if not delegated:
        return result.result
    (done,) = DelegatedOperationService().execute_queued_operations(operator=f"{PLUGIN}/{name}")
    assert done.error is None, done.error
    return done.result


def _predictions(dataset: fo.Dataset | fo.DatasetView, field: str) -> list:
    return [
        [
            (d.label, round(d.confidence, 6), d.bounding_box, d.mask.tolist())
            for d in dets.detections
        ]
        for dets in dataset.values(field)
        if dets is not None
    ]


def test_a_new_bank_rescored_from_cache_matches_full_inference(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "one_shot", config=TINY)
    api.segment(scene_dataset, "one_shot", "first", reuse_proposals=True)
    targets = len(scene_dataset.match_tags("reference", bool=False))
    assert cached_proposal_count(scene_dataset) == targets

    # The curator adds references: a new bank. Re-scoring uses the cached proposals ...
    api.sample_references(scene_dataset, "ground_truth", shots=2, seed=5, tag="more")
    api.build_memory_bank(scene_dataset, "ground_truth", "two_shot", ref_tag="more", config=TINY)
    api.segment(
        scene_dataset, "two_shot", "rescored", exclude_tag="reference", reuse_proposals=True
    )
    # ... and gives exactly what running the models again gives.
    api.segment(scene_dataset, "two_shot", "recomputed", exclude_tag="reference")
    assert _predictions(scene_dataset, "rescored") == _predictions(scene_dataset, "recomputed")
    assert len(_predictions(scene_dataset, "rescored")) == targets


@pytest.mark.parametrize("delegated", [False, True])
def test_the_operators_fill_and_clear_the_cache(scene_dataset, delegated):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    run(
        "segment_with_references",
        scene_dataset.limit(3),
        delegated,
        bank_name="bank",
        label_field="ntt",
        exclude_tag="",
        reuse_proposals=True,
    )
    assert cached_proposal_count(scene_dataset) == 3
    assert run("clear_proposal_cache", scene_dataset) == {"removed": 3}
    assert cached_proposal_count(scene_dataset) == 0


def test_the_cache_is_cleared_on_demand_and_with_the_dataset(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset.limit(3), "bank", "ntt", exclude_tag=None, reuse_proposals=True)
    rows = foo_odm.get_db_conn()[FEATURE_ROWS]
    folder = _feature_folder(scene_dataset)
    assert rows.count_documents({"dataset_id": scene_dataset._doc.id}) == 3 and folder.is_dir()
    assert clear_proposal_cache(scene_dataset) == 3
    assert cached_proposal_count(scene_dataset) == 0
    assert rows.count_documents({"dataset_id": scene_dataset._doc.id}) == 0
    assert not folder.exists()

    api.segment(scene_dataset.limit(2), "bank", "ntt2", exclude_tag=None, reuse_proposals=True)
    entries = foo_odm.get_db_conn()[COLLECTION]
    dataset_id = scene_dataset._doc.id
    assert entries.count_documents({"dataset_id": dataset_id}) == 2
    scene_dataset.delete()
    other = fo.Dataset()
    ProposalCache(other, TINY)  # opening any cache removes a deleted dataset's entries
    assert entries.count_documents({"dataset_id": dataset_id}) == 0
    assert rows.count_documents({"dataset_id": dataset_id}) == 0 and not folder.exists()
    other.delete()


def test_the_cache_stays_out_of_fiftyones_execution_store(scene_dataset):
    """The App server polls the execution store and sends each changed value to the App as
    JSON; a bytes value made every poll fail and start over (each second, for ever)."""
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset.limit(2), "bank", "ntt", exclude_tag=None, reuse_proposals=True)
    assert cached_proposal_count(scene_dataset) == 2
    store = foo_odm.get_db_conn()[MongoExecutionStoreRepo.COLLECTION_NAME]
    for doc in store.find({"dataset_id": scene_dataset._doc.id}):
        json.dumps(doc.get("value"))  # what the App server's notification service does


def test_the_cache_is_refused_with_ray_before_anything_changes(scene_dataset):
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    pytest.importorskip("ray")
    with pytest.raises(PluginInputError, match="reuse_proposals"):
        api.segment(scene_dataset, "bank", "ntt", backend="ray", reuse_proposals=True)
    assert not scene_dataset.has_sample_field("ntt")


def test_an_image_gone_since_it_was_cached_fails_alone(scene_dataset, run_dir):
    """Cached proposals are checked against the image file, so a missing file is that sample's
    failure, as without the cache, and the other samples are re-scored."""
    copy = run_dir / "gone_after_caching.png"
    copy.write_bytes(open(scene_dataset.first().filepath, "rb").read())
    gone = fo.Sample(filepath=str(copy))
    scene_dataset.add_sample(gone)
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset, "bank", "pred", reuse_proposals=True)
    copy.unlink()

    out = api.segment(scene_dataset, "bank", "pred", reuse_proposals=True, rescore=True)
    assert list(out["failed"]) == [gone.id]
    assert out["failed"][gone.id] == f"ImageError: Image file not found: {copy}"
    assert out["processed"] == len(scene_dataset.match_tags("reference", bool=False)) - 1
    assert out["models_loaded"] is False


def test_stamps_are_updated_in_place_and_added_for_new_samples(scene_dataset):
    cache = ProposalCache(scene_dataset, TINY)
    first, second = {"epoch": "e1", "state": "s1"}, {"epoch": "e2", "state": "s2"}
    cache.stamp(["a", "b"], "pred", first)
    cache.stamp(["b", "c"], "pred", second, batch_size=1)
    cache.stamp(["a"], "other", second)
    assert cache.stamps(["a", "b", "c", "d"], "pred") == {"a": first, "b": second, "c": second}
    assert cache.stamps(["a", "b"], "other") == {"a": second}


def _feature_folder(dataset: fo.Dataset) -> Path:
    return cache_dir() / "proposal-features" / str(dataset._doc.id)


def test_screening_reads_float16_rows_of_unchanged_images_only(scene_dataset, run_dir):
    """The screen's features come from the compact rows, equal to the entries' in float16; a
    re-encoded image's rows are never used, and entries cached before the rows existed get
    theirs when they are next read."""
    copy = run_dir / "re_encoded_after_caching.png"
    copy.write_bytes(open(scene_dataset.first().filepath, "rb").read())
    scene_dataset.add_sample(fo.Sample(filepath=str(copy)))
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset, "bank", "pred", exclude_tag=None, reuse_proposals=True)
    cache = ProposalCache(scene_dataset, TINY)
    ids, paths = scene_dataset.values(["id", "filepath"])
    checksums = {i: file_checksum(p) for i, p in zip(ids, paths)}
    found, rows, counts = cache.screening_features(ids, checksums)
    assert found == ids
    blobs = cache.get_many(ids)
    full = [cached_features(blobs[i], checksums[i], proposal_identity(TINY)) for i in ids]
    assert counts == [len(f) for f in full]
    assert torch.equal(rows, torch.cat(full).half())

    copy.write_bytes(copy.read_bytes() + b"re-encoded")
    checksums[ids[-1]] = file_checksum(copy)
    assert cache.screening_features(ids, checksums)[0] == ids[:-1]

    foo_odm.get_db_conn()[FEATURE_ROWS].delete_many({"dataset_id": scene_dataset._doc.id})
    assert cache.screening_features(ids, checksums)[0] == []
    cache.index_features(cache.get_many(ids[:2]))
    assert cache.screening_features(ids, checksums)[0] == ids[:2]


def test_a_rescore_reuses_each_samples_decay_record_and_writes_the_same_field(
    scene_dataset, monkeypatch
):
    """The first run keeps, beside each sample's stamp, what its scoring decided from the masks
    (``DecayRecord``). After an accepted prediction moves a prototype, the re-score leaves the
    masks alone for the samples whose proposals keep their classes, and the field it leaves
    equals a new field scored from the masks with the same bank."""
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset, "bank", "pred", reuse_proposals=True)
    targets = len(scene_dataset.match_tags("reference", bool=False))
    kept = {"dataset_id": scene_dataset._doc.id, "field": "pred", "record": {"$exists": True}}
    assert foo_odm.get_db_conn()[STAMPS].count_documents(kept) == targets

    accepted = next(d for dets in scene_dataset.values("pred") if dets for d in dets.detections)
    scene_dataset.select_labels(ids=[accepted.id]).tag_labels("reference", label_fields="pred")
    api.update_memory_bank(scene_dataset, "bank", add_fields=["pred"])
    from_masks = []
    original = NTTPredictor._decay_record

    def counted(self, *args):
        from_masks.append(1)
        return original(self, *args)

    monkeypatch.setattr(NTTPredictor, "_decay_record", counted)
    out = api.segment(scene_dataset, "bank", "pred", reuse_proposals=True, rescore=True)
    assert len(from_masks) < out["processed"]  # the accepted one's sample is a reference now

    monkeypatch.setattr(NTTPredictor, "_decay_record", original)
    api.segment(scene_dataset, "bank", "from_masks", reuse_proposals=True)
    rescored = scene_dataset.exists("from_masks")
    assert len(rescored) == out["processed"]
    assert _predictions(rescored, "pred") == _predictions(rescored, "from_masks")


def test_batches_read_ahead_in_two_threads_come_back_in_order(scene_dataset):
    """The re-score reads two batches ahead, in two threads; one sample per batch here, so the
    queue of pending reads turns over several times."""
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    api.segment(scene_dataset, "bank", "pred", exclude_tag=None, reuse_proposals=True)
    cache = ProposalCache(scene_dataset, TINY)
    ids, paths = scene_dataset.values(["id", "filepath"])
    timings = {"read_cache": 0.0, "screen": 0.0}
    batches = list(_read_ahead(cache, ids, paths, timings, None, "pred", batch=1))
    assert [keys for keys, *_ in batches] == [[i] for i in ids] and len(ids) > 3
    for keys, batch_paths, store, kept in batches:
        (key,) = keys
        assert batch_paths == [paths[ids.index(key)]] and kept == set()
        assert store.blobs == cache.get_many(keys) and store.record(key) is not None
