"""Interruptions: a killed segment run is marked unfinished, resumes to the uninterrupted result,
and two runs never write one field at the same time.

The killed run is a real process on the same database (conftest's private mongod, reached through
FIFTYONE_DATABASE_URI in the inherited environment), slowed down per image and SIGKILLed once its
first batch is in the database.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import fiftyone as fo
import numpy as np
import pytest

from ntt_core import NTTConfig
from ntt_operators import api, locks

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture
def banked_twice(scene_files):
    """Twelve samples (the scenes twice), one reference per class, bank ``bank``; persistent so
    that another process can load it."""
    dataset = fo.Dataset()
    dataset.persistent = True
    for path, instances in scene_files * 2:
        detections = [fo.Detection.from_mask(i.mask, label=i.label) for i in instances]
        dataset.add_sample(
            fo.Sample(filepath=path, ground_truth=fo.Detections(detections=detections))
        )
    dataset.compute_metadata()
    api.sample_references(dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(dataset, "ground_truth", "bank", config=TINY)
    yield dataset
    dataset.delete()


def start_slow_segment(dataset: fo.Dataset, field: str, delay_s: float) -> subprocess.Popen:
    """``api.segment`` into ``field`` in a child process, ``delay_s`` per image, batches of 2."""
    script = textwrap.dedent(
        f"""
        import time
        import fiftyone as fo
        from ntt_core.pipeline import NTTPredictor
        from ntt_operators import api

        predict = NTTPredictor.predict
        def slow_predict(self, image, bank):
            time.sleep({delay_s})
            return predict(self, image, bank)
        NTTPredictor.predict = slow_predict
        api.segment(fo.load_dataset({dataset.name!r}), "bank", {field!r}, batch_size=2)
        """
    )
    return subprocess.Popen(
        [sys.executable, "-c", script],
        env=os.environ,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def written(dataset: fo.Dataset, field: str) -> int:
    dataset.reload()
    return len(dataset.exists(field)) if dataset.has_sample_field(field) else 0


def wait_for(condition, child: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if child.poll() is not None:
            pytest.fail(f"the child run ended early: {child.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the child run wrote nothing in time"
        time.sleep(0.2)


def predictions(dataset: fo.Dataset, field: str, sample_ids: list[str]) -> list:
    """Per sample: (label, confidence, box, mask) of each prediction, comparable with ==."""
    rows = []
    for detections in dataset.select(sample_ids, ordered=True).values(field):
        rows.append(
            [
                (
                    d.label,
                    round(d.confidence, 5),
                    np.round(d.bounding_box, 6).tolist(),
                    d.mask.tobytes(),
                )
                for d in detections.detections
            ]
        )
    return rows


def test_a_killed_run_is_marked_running_refuses_a_second_writer_and_resumes_exactly(banked_twice):
    dataset = banked_twice
    targets = dataset.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    target_ids = targets.values("id")
    api.segment(targets, "bank", "expected")  # the uninterrupted run, for comparison

    child = start_slow_segment(dataset, "pred", delay_s=1.0)
    try:
        wait_for(lambda: written(dataset, "pred") >= 2, child)
        # A second run into the same field, while the first one writes: refused, nothing touched.
        with pytest.raises(locks.FieldBusyError, match=f"pid {child.pid}"):
            api.segment(dataset, "bank", "pred", skip_done=True)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    done_before = written(dataset, "pred")
    assert 2 <= done_before < len(target_ids)
    assert api.segment_status(dataset, "pred")["status"] == "running"  # never looks complete
    assert locks.holder(dataset, "pred")["pid"] == child.pid  # left behind by the killed run

    out = api.segment(dataset, "bank", "pred", skip_done=True)  # takes the dead run's lock over
    assert out["skipped"] == done_before and out["processed"] == len(target_ids) - done_before
    assert out["failed"] == {}
    assert api.segment_status(dataset, "pred")["status"] == "completed"
    assert locks.holder(dataset, "pred") is None
    assert predictions(dataset, "pred", target_ids) == predictions(dataset, "expected", target_ids)
    assert len(dataset.exists("pred")) == len(target_ids)  # references untouched


def owner_like(**changes) -> dict:
    me = locks._this_process()
    return {**me, "token": "another run", **changes}


@pytest.mark.parametrize(
    "owner, refused",
    [
        (lambda: owner_like(), True),  # a live process on this host
        (lambda: owner_like(host="elsewhere"), True),  # cannot be checked: assumed alive
        (lambda: owner_like(pid=finished_pid()), False),  # dead on this host: taken over
        (lambda: owner_like(process_started=1.0), False),  # pid reused by another process
    ],
)
def test_a_held_lock_refuses_unless_its_owner_is_dead(banked_twice, owner, refused):
    dataset = banked_twice
    one = dataset.match_tags("reference", bool=False).limit(1)
    held = owner()
    locks._store(dataset).set("pred", held)
    before = dataset.list_runs()
    if refused:
        with pytest.raises(locks.FieldBusyError, match="being written by another segment run"):
            api.segment(one, "bank", "pred")
        assert dataset.list_runs() == before and not dataset.has_sample_field("pred")
        assert locks.holder(dataset, "pred") == held
        assert locks.break_lock(dataset, "pred")  # the documented way out
    out = api.segment(one, "bank", "pred")
    assert out["processed"] == 1 and locks.holder(dataset, "pred") is None


def finished_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(child.stdout)
