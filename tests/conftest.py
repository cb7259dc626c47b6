"""Shared fixtures.

FiftyOne reads its configuration at import time, so the isolation variables are set here,
before any test module imports it: each pytest run gets its own database directory (its own
private ``mongod``) and a unique database name, so it never touches a user's datasets.
"""

import importlib.util
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[1]
_RUN_DIR = pathlib.Path(tempfile.mkdtemp(prefix="ntt-tests-"))

os.environ["FIFTYONE_DATABASE_DIR"] = str(_RUN_DIR / "db")
os.environ["FIFTYONE_DATABASE_NAME"] = f"ntt-tests-{uuid.uuid4().hex[:8]}"
os.environ.pop("FIFTYONE_DATABASE_URI", None)
os.environ["FIFTYONE_PLUGINS_DIR"] = str(_RUN_DIR / "plugins")
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_DEFAULT_DATASET_DIR"] = str(_RUN_DIR / "fiftyone")
os.environ["FIFTYONE_MODEL_ZOO_DIR"] = str(_RUN_DIR / "models")
os.environ["NTT_CACHE_DIR"] = str(_RUN_DIR / "ntt-cache")
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The repository root is the plugin; FiftyOne finds it through a link in a private plugins dir.
(_RUN_DIR / "plugins").mkdir()
(_RUN_DIR / "plugins" / "ntt").symlink_to(ROOT, target_is_directory=True)


def _start_private_mongod(db_dir: pathlib.Path) -> subprocess.Popen:
    """Our own mongod, reached through FIFTYONE_DATABASE_URI.

    FiftyOne's spawned database service is machine-wide: a second process attaches to any
    running one whatever its FIFTYONE_DATABASE_DIR, so concurrent test sessions would share the
    first session's mongod and lose it when that session ends and deletes its run dir.
    """
    # find_spec locates fiftyone without importing it: its config must see the URI first.
    mongod = pathlib.Path(importlib.util.find_spec("fiftyone").origin).parent / "db/bin/mongod"
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (db_dir / "log").mkdir(parents=True)
    process = subprocess.Popen(
        [
            str(mongod),
            "--dbpath",
            str(db_dir),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--nounixsocket",
            "--logpath",
            str(db_dir / "log" / "mongo.log"),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
                return process
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"private mongod did not start; see {db_dir / 'log' / 'mongo.log'}")


_MONGOD = _start_private_mongod(_RUN_DIR / "db")

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


@pytest.fixture
def scene_dataset(scene_files):
    """A fresh dataset of the scenes with ``ground_truth`` instance masks and metadata."""
    import fiftyone as fo

    dataset = fo.Dataset()
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
    yield dataset
    if not dataset.deleted:  # a test may delete it to check what goes with it
        dataset.delete()
