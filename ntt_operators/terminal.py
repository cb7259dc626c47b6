"""What the ``ntt`` command shows: live progress of the steps, readable summaries, and quiet.

``StepProgress`` is the ``progress`` callback every ``ntt`` subcommand hands to the api steps. The
steps report ``(fraction, label)``; a label that counts (``"Segmented 3/10 samples"``,
``"Downloading sam2_hiera_large.pt: 120/857 MB"``) gets a bar with done/total, rate and ETA, any
other label (``"Loading models"``) a line that ends with its duration. On a terminal the bars are
tqdm's, live; in a pipe or a log file they become plain lines: one when a step starts, one per
10 % (at most one every ``min_gap`` seconds), one at least every ``heartbeat`` seconds, one at
the end.

``silence_known_noise`` hides the third-party messages every run would otherwise open with.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm

_COUNTED_BAR = (
    # tqdm's default, but the rate always per second: its default turns "0.5 samples/s" into
    # "2.00s/ samples".
    "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
    "{rate_noinv_fmt}]"
)
# "<done>/<total> <unit>" anywhere in a step's label; the text before it names the step.
_COUNT = re.compile(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)(?:\s+([^\W\d]\w*))?")
_MONGODB_NOTICE = "You are running the oldest supported major version of MongoDB"
_JIT_WARNING = "`torch.jit.script` is deprecated"
FAILURES_SHOWN = 3


@dataclass
class Step:
    """One step of a run as the labels describe it; counted steps have ``total`` and ``unit``."""

    name: str
    label: str
    started: float
    total: float | None = None
    unit: str = ""
    first_done: float = 0.0
    done: float = 0.0
    updated: float = 0.0
    reported_tenth: int = -1

    @property
    def counted(self) -> bool:
        return self.total is not None

    def rate(self) -> float | None:
        """Units per second since the step's first count (None until two counts apart)."""
        seconds = self.updated - self.started
        if self.done <= self.first_done or seconds <= 0:
            return None
        return (self.done - self.first_done) / seconds


def parse_label(label: str) -> tuple[str, float | None, float | None, str]:
    """``(step name, done, total, unit)``; done/total are None when the label does not count."""
    match = _COUNT.search(label)
    if match is None or float(match[2]) <= 0:
        return label, None, None, ""
    unit = match[3] or ""
    name = label[: match.start()].rstrip(" :") or unit or "Progress"
    return name, _number(match[1]), _number(match[2]), unit


def _number(text: str) -> float:
    return float(text) if "." in text else int(text)


class StepProgress:
    """A ``progress(fraction, label)`` callback that draws the steps on ``stream`` (stderr).

    Use it as a context manager around the run; ``log(line)`` prints a timestamped line without
    breaking a live bar. ``live`` defaults to whether ``stream`` is a terminal.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        live: bool | None = None,
        heartbeat: float = 60.0,
        min_gap: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.heartbeat = heartbeat
        self.min_gap = min_gap
        self.clock = clock
        self.started = clock()
        self._step: Step | None = None
        self._bar: tqdm | None = None
        self._last_line = self.started

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __call__(self, fraction: float, label: str) -> None:
        name, done, total, unit = parse_label(label)
        now = self.clock()
        if total is None and fraction >= 1:
            # A run's closing message ("Segmented 998 samples into 'ntt'"): a line, not a bar.
            self._start(Step(label, label, now), draw=False)
            self.log(label)
            return
        step = self._step
        if step is None or (step.name, step.unit, step.counted) != (name, unit, total is not None):
            first = done or 0.0
            step = Step(name, label, now, total, unit, first_done=first, done=first, updated=now)
            self._start(step)
        step.label, step.done, step.updated = label, done or 0.0, now
        if total is not None:
            step.total = total
        if self.live:
            self._draw(step)
        elif step.counted and self._due(step, now):
            self._report(step, now)

    def log(self, line: str) -> None:
        """A line of the run's story (e.g. "Importing 5000 images"), with the time since start."""
        text = f"[{self.elapsed():7.1f}s] {line}"
        if self.live:
            tqdm.write(text, file=self.stream)
        else:
            self._write(text)

    def elapsed(self) -> float:
        return self.clock() - self.started

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.stream.flush()

    # -- drawing ---------------------------------------------------------------------------

    def _start(self, step: Step, draw: bool = True) -> None:
        self.close()
        self._step = step
        if draw and self.live:
            self._bar = self._new_bar(step)
        elif draw:
            self._report(step, step.started)

    def _new_bar(self, step: Step) -> tqdm:
        common = {"file": self.stream, "leave": True, **_bar_size(self.stream)}
        if not step.counted:
            # No count to draw: the label, and how long it took once the next step starts.
            return tqdm(desc=step.label, bar_format="{desc} [{elapsed}]", **common)
        unit = f" {step.unit}" if step.unit else ""
        return tqdm(
            desc=step.name,
            total=step.total,
            initial=step.done,
            unit=unit,
            smoothing=0.1,
            bar_format=_COUNTED_BAR,
            **common,
        )

    def _draw(self, step: Step) -> None:
        if step.counted and self._bar is not None:
            self._bar.total = step.total
            self._bar.update(step.done - self._bar.n)  # redraws at most every 0.1 s

    def _due(self, step: Step, now: float) -> bool:
        since = now - self._last_line
        if step.done >= step.total or since >= self.heartbeat:
            return True
        return int(10 * step.done / step.total) > step.reported_tenth and since >= self.min_gap

    def _report(self, step: Step, now: float) -> None:
        text = step.label
        if step.counted:
            step.reported_tenth = int(10 * step.done / step.total)
            text += f" ({100 * step.done / step.total:.0f}%"
            rate = step.rate()
            if rate is not None:
                text += f", {format_rate(rate, step.unit)}"
                if step.done < step.total:
                    text += f", ETA {format_duration((step.total - step.done) / rate)}"
            text += ")"
        self._last_line = now
        self._write(f"[{now - self.started:7.1f}s] {text}")

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _bar_size(stream: TextIO) -> dict:
    """Follow the terminal's width; a terminal that reports no size (some containers' and CI's
    pseudo-terminals say 0 x 0) would make tqdm draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": 100, "nrows": 24}


# -- summaries ------------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``42.0s``, ``4m 08s``, ``2h 05m``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def format_rate(per_second: float, unit: str) -> str:
    per = f"{unit}/s" if unit else "/s"
    if per_second >= 1:
        return f"{per_second:.1f} {per}"
    return f"{per_second:.2f} {per}"


def plural(count: int, noun: str) -> str:
    """``1 sample``, ``1,204 samples``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def format_failures(failed: Mapping[str, str], what: str, shown: int = FAILURES_SHOWN) -> list[str]:
    """The first ``shown`` failures as ``  sample ID: message`` lines, and how many more."""
    lines = []
    for item_id, message in list(failed.items())[:shown]:
        text = str(message).strip()
        lines.append(f"  {what} {item_id}: {_shorten(text.splitlines()[0], 200) if text else '?'}")
    if len(failed) > shown:
        lines.append(f"  ... and {len(failed) - shown:,} more")
    return lines


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# -- third-party noise ----------------------------------------------------------------------


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


class _LastResortHandler(logging.Handler):
    """Python's last-resort behaviour (warnings of loggers without a handler go to stderr), as
    a root handler.

    A root logger without handlers lets any ``logging.info(...)`` call (sam2 makes one per image)
    install ``basicConfig``'s handler, which then repeats every FiftyOne message on stderr as
    ``INFO:fiftyone...``; this handler is there first and adds nothing FiftyOne prints itself.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger is not None and logger is not logging.root:
            if logger.handlers:
                return False
            logger = logger.parent
        return True

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def silence_known_noise() -> None:
    """Hides, narrowly, the third-party messages that say nothing about the user's run:

    - FiftyOne's "oldest supported major version of MongoDB" notice (the Debian database wheel
      is MongoDB 6.0), dropped by message on its logger; other database checks still speak;
    - ``torch.jit.script``'s FutureWarning, raised when sam2 builds its transforms (also in
      subprocesses such as Ray workers, through ``PYTHONWARNINGS``);
    - FiftyOne's messages repeated as ``INFO:fiftyone...`` (see ``_LastResortHandler``);
    - FiftyOne's own progress bars when stdout is not a terminal, where their carriage returns
      fill log files (unless ``FIFTYONE_SHOW_PROGRESS_BARS`` says otherwise).

    Call it before fiftyone is imported (calling it again changes nothing). ``ntt --verbose``
    skips it.
    """
    database_logger = logging.getLogger("fiftyone.core.odm.database")
    if not any(isinstance(f, _DropMessages) for f in database_logger.filters):
        database_logger.addFilter(_DropMessages(_MONGODB_NOTICE))
    warnings.filterwarnings(
        "ignore", message=re.escape(_JIT_WARNING), category=FutureWarning, module=r"torch\.jit\."
    )
    rules = [r for r in os.environ.get("PYTHONWARNINGS", "").split(",") if r]
    jit_rule = f"ignore:{_JIT_WARNING}:FutureWarning"
    os.environ["PYTHONWARNINGS"] = ",".join(rules + [jit_rule] * (jit_rule not in rules))
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(_LastResortHandler())
    if not sys.stdout.isatty():
        os.environ.setdefault("FIFTYONE_SHOW_PROGRESS_BARS", "false")
