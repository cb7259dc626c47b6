"""Run records survive the App server reloading the shared dataset object mid-registration."""

from __future__ import annotations

import fiftyone as fo
import pytest

from ntt_operators.api.common import register_run


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
