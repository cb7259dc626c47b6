"""Segmenting many images on Ray Data: one stateful actor per GPU (or CPU slot), streamed batches.

The unit of work is ``predict_or_error`` — ``NTTPredictor.predict`` with per-image failures turned
into an error string — which the single-process path calls too, so both give the same answers.
Workers read images from their paths (local disk on one machine, shared storage on a cluster)
and send results back as plain data; only the driver writes them anywhere.

``ray`` is imported inside functions so that ``ntt_core`` works without the optional extra.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .bank import MemoryBank
from .cache import ProposalStore, predict_cached
from .config import NTTConfig
from .decay_record import DecayRecord
from .errors import NTTError
from .pipeline import NTTPredictor
from .result import Instances

Result = tuple[str, Instances | None, str | None]
"""(sample id, instances or None, error message or None)."""

# A dead actor (OOM, segfault, lost node) is restarted and its batch retried this many times
# before the run fails; per-image errors are caught and never kill an actor.
_MAX_RESTARTS = 3
_MAX_TASK_RETRIES = 3


def predict_or_error(
    predictor: NTTPredictor,
    filepath: str,
    bank: MemoryBank,
    store: ProposalStore | None = None,
    key: str = "",
    checksum: str | None = None,
    record: DecayRecord | None = None,
) -> tuple[Instances | None, str | None]:
    """One image's instances, or the reason it failed (an unreadable image must not stop a run).

    With a ``store``, proposals cached under ``key`` are re-scored instead of recomputed
    (``checksum``: the image file's, when the caller has it already; ``record``: the previous
    scoring's ``DecayRecord``).
    """
    try:
        if store is not None:
            found = predict_cached(predictor, filepath, bank, store, key, checksum, record)
            return found[0], None
        return predictor.predict(filepath, bank), None
    except NTTError as error:
        return None, f"{type(error).__name__}: {error}"


def instances_to_dict(instances: Instances) -> dict[str, Any]:
    """Plain data (numpy arrays, RLE dicts, lists) that crosses process boundaries as is."""
    return {
        "image_size": list(instances.image_size),
        "boxes": instances.boxes,
        "scores": instances.scores,
        "labels": instances.labels,
        "class_names": list(instances.class_names),
        "rles": list(instances.rles),
        "explanation": instances.explanation,
    }


def instances_from_dict(data: dict[str, Any]) -> Instances:
    return Instances(
        image_size=tuple(data["image_size"]),
        boxes=np.asarray(data["boxes"], dtype=np.float32).reshape(-1, 4),
        scores=np.asarray(data["scores"], dtype=np.float32),
        labels=np.asarray(data["labels"], dtype=np.int64),
        class_names=list(data["class_names"]),
        rles=[dict(rle) for rle in data["rles"]],
        explanation=data.get("explanation"),
    )


class SegmentActor:
    """A Ray Data actor: builds the predictor and the bank once, then segments batches of paths."""

    def __init__(self, config: dict[str, Any], bank_bytes: bytes, num_threads: int) -> None:
        import torch

        # Several actors share a machine's cores; each takes only its share.
        torch.set_num_threads(num_threads)
        self.predictor = NTTPredictor(_actor_config(NTTConfig.from_dict(config)))
        self.bank = MemoryBank.from_bytes(bank_bytes)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results, errors = [], []
        for filepath in batch["filepath"]:
            instances, error = predict_or_error(self.predictor, str(filepath), self.bank)
            results.append(None if instances is None else instances_to_dict(instances))
            errors.append(error)
        return {
            "sample_id": batch["sample_id"],
            # Object columns: Ray keeps the dicts and arrays as they are, whatever their shapes.
            "result": _object_array(results),
            "error": _object_array(errors),
        }


def segment_on_ray(
    items: Sequence[tuple[str, str]],
    bank_bytes: bytes,
    config: NTTConfig,
    num_actors: int = 2,
    gpus_per_actor: float | None = None,
    batch_size: int = 4,
    address: str | None = None,
    cpus_per_actor: float | None = None,
) -> Iterator[Result]:
    """Segments ``(sample_id, filepath)`` items on Ray, yielding results as they complete.

    ``address``: an existing cluster (``"auto"``, ``"ray://host:10001"``, ...); ``None`` starts a
    local one on demand. ``gpus_per_actor`` defaults to 1 when the config asks for CUDA (or
    ``"auto"`` and the cluster has GPUs), else 0. ``cpus_per_actor`` (also its torch threads)
    defaults to 1, or to an even share of this machine's cores for a local CPU run. Results come
    in completion order, not input order; each image appears exactly once.
    """
    if num_actors < 1 or batch_size < 1:
        raise ValueError("num_actors and batch_size must be at least 1")
    if not items:
        return
    ray = _init_ray(address, num_actors)
    # The caller reports progress per result; Ray Data's own bars would only add noise.
    ray.data.DataContext.get_current().enable_progress_bars = False
    gpus = _gpus_per_actor(config, gpus_per_actor, ray.cluster_resources())
    if cpus_per_actor is None:
        cpus_per_actor = _default_cpus(address is None and not gpus, num_actors)
    rows = [{"sample_id": sample_id, "filepath": str(path)} for sample_id, path in items]
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for actor restarts/retries yet, only these kwargs.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_items(rows).map_batches(
            SegmentActor,
            fn_constructor_kwargs={
                "config": config.to_dict(),
                "bank_bytes": bank_bytes,
                "num_threads": max(1, int(cpus_per_actor)),
            },
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=cpus_per_actor,
            num_gpus=gpus,
            # Bounded (Ray Data's default is unbounded): an image that kills its worker every
            # time must fail the run after a few tries, not loop forever.
            max_restarts=_MAX_RESTARTS,
            max_task_retries=_MAX_TASK_RETRIES,
        )
    for row in dataset.iter_rows():
        result = row["result"]
        instances = None if result is None else instances_from_dict(result)
        yield str(row["sample_id"]), instances, row["error"]


def _init_ray(address: str | None, num_actors: int):
    import ray

    if not ray.is_initialized():
        if address is None:
            # A local cluster sized to this machine, quiet: no dashboard, no worker log spam.
            ray.init(
                num_cpus=max(os.cpu_count() or 1, num_actors),
                include_dashboard=False,
                log_to_driver=False,
                ignore_reinit_error=True,
            )
        else:
            ray.init(address=address, log_to_driver=False, ignore_reinit_error=True)
    return ray


def _gpus_per_actor(
    config: NTTConfig, requested: float | None, resources: dict[str, float]
) -> float:
    if requested is not None:
        return requested
    if config.device.startswith("cuda"):
        return 1
    return 1 if config.device == "auto" and resources.get("GPU", 0) > 0 else 0


def _default_cpus(local_cpu_run: bool, num_actors: int) -> int:
    # On one CPU machine the actors are the whole workload, so they split its cores.
    return max(1, (os.cpu_count() or 1) // num_actors) if local_cpu_run else 1


def _actor_config(config: NTTConfig) -> NTTConfig:
    # Ray gives each GPU actor its own device as the only visible one, so "cuda:N" means "cuda".
    if config.device.startswith("cuda:"):
        return config.replace(device="cuda")
    return config


def _object_array(values: list[Any]) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array
