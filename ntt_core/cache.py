"""Cached proposals: re-scoring a target against a new bank without running the models again.

Proposals and their features depend on the image and the frozen models, never on the bank, so
they are stored once per image (compacted: full-resolution RLE masks, no logits) and a changed
bank reruns only ``NTTPredictor.score``. An entry is keyed by the sample, and checked against the
image file's checksum and the identity of everything that shaped the proposals.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors.torch import save as save_tensors

from .bank import MemoryBank
from .config import NTTConfig
from .decay_record import DecayRecord
from .errors import ImageError
from .pipeline import NTTPredictor
from .proposals import Proposals
from .result import Instances

CACHE_FORMAT = "ntt-proposals"
CACHE_VERSION = 3  # 2: no no_mem_embed, x-major grid, unclamped logits; 3: RLEs as tensors


class ProposalStore(Protocol):
    """Where cached proposals live (a MongoDB collection in the plugin, a dict in tests)."""

    def get(self, key: str) -> bytes | None: ...

    def set(self, key: str, value: bytes) -> None: ...


@functools.lru_cache(maxsize=16)  # asked once per image when re-scoring thousands
def proposal_identity(config: NTTConfig) -> str:
    """A short hash of every setting that changes proposals (not the bank-side ones)."""
    fields = (
        "sam_model", "sam_config", "encoder_model", "weights", "sam_image_size",
        "encoder_image_size", "points_per_side", "add_no_mem_embed", "pred_iou_threshold",
    )  # fmt: skip
    described = json.dumps({name: getattr(config, name) for name in fields}, sort_keys=True)
    return hashlib.sha256(described.encode()).hexdigest()[:16]


def file_checksum(path: str | Path) -> str:
    """SHA-256 of the file; ``ImageError`` when it cannot be read (one sample's failure)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except FileNotFoundError as error:
        raise ImageError(f"Image file not found: {path}") from error
    except OSError as error:
        raise ImageError(f"Cannot read image {path}: {error}") from error
    return digest.hexdigest()


def proposals_to_bytes(proposals: Proposals, checksum: str, identity: str) -> bytes:
    if proposals.rles is None:
        raise ValueError("Compact the proposals (NTTPredictor.compact) before caching them")
    # The RLE strings as one byte tensor: a JSON list of them cost more to parse than scoring.
    counts = [_counts_bytes(rle) for rle in proposals.rles]
    tensors = {
        "pred_iou": proposals.pred_iou.float().contiguous(),
        "boxes": proposals.boxes.float().contiguous(),
        "features": proposals.features.float().contiguous(),
        "rle_counts": torch.from_numpy(np.frombuffer(b"".join(counts), np.uint8).copy()),
        "rle_lengths": torch.tensor([len(c) for c in counts], dtype=torch.int64),
    }
    header = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "checksum": checksum,
        "identity": identity,
        "image_size": list(proposals.image_size),
    }
    return save_tensors(tensors, metadata={"ntt_proposals": json.dumps(header)})


def _counts_bytes(rle: dict) -> bytes:
    counts = rle["counts"]
    return counts if isinstance(counts, bytes) else counts.encode("ascii")


_ENTRY_TENSORS = {
    "pred_iou": "<f4",
    "boxes": "<f4",
    "features": "<f4",
    "rle_counts": "u1",
    "rle_lengths": "<i8",
}
"""Each tensor of an entry and its NumPy dtype."""


def proposals_from_bytes(blob: bytes, checksum: str, identity: str) -> Proposals | None:
    """The cached proposals, or None when the entry is stale, foreign or unreadable. Read
    straight from the bytes, one copy per tensor (a re-score reads one entry per image)."""
    try:
        layout, header = _valid_layout(blob, checksum, identity)
        if layout is None:
            return None
        arrays = {name: _array(blob, layout, name, dtype) for name, dtype in _ENTRY_TENSORS.items()}
    except Exception:  # a damaged entry is recomputed, never trusted
        return None
    counts = arrays["rle_counts"].tobytes()
    ends = np.cumsum(arrays["rle_lengths"]).tolist()
    if len(ends) != len(arrays["pred_iou"]) or (ends and ends[-1] > len(counts)):
        return None
    size = list(header["image_size"])
    return Proposals(
        image_size=tuple(size),
        pred_iou=torch.from_numpy(arrays["pred_iou"].copy()),
        boxes=torch.from_numpy(arrays["boxes"].copy()),
        features=torch.from_numpy(arrays["features"].copy()),
        rles=[{"size": size, "counts": counts[a:b]} for a, b in zip([0, *ends], ends)],
    )


def cached_features(blob: bytes, checksum: str, identity: str) -> torch.Tensor | None:
    """The proposals' (P, C) features of a valid entry (None as ``proposals_from_bytes``),
    read straight from the bytes: the masks are not unpacked."""
    try:
        layout, _ = _valid_layout(blob, checksum, identity)
        if layout is None:
            return None
        return torch.from_numpy(_array(blob, layout, "features", "<f4").copy())
    except Exception:
        return None


def cached_features_and_counts(
    blob: bytes, checksum: str, identity: str
) -> tuple[np.ndarray, list[bytes], list[int]] | None:
    """A valid entry's (P, C) float32 features (a read-only view of ``blob``), each proposal's
    RLE counts and the image size (H, W), read straight from the bytes: what names a
    proposal's prediction (``labels.prediction_id_strings``) and its feature, without building
    ``Proposals`` (None as ``proposals_from_bytes``)."""
    try:
        layout, header = _valid_layout(blob, checksum, identity)
        if layout is None:
            return None
        features = _array(blob, layout, "features", "<f4")
        counts = _array(blob, layout, "rle_counts", "u1").tobytes()
        ends = np.cumsum(_array(blob, layout, "rle_lengths", "<i8")).tolist()
    except Exception:
        return None
    if len(ends) != len(features) or (ends and ends[-1] > len(counts)):
        return None
    rles = [counts[a:b] for a, b in zip([0, *ends], ends)]
    return features, rles, list(header["image_size"])


_SAFETENSORS_DTYPES = {"<f4": "F32", "u1": "U8", "<i8": "I64"}


def _array(blob: bytes, layout: dict, name: str, dtype: str) -> np.ndarray:
    """The tensor ``name`` of a safetensors ``layout`` as a read-only view of ``blob``; raises
    if it is stored with another dtype or lies outside ``blob``."""
    tensor = layout[name]
    if tensor["dtype"] != _SAFETENSORS_DTYPES[dtype]:
        raise ValueError(f"{name} is {tensor['dtype']}, not {dtype}")
    start, end = (layout["data_start"] + offset for offset in tensor["data_offsets"])
    values = np.frombuffer(
        blob, dtype=dtype, count=(end - start) // np.dtype(dtype).itemsize, offset=start
    )
    return values.reshape(tensor["shape"])


def entry_checksum(blob: bytes) -> str | None:
    """The image checksum an entry was made for (None: unreadable or foreign)."""
    try:
        (length,) = struct.unpack("<Q", blob[:8])
        header = json.loads(json.loads(blob[8 : 8 + length])["__metadata__"]["ntt_proposals"])
    except Exception:
        return None
    return header.get("checksum") if header.get("format") == CACHE_FORMAT else None


class FeatureFile:
    """Many images' proposal features as float16 rows of one append-only file: what the
    negatives screen reads (``NegativesScreen`` widens its margin for the
    rounding), without the masks and at half the size of the entries' float32 features.

    Rows are only appended: an image proposed again gets new rows, and the old ones stay
    unused until the file is deleted (``clear_proposal_cache``).
    """

    def __init__(self, path: str | Path, channels: int) -> None:
        self.path, self.channels = Path(path), channels
        self._row_bytes = 2 * channels
        self._buffers = threading.local()  # one per reading thread

    def append(self, features: torch.Tensor) -> int:
        """Appends (P, C) L2-normalised features; returns the index of their first row."""
        rows = features.detach().to(torch.float16).contiguous().numpy().tobytes()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # another process may append to the same file
            try:
                size = handle.seek(0, os.SEEK_END)
                start = -(-size // self._row_bytes)  # after a torn write, the next whole row
                handle.write(bytes(start * self._row_bytes - size) + rows)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return start

    def read_many(self, spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, list[bool]]:
        """The float16 rows of each ``(start, count)`` span, stacked in order, and whether the
        file holds each span (one it does not hold adds no rows). The rows are a view of a
        buffer that the thread's next call overwrites: a round reads gigabytes, and a fresh
        buffer per call would cost more in page faults than the reads (1-2 against 5 GB/s).
        One read per
        run of adjacent spans. Plain reads, not a memory map: a map's pages stay in the
        process's resident memory, which then grows to the whole file over a round."""
        try:
            with open(self.path, "rb") as handle:
                held = os.fstat(handle.fileno()).st_size // self._row_bytes
                present = [start + count <= held for start, count in spans]
                wanted = [span for span, ok in zip(spans, present) if ok]
                total = sum(count for _, count in wanted)
                rows = self._buffer(total)
                buffer = memoryview(rows.numpy()).cast("B")
                position = end = 0
                for start, count in _adjacent_runs(wanted):
                    handle.seek(start * self._row_bytes)
                    size = count * self._row_bytes
                    if handle.readinto(buffer[position : position + size]) < size:
                        raise FileNotFoundError(self.path)  # cut short since the size was read
                    position, end = position + size, (start + count) * self._row_bytes
                _read_ahead(handle, end, 2 * position)
        except FileNotFoundError:  # deleted meanwhile (Clear cached proposals)
            return torch.zeros(0, self.channels, dtype=torch.float16), [False] * len(spans)
        return rows, present

    def _buffer(self, rows: int) -> torch.Tensor:
        """This thread's buffer, grown to at least ``rows`` rows, as a view of ``rows`` rows."""
        buffer = getattr(self._buffers, "rows", None)
        if buffer is None or len(buffer) < rows:
            buffer = self._buffers.rows = torch.empty(rows, self.channels, dtype=torch.float16)
        return buffer[:rows]


def _read_ahead(handle: io.BufferedReader, offset: int, length: int) -> None:
    """Asks the kernel to start reading what follows: a round reads the rows in file order, and
    a cold read of 6 GB took 14.5 s in turns with the screen's work but 6.9 s with the next
    rows already on their way."""
    if length and hasattr(os, "posix_fadvise"):  # Linux; elsewhere the kernel's own readahead
        os.posix_fadvise(handle.fileno(), offset, length, os.POSIX_FADV_WILLNEED)


def _adjacent_runs(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(start, count)`` spans with each run of back-to-back ones merged into one."""
    runs: list[tuple[int, int]] = []
    for start, count in spans:
        if runs and sum(runs[-1]) == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + count)
        else:
            runs.append((start, count))
    return runs


def _valid_layout(blob: bytes, checksum: str, identity: str) -> tuple[dict | None, dict]:
    """The entry's safetensors layout (with ``data_start``, where the tensor bytes begin) and
    our header; the layout is None when the entry is stale or foreign. Raises if unreadable."""
    (length,) = struct.unpack("<Q", blob[:8])
    layout = json.loads(blob[8 : 8 + length])
    header = json.loads(layout["__metadata__"]["ntt_proposals"])
    expected = (CACHE_FORMAT, CACHE_VERSION, checksum, identity)
    found = tuple(header.get(k) for k in ("format", "version", "checksum", "identity"))
    return ({**layout, "data_start": 8 + length} if found == expected else None), header


def scoring_state(bank: MemoryBank, config: NTTConfig) -> tuple[str, str, list[str]]:
    """What re-scoring cached proposals depends on: ``(state, base, negatives)``.

    ``base`` hashes the classes, the prototypes and every setting but the device; ``negatives``
    has one key per negative (id, class, digest of its feature); ``state`` hashes both, so two
    runs with the same state give the same predictions from the same proposals.
    """
    settings = {k: v for k, v in config.to_dict().items() if k != "device"}
    base = hashlib.sha256(json.dumps([bank.classes, settings], sort_keys=True).encode())
    base.update(bank.prototypes.float().contiguous().numpy().tobytes())
    negatives = [
        f"{ref_id}|{int(label)}|{hashlib.sha256(feature.numpy().tobytes()).hexdigest()[:16]}"
        for ref_id, label, feature in zip(
            bank.negative_ids, bank.negative_labels, bank.negatives.float().contiguous()
        )
    ]
    state = hashlib.sha256(json.dumps([base.hexdigest(), sorted(negatives)]).encode())
    return state.hexdigest()[:32], base.hexdigest()[:32], negatives


def negatives_added_since(
    current: tuple[str, list[str]], recorded: tuple[str, list[str]]
) -> torch.Tensor | None:
    """Which of the current negatives are new since a recorded scoring state, both given as
    ``(base, negatives)`` of ``scoring_state``: (M,) bool, in the bank's order. None when the
    bank changed in any other way (classes, prototypes, settings, a negative removed): then
    every image must be re-scored."""
    (base, negatives), (recorded_base, recorded_negatives) = current, recorded
    before = set(recorded_negatives)
    if base != recorded_base or not before <= set(negatives):
        return None
    return torch.tensor([key not in before for key in negatives], dtype=torch.bool)


def predict_cached(
    predictor: NTTPredictor,
    image_path: str | Path,
    bank: MemoryBank,
    store: ProposalStore,
    key: str,
    checksum: str | None = None,
    record: DecayRecord | None = None,
) -> tuple[Instances, bool]:
    """Scores cached proposals when the store has a valid entry, else computes and stores them.

    ``checksum`` is the image file's (``file_checksum``), when the caller has it already;
    ``record`` the ``DecayRecord`` of a previous scoring of the cached proposals (used only on
    a hit, and only where it holds). Returns the instances and whether the cache was used.
    """
    checksum = checksum or file_checksum(image_path)
    identity = proposal_identity(predictor.config)
    blob = store.get(key)
    proposals = proposals_from_bytes(blob, checksum, identity) if blob else None
    hit = proposals is not None
    if not hit:
        proposals = predictor.compact(predictor.propose(image_path))
        store.set(key, proposals_to_bytes(proposals, checksum, identity))
    return predictor.score(proposals, bank, record if hit else None), hit
