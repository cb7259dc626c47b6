"""Shared fixtures.

FiftyOne reads its configuration at import time, so the isolation variables are set here,
before any test module imports it: each pytest run gets its own database directory (its own
private ``mongod``) and a unique database name, so it never touches a user's datasets.
"""

import os
import pathlib
import shutil
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ntt_operators import sandbox  # noqa: E402  (imports no fiftyone)

_RUN_DIR = pathlib.Path(tempfile.mkdtemp(prefix="ntt-tests-"))
os.environ.setdefault("OMP_NUM_THREADS", "2")
# The repository root is the plugin; FiftyOne finds it through a link in a private plugins dir.
_MONGOD = sandbox.isolate(_RUN_DIR, ROOT, name="ntt-tests")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def run_dir() -> pathlib.Path:
    return _RUN_DIR


def pytest_sessionfinish(session, exitstatus):
    # At exit (after FiftyOne's own handlers): stop our mongod, then remove the run dir.
    import atexit

    atexit.register(shutil.rmtree, _RUN_DIR, ignore_errors=True)
    atexit.register(_MONGOD.wait, timeout=30)
    atexit.register(_MONGOD.terminate)


# -- FiftyOne datasets of generated scenes (for the plugin tests) -----------------------------

SCENE_CLASSES = ("disc", "square")
SCENE_SIZE = (160, 200)  # (H, W)


@pytest.fixture(scope="session")
def scene_files(run_dir):
    """Six generated PNGs with their true instances: [(path, [SyntheticInstance])]."""
    import numpy as np
    from PIL import Image

    from ntt_core.synthetic import make_scene

    rng = np.random.default_rng(7)
    folder = run_dir / "scenes"
    folder.mkdir()
    scenes = []
    for i in range(6):
        pixels, instances = make_scene(rng, *SCENE_SIZE, SCENE_CLASSES)
        path = folder / f"scene_{i}.png"
        Image.fromarray(pixels).save(path)
        scenes.append((str(path), instances))
    return scenes


def add_scenes(dataset, scene_files) -> None:
    """Adds the scenes to ``dataset`` with ``ground_truth`` instance masks, and their metadata."""
    import fiftyone as fo

    dataset.add_samples(
        fo.Sample(
            filepath=path,
            ground_truth=fo.Detections(
                detections=[fo.Detection.from_mask(i.mask, label=i.label) for i in instances]
            ),
        )
        for path, instances in scene_files
    )
    dataset.compute_metadata()


@pytest.fixture
def scene_dataset(scene_files):
    """A fresh dataset of the scenes with ``ground_truth`` instance masks and metadata."""
    import fiftyone as fo

    dataset = fo.Dataset()
    add_scenes(dataset, scene_files)
    yield dataset
    if not dataset.deleted:  # a test may delete it to check what goes with it
        dataset.delete()
