"""Shared fixtures.

FiftyOne reads its configuration at import time, so the isolation variables are set here,
before any test module imports it: each pytest run gets its own database directory (its own
private ``mongod``) and a unique database name, so it never touches a user's datasets.
"""

import os
import pathlib
import shutil
import tempfile
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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def run_dir() -> pathlib.Path:
    return _RUN_DIR


def pytest_sessionfinish(session, exitstatus):
    # fiftyone stops its private mongod when this process exits; the files go with the run dir.
    import atexit

    atexit.register(shutil.rmtree, _RUN_DIR, ignore_errors=True)
