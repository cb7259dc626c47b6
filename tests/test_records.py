"""Run records survive the App server reloading the shared dataset object mid-registration."""

from __future__ import annotations

import fiftyone as fo
import fiftyone.core.dataset as fod
import pytest
from bson import json_util
from fiftyone.core.odm.runs import RunDocument

from ntt_operators.api.records import (
    has_run,
    load_results,
    on_current_object,
    register_run,
    run_info,
    save_results,
    update_info,
)


@pytest.fixture
def dataset():
    dataset = fo.Dataset()
    dataset.add_sample(fo.Sample(filepath="/tmp/none.png"))
    yield dataset
    dataset.delete()


def reload_once_before_saving(dataset: fo.Dataset, monkeypatch) -> None:
    """What a concurrent App request does: its ``reload`` lands between FiftyOne's in-memory
    change of the dataset's runs and the save, so the save writes them without the new run."""
    save = type(dataset).save
    reloads = []

    def racing_save(self, *args, **kwargs):
        if not reloads:
            reloads.append(1)
            self.reload()
        return save(self, *args, **kwargs)

    monkeypatch.setattr(type(dataset), "save", racing_save)


def test_a_run_dropped_by_a_concurrent_reload_is_registered_again(dataset, monkeypatch):
    config = dataset.init_run(method="ntt_test")
    reload_once_before_saving(dataset, monkeypatch)
    register_run(dataset, "ntt_run", config, overwrite=True)
    assert "ntt_run" in dataset.list_runs()
    dataset.save_run_results("ntt_run", dataset.init_run_results("ntt_run", status="running"))
    assert dataset.load_run_results("ntt_run", cache=False).status == "running"


def test_the_race_is_real_without_the_check(dataset, monkeypatch):
    config = dataset.init_run(method="ntt_test")
    reload_once_before_saving(dataset, monkeypatch)
    dataset.register_run("ntt_run", config, overwrite=True)
    assert "ntt_run" not in dataset.list_runs()


def forget_runs_in_memory(dataset: fo.Dataset) -> None:
    """What a concurrent reload that read the database just before a run was saved leaves: an
    object whose runs lack one the database holds."""
    for key in dataset.list_runs():
        del dataset._doc.runs[key]


@pytest.fixture
def recorded_run(dataset):
    register_run(dataset, "ntt_run", dataset.init_run(method="ntt_test"), overwrite=True)
    save_results(dataset, "ntt_run", status="running")
    forget_runs_in_memory(dataset)
    return "ntt_run"


def test_an_object_behind_the_database_finds_its_runs_again(dataset, recorded_run):
    assert has_run(dataset, recorded_run, "ntt_test")
    forget_runs_in_memory(dataset)
    assert run_info(dataset, recorded_run).config.method == "ntt_test"
    forget_runs_in_memory(dataset)
    assert load_results(dataset, recorded_run).status == "running"
    forget_runs_in_memory(dataset)
    save_results(dataset, recorded_run, status="completed")
    assert load_results(dataset, recorded_run).status == "completed"


def test_fiftyone_alone_fails_on_an_object_behind_the_database(dataset, recorded_run):
    with pytest.raises(ValueError, match="has no run key"):
        dataset.load_run_results(recorded_run, cache=False)
    assert recorded_run not in dataset.list_runs()


def test_a_run_never_recorded_is_still_missing(dataset):
    assert not has_run(dataset, "ntt_other")
    with pytest.raises(ValueError, match="has no run key"):
        load_results(dataset, "ntt_other")


def test_a_field_declared_on_an_object_that_lost_its_parent_field_is_declared_again(dataset):
    # What a concurrent reload does when it read the database before "preds" was added: it
    # swaps in the document and schema it read (``Dataset._reload``).
    stale_doc, stale_schema, _ = fod._load_dataset(dataset, dataset.name, virtual=True)
    dataset.add_sample_field("preds", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    dataset._doc, dataset._sample_doc_cls = stale_doc, stale_schema

    def declare() -> None:
        dataset.add_sample_field("preds.detections.sam_iou", fo.FloatField)

    with pytest.raises(ValueError, match="non-existent sample field"):
        declare()
    on_current_object(dataset, declare)
    assert dataset.has_sample_field("preds.detections.sam_iou")


def test_an_info_save_swallowed_by_a_concurrent_reload_is_made_again(dataset, monkeypatch):
    reload_once_before_saving(dataset, monkeypatch)
    update_info(dataset, "ntt_rounds", lambda rounds: {**(rounds or {}), "preds": [1]})
    dataset.reload()
    assert dataset.info["ntt_rounds"] == {"preds": [1]}


def test_a_run_whose_document_a_reload_freed_is_registered_again(dataset, monkeypatch):
    """A reload between FiftyOne's run-document save and its change of the dataset's runs frees
    the document those runs belong to: 'weakly-referenced object no longer exists'."""
    save = RunDocument.save
    reloads = []

    def save_then_reload(self, *args, **kwargs):
        save(self, *args, **kwargs)
        if not reloads:
            reloads.append(1)
            dataset.reload()

    monkeypatch.setattr(RunDocument, "save", save_then_reload)
    config = dataset.init_run(method="ntt_test")
    with pytest.raises(ReferenceError):
        dataset.register_run("ntt_run", config, overwrite=True)
    reloads.clear()
    register_run(dataset, "ntt_run", config, overwrite=True)
    assert "ntt_run" in dataset.list_runs()


def replace_results_elsewhere(dataset: fo.Dataset, key: str, **values) -> None:
    """What the round's thread does while a panel render reads: it replaces the run's results
    file (delete, then put) on its own copy of the run document, so the object's copy names a
    file that is gone."""
    mine = dataset._doc.runs[key]
    theirs = RunDocument.objects.get(pk=mine.pk)
    theirs.results.delete()
    results = dataset.init_run_results(key, **values)
    theirs.results.put(
        json_util.dumps(results.serialize()).encode(), content_type="application/json"
    )
    theirs.save()


@pytest.fixture
def saved_run(dataset):
    register_run(dataset, "ntt_run", dataset.init_run(method="ntt_test"), overwrite=True)
    save_results(dataset, "ntt_run", status="running")
    return "ntt_run"


def test_results_replaced_under_a_reader_are_read_again(dataset, saved_run):
    replace_results_elsewhere(dataset, saved_run, status="completed")
    assert load_results(dataset, saved_run).status == "completed"


def test_fiftyone_alone_fails_on_results_replaced_under_it(dataset, saved_run):
    """mongoengine's GridFS proxy answers a read of a deleted file with "", which FiftyOne
    then decodes: the error the App showed in a panel render during round 2."""
    replace_results_elsewhere(dataset, saved_run, status="completed")
    with pytest.raises(AttributeError, match="no attribute 'decode'"):
        dataset.load_run_results(saved_run, cache=False, load_view=False)
