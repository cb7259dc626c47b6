"""What a user of ``ntt`` sees: live bars on a terminal, plain lines in a pipe, readable summaries,
no third-party noise unless ``--verbose``, and ``ntt app`` serving with scheduling enabled.

The display is tested on a fake clock (no timing); the commands run as real processes, under a
pseudo-terminal or with pipes, on a small dataset with tiny random-weight models.
"""

import io
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import fiftyone as fo
import pytest
from fiftyone.core.odm import database

from ntt_core import NTTConfig
from ntt_core.synthetic import write_coco_dataset
from ntt_operators import api, cli
from ntt_operators.terminal import StepProgress, format_duration, format_failures, parse_label

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

MONGODB_NOTICE = "oldest supported major version of MongoDB"
JIT_WARNING = "torch.jit.script` is deprecated"
CLI = [sys.executable, "-m", "ntt_operators.cli"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def piped(**options) -> tuple[StepProgress, io.StringIO, FakeClock]:
    stream, clock = io.StringIO(), FakeClock()
    return StepProgress(stream, live=False, clock=clock, **options), stream, clock


def screen(raw: str) -> list[str]:
    """The lines a terminal shows once ``raw`` is written: ``\\r`` rewrites the line."""
    raw = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", raw).replace("\r\n", "\n")
    lines = []
    for line in raw.split("\n"):
        cells, column = [], 0
        for char in line:
            if char == "\r":
                column = 0
                continue
            cells[column : column + 1] = [char]
            column += 1
        lines.append("".join(cells).rstrip())
    return lines


# -- the display, on a fake clock -----------------------------------------------------------


@pytest.mark.parametrize(
    "label, parsed",
    [
        ("Segmented 3/10 samples", ("Segmented", 3, 10, "samples")),
        (
            "Downloading sam2_hiera_large.pt: 120/857 MB",
            ("Downloading sam2_hiera_large.pt", 120, 857, "MB"),
        ),
        ("Prepared 2.5/7.5 references", ("Prepared", 2.5, 7.5, "references")),
        ("Loading models", ("Loading models", None, None, "")),
        ("Encoding 40 references", ("Encoding 40 references", None, None, "")),
        ("Nothing to do 0/0 samples", ("Nothing to do 0/0 samples", None, None, "")),
    ],
)
def test_labels_that_count_get_a_bar(label, parsed):
    assert parse_label(label) == parsed


def test_piped_lines_say_count_percent_rate_and_eta():
    progress, stream, clock = piped()
    progress(0.0, "Loading models")
    clock.now = 12.0
    for done in range(1, 11):
        progress(done / 10, f"Segmented {done}/10 samples")
        clock.now += 3.0
    progress(1.0, "Segmented 10 samples into 'ntt'")
    assert stream.getvalue().splitlines() == [
        "[    0.0s] Loading models",
        "[   12.0s] Segmented 1/10 samples (10%)",
        "[   15.0s] Segmented 2/10 samples (20%, 0.33 samples/s, ETA 24.0s)",
        "[   18.0s] Segmented 3/10 samples (30%, 0.33 samples/s, ETA 21.0s)",
        "[   21.0s] Segmented 4/10 samples (40%, 0.33 samples/s, ETA 18.0s)",
        "[   24.0s] Segmented 5/10 samples (50%, 0.33 samples/s, ETA 15.0s)",
        "[   27.0s] Segmented 6/10 samples (60%, 0.33 samples/s, ETA 12.0s)",
        "[   30.0s] Segmented 7/10 samples (70%, 0.33 samples/s, ETA 9.0s)",
        "[   33.0s] Segmented 8/10 samples (80%, 0.33 samples/s, ETA 6.0s)",
        "[   36.0s] Segmented 9/10 samples (90%, 0.33 samples/s, ETA 3.0s)",
        "[   39.0s] Segmented 10/10 samples (100%, 0.33 samples/s)",
        "[   42.0s] Segmented 10 samples into 'ntt'",
    ]


def test_piped_lines_come_per_tenth_at_most_every_min_gap_and_at_the_end():
    progress, stream, clock = piped(min_gap=2.0)
    for done in range(1, 1001):  # 1000 samples in 10 s: one line per 2 s, not per 10 %
        clock.now = done / 100
        progress(done / 1000, f"Segmented {done}/1000 samples")
    lines = stream.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == [
        "[    0.0s",
        "[    2.0s",
        "[    4.0s",
        "[    6.0s",
        "[    8.0s",
        "[   10.0s",
    ]
    assert lines[-1] == "[   10.0s] Segmented 1000/1000 samples (100%, 100.0 samples/s)"


def test_a_slow_run_still_prints_a_line_every_heartbeat():
    progress, stream, clock = piped(heartbeat=60.0)
    for done in range(1, 301):  # 300 samples, 1 s each: a tenth is 30 s, the heartbeat 60 s
        clock.now = float(done)
        progress(done / 300, f"Segmented {done}/300 samples")
    times = [float(line[1:].split("s]")[0]) for line in stream.getvalue().splitlines()]
    assert times[:4] == [1.0, 30.0, 60.0, 90.0]  # every tenth (30 s) here
    assert max(b - a for a, b in zip(times, times[1:])) <= 60.0

    progress, stream, clock = piped(heartbeat=60.0)
    for done in range(1, 3001):  # a tenth is 300 s: the heartbeat fills the gaps
        clock.now = float(done)
        progress(done / 3000, f"Segmented {done}/3000 samples")
    times = [float(line[1:].split("s]")[0]) for line in stream.getvalue().splitlines()]
    assert times[:7] == [1.0, 61.0, 121.0, 181.0, 241.0, 300.0, 360.0]


def test_each_named_count_is_its_own_bar_and_logs_do_not_break_it():
    stream = io.StringIO()
    with StepProgress(stream, live=True, clock=FakeClock()) as progress:
        progress(0.0, "Loading models")
        progress(0.0, "Downloading sam2_hiera_large.pt: 120/857 MB")
        progress(0.0, "Downloading sam2_hiera_large.pt: 857/857 MB")
        progress.log("Importing 4 images")
        progress(0.5, "Segmented 1/2 samples")
        progress(1.0, "Segmented 2/2 samples")
    lines = [line for line in screen(stream.getvalue()) if line]
    assert lines[0] == "Loading models [00:00]"
    assert lines[1] == "[    0.0s] Importing 4 images"  # above the live bar, which moves down
    download = r"Downloading sam2_hiera_large\.pt: 100%\|#+\| 857/857 \[00:00<00:00, .* MB/s\]"
    assert re.fullmatch(download, lines[2]), lines
    assert re.fullmatch(r"Segmented: 100%\|#+\| 2/2 \[00:00<00:00, .* samples/s\]", lines[3])
    assert len(lines) == 4


def test_failures_are_listed_readably():
    failed = {f"id{k}": f"ImageError: cannot read /data/{k}.jpg\nTraceback..." for k in range(5)}
    failed["id1"] = "x" * 300
    assert format_failures(failed, "sample") == [
        "  sample id0: ImageError: cannot read /data/0.jpg",
        "  sample id1: " + "x" * 197 + "...",
        "  sample id2: ImageError: cannot read /data/2.jpg",
        "  ... and 2 more",
    ]
    assert format_failures({"a": ""}, "sample") == ["  sample a: ?"]


@pytest.mark.parametrize(
    "seconds, text", [(4.25, "4.2s"), (59.94, "59.9s"), (248, "4m 08s"), (7500, "2h 05m")]
)
def test_durations_read_like_a_clock(seconds, text):
    assert format_duration(seconds) == text


def test_verbose_is_accepted_before_or_after_any_subcommand():
    parser = cli.build_parser()
    assert not parser.parse_args(["banks", "list", "--dataset", "d"]).verbose
    assert parser.parse_args(["banks", "list", "--dataset", "d", "-v"]).verbose
    assert parser.parse_args(["--verbose", "segment", "--dataset", "d", "--bank", "b"]).verbose
    assert parser.parse_args(["app", "--dataset", "d", "--verbose"]).verbose


def test_fiftyone_messages_are_not_repeated_but_stray_warnings_still_show():
    # sam2 calls logging.info() on the root logger once per image; without a root handler that
    # installs basicConfig's, and every FiftyOne message is printed twice.
    script = textwrap.dedent(
        """
        import logging, sys
        from ntt_operators import terminal
        terminal.silence_known_noise()
        own = logging.getLogger("fiftyone.utils.eval")
        own.setLevel(logging.INFO)
        own.addHandler(logging.StreamHandler(sys.stdout))
        logging.info("For numpy array image, we assume (HxWxC) format")
        own.info("Evaluating detections...")
        logging.getLogger("somelib").warning("a library warning nobody handles")
        logging.getLogger("fiftyone.core.odm.database").warning(
            "You are running the oldest supported major version of MongoDB. Please ..."
        )
        logging.getLogger("fiftyone.core.odm.database").warning("Your MongoDB server is old")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Evaluating detections...\n"
    assert done.stderr == "a library warning nobody handles\nYour MongoDB server is old\n"


# -- the commands, as a user runs them --------------------------------------------------------


@pytest.fixture(scope="module")
def banked(tmp_path_factory):
    """A persistent dataset (the commands run in other processes) with a bank, one unreadable
    image, and the number of samples ``ntt segment`` will process."""
    folder = tmp_path_factory.mktemp("terminal")
    labels = write_coco_dataset(folder, 4, ["disc", "square"], seed=3, split="val2017")
    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(folder / "val2017"),
        labels_path=str(labels),
        label_types="segmentations",
        label_field="gt",
        name="terminal-runs",
        persistent=True,
    )
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not an image")
    dataset.add_sample(fo.Sample(filepath=str(broken)))
    api.sample_references(dataset, "gt", 1, seed=33)
    config = NTTConfig.tiny(weights="random", device="cpu", points_per_side=2)
    api.build_memory_bank(dataset, "gt", "bank", config=config)
    targets = dataset.match_tags("reference", bool=False).match_labels(tags="reference", bool=False)
    yield dataset, len(targets), dataset.match({"filepath": str(broken)}).first().id
    dataset.delete()


def command_env() -> dict:
    """A user's shell: database checks on (the MongoDB notice would be printed if not silenced),
    and no PYTHONWARNINGS left by the in-process ``cli.main`` calls of other tests."""
    env = {**os.environ, "FIFTYONE_DATABASE_VALIDATION": "true", "PYTHONPATH": _root()}
    env.pop("PYTHONWARNINGS", None)
    return env


def _root() -> str:
    return str(Path(__file__).resolve().parents[1])


def run_in_terminal(args: list[str], rows: int = 24, columns: int = 100) -> tuple[int, str]:
    """Runs ``args`` with stdout and stderr on a pseudo-terminal; returns (code, raw output)."""
    import fcntl
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(args, stdout=follower, stderr=follower, env=command_env())
    os.close(follower)
    chunks, deadline = [], time.monotonic() + 300
    while time.monotonic() < deadline:
        if not select.select([leader], [], [], 1)[0]:
            continue
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    try:
        code = process.wait(timeout=60)
    finally:
        process.kill()
    return code, b"".join(chunks).decode()


def test_segment_on_a_terminal_draws_live_bars_and_ends_with_a_summary(banked):
    dataset, targets, broken_id = banked
    args = ["segment", "--dataset", dataset.name, "--bank", "bank", "--label-field", "tty"]
    code, raw = run_in_terminal(CLI + args)
    assert code == 0, raw
    lines = [line for line in screen(raw) if line]
    assert re.fullmatch(r"Loading models \[\d\d:\d\d\]", lines[0]), lines
    bar = rf"Segmented: 100%\|█+\| {targets}/{targets} \[\d\d:\d\d<00:00, +[\d.]+ samples/s\]"
    # Then what loading does (the models' names), then the segmentation's bar.
    assert lines[1].startswith("Loading SAM2 sam2.1_hiera_tiny"), lines
    at = next(k for k, line in enumerate(lines) if line.startswith("Segmented:"))
    assert re.fullmatch(bar, lines[at]), lines
    assert raw.count("Segmented: ") >= 2  # redrawn in place while it runs
    processed = targets - 1
    assert re.fullmatch(
        rf"Segmented {processed} samples into 'tty' in [\d.]+s \([\d.]+ samples/s\): "
        r"\d+ instances?\.",
        lines[at + 2],
    ), lines
    assert lines[at + 3 :] == [
        "1 sample failed and was left empty:",
        f"  sample {broken_id}: ImageError: Cannot decode image {dataset[broken_id].filepath}: "
        f"cannot identify image file '{dataset[broken_id].filepath}'",
    ]
    assert MONGODB_NOTICE not in raw and JIT_WARNING not in raw and "Traceback" not in raw


def test_segment_piped_prints_plain_lines_and_verbose_brings_the_notices_back(banked):
    dataset, targets, _ = banked
    args = ["--verbose", "segment", "--dataset", dataset.name, "--bank", "bank"]
    done = subprocess.run(
        CLI + args + ["--label-field", "piped"],
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stdout + done.stderr
    progress_lines = [line for line in done.stderr.splitlines() if line.startswith("[")]
    assert re.fullmatch(r"\[ +[\d.]+s\] Loading models", progress_lines[0])
    assert re.fullmatch(
        rf"\[ +[\d.]+s\] Segmented {targets}/{targets} samples \(100%, [\d.]+ samples/s\)",
        progress_lines[-2],
    )
    assert progress_lines[-1].endswith(f"Segmented {targets - 1} samples into 'piped'")
    assert done.stdout.splitlines()[-3].startswith(f"Segmented {targets - 1} samples into")
    assert done.stdout.splitlines()[-2] == "1 sample failed and was left empty:"

    assert JIT_WARNING in done.stderr
    if database.get_db_version().major == fo.constants.MONGODB_MIN_VERSION.major:
        assert MONGODB_NOTICE in done.stdout + done.stderr


# -- ntt app ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_app_serves_the_dataset_with_scheduling_until_ctrl_c():
    dataset = fo.Dataset("terminal-app", persistent=True)
    port = _free_port()
    env = {k: v for k, v in command_env().items() if k != cli.SCHEDULING_ENV}
    args = ["app", "--dataset", dataset.name, "--port", str(port), "--address", "127.0.0.1"]
    app = subprocess.Popen(
        CLI + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        printed = []
        for line in app.stdout:  # the App server is up once the command prints its URL
            printed.append(line)
            if "Ctrl-C" in line:
                break
        text = "".join(printed)
        assert f"serves dataset 'terminal-app' at http://127.0.0.1:{port}/" in text, text
        assert "fiftyone delegated launch" in text

        options = _post(
            f"http://127.0.0.1:{port}/operators/resolve-execution-options",
            {
                "operator_uri": "@ntt/no_time_to_train/segment_with_references",
                "dataset_name": dataset.name,
                "params": {},
                "view": [],
                "selected": [],
                "selected_labels": [],
            },
        )
        # What the App's Execute menu reads: "Schedule" is offered, not "NOT AVAILABLE".
        assert options["allow_delegated_execution"] is True
        assert options["orchestrator_registration_enabled"] is False

        app.send_signal(signal.SIGINT)
        rest, _ = app.communicate(timeout=120)
        assert app.returncode == 0 and rest.strip().endswith("App stopped.")
        deadline = time.monotonic() + 60
        while _answers(port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _answers(port), "the App server outlived `ntt app`"
    finally:
        app.kill()
        dataset.delete()


def test_app_refuses_a_port_already_in_use(capsys):
    fo.Dataset("terminal-app-busy")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = cli.main(["app", "--dataset", "terminal-app-busy", "--port", str(port)])
    assert code == 2
    assert f"port {port} is already in use" in capsys.readouterr().err


def test_the_summary_names_skipped_samples_and_where_all_failures_are():
    summary = {
        "label_field": "ntt",
        "processed": 2,
        "skipped": 3,
        "failed": {f"id{k}": "ImageError: x" for k in range(4)},
        "instances": 1,
    }
    assert cli.segmentation_summary(summary, 10.0).splitlines() == [
        "Segmented 2 samples into 'ntt' in 10.0s (0.60 samples/s): 1 instance.",
        "Skipped 3 samples already done.",
        "4 samples failed and were left empty:",
        "  sample id0: ImageError: x",
        "  sample id1: ImageError: x",
        "  sample id2: ImageError: x",
        "  ... and 1 more",
        "  (all of them: api.segment_status(dataset, 'ntt')['failed'] in Python)",
    ]


def test_no_reachable_database_is_one_sentence_not_a_traceback():
    env = {
        **command_env(),
        "FIFTYONE_DATABASE_URI": "mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=500",
    }
    done = subprocess.run(
        CLI + ["banks", "list", "--dataset", "any"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("ntt: error: FiftyOne's database (MongoDB) cannot be reached")
    assert "FIFTYONE_DATABASE_URI" in done.stderr


class _FakeSession:
    def wait(self, timeout) -> None:
        raise KeyboardInterrupt

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    "address, launched, printed",
    [
        (None, "localhost", "http://localhost:{port}/ (only from this machine)"),
        ("0.0.0.0", "0.0.0.0", "(every network interface of this machine)"),
    ],
)
def test_app_binds_localhost_unless_told_and_says_where(
    monkeypatch, capsys, address, launched, printed
):
    dataset = fo.Dataset()
    seen = {}

    def launch_app(ds, port, address, remote):
        seen["address"] = address
        return _FakeSession()

    monkeypatch.setattr(fo, "launch_app", launch_app)
    monkeypatch.setattr(fo.config, "default_app_address", None)  # FiftyOne's in a container
    port = _free_port()
    args = ["app", "--dataset", dataset.name, "--port", str(port)]
    assert cli.main(args + (["--address", address] if address else [])) == 0
    assert seen["address"] == launched
    assert printed.format(port=port) in capsys.readouterr().out
    dataset.delete()
