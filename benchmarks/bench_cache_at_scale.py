"""The correction round's re-score at the paper's sizes, without models.

    nice .venv/bin/python benchmarks/bench_cache_at_scale.py --samples 1000
    nice .venv/bin/python benchmarks/bench_cache_at_scale.py --samples 10000 --proposals 800

Synthetic cache entries shaped like SAM2-L + DINOv2-L output, written through the plugin's own
cache (``ProposalCache.set`` of ``proposals_to_bytes``), on a throwaway database:
- ``--proposals`` per image (300 after the IoU filter; 800 is the worst case), 1024-d features;
- features with the structure the method sees: 80 class directions; per image 1-5 objects, each
  seen by about 15 proposals (feature = direction + noise), 30% of the objects "look-alikes" of
  a class (half-way to its direction: the false positives a curator tags negative), the rest
  background proposals leaning weakly to a random class. Every feature has its own noise, so no
  two images are alike and no screen can lean on copies;
- masks: ellipses (10-200 px axes) in a 480x640 image, RLE-encoded by pycocotools, drawn per
  image from a pool of 4,000 (their RLEs are 100-1,000 bytes, like object masks);
- image files: 64 random bytes each (checksummed, never decoded: every sample is cached).

Every sample is stamped as scored by the starting bank (10 references per class); then, for each
case, the bank changes and the re-score runs (``segment._predict_locally``, the function the
plugin's re-score runs, with the previous run's screen): a new negative (a look-alike's
proposal), a new reference, an accepted prediction (an object proposal's own feature). Printed
per case: read / screen / score seconds, samples screened out, peak RSS of the round, and the
cache's size on disk. ``--score-limit N`` stops a case after N scored samples and extrapolates
(said in the output). ``--cold`` empties the operating system's file cache before each case
(needs root), so that the rows are read from the disk. Comparing and writing labels is not
part of this benchmark: ``bench_correction_round.py`` runs the plugin end to end.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

from ntt_operators import sandbox  # imports no fiftyone

_DB = sandbox.throwaway("ntt-bench-", Path(__file__).resolve().parents[1])

import fiftyone as fo  # noqa: E402
import fiftyone.core.odm as foo_odm  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools import mask as mask_utils  # noqa: E402

from ntt_core import MemoryBank, NTTConfig, NTTPredictor  # noqa: E402
from ntt_core.cache import proposal_identity, proposals_to_bytes, scoring_state  # noqa: E402
from ntt_core.models import encoder_identity  # noqa: E402
from ntt_core.proposals import Proposals  # noqa: E402
from ntt_operators.api.rescore import Screen, Stamping  # noqa: E402
from ntt_operators.api.segment import UNCHANGED, _predict_locally  # noqa: E402
from ntt_operators.proposal_cache import ProposalCache  # noqa: E402

CLASSES, CHANNELS, SHOTS = 80, 1024, 10
HEIGHT, WIDTH, POOL = 480, 640, 4000
FIELD = "ntt_predictions"


class World:
    """Class directions, look-alikes and a mask pool: what every synthetic image is made of."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.centers = _unit(self.rng.standard_normal((CLASSES, CHANNELS)))
        self.lookalike_class = self.rng.integers(0, CLASSES, 40)
        noise = _unit(self.rng.standard_normal((40, CHANNELS)))
        self.lookalikes = _unit(self.centers[self.lookalike_class] + noise)
        self.rles, self.boxes = _mask_pool(self.rng)

    def proposals(self, count: int) -> tuple[Proposals, dict[str, tuple[np.ndarray, int]]]:
        """One image's proposals, and a few of its features by kind (for the bank changes)."""
        rng, features, kinds = self.rng, [], {}
        for _ in range(rng.integers(1, 6)):
            if rng.random() < 0.3:
                which = rng.integers(0, len(self.lookalikes))
                direction, label, kind = self.lookalikes[which], self.lookalike_class[which], "fp"
            else:
                label = rng.integers(0, CLASSES)
                direction, kind = self.centers[label], "object"
            parts = _unit(direction + 0.6 * _unit(rng.standard_normal((15, CHANNELS))))
            kinds.setdefault(kind, (parts[0], int(label)))
            features.append(parts)
        background = count - sum(len(f) for f in features)
        lean = self.centers[rng.integers(0, CLASSES, background)]
        features.append(_unit(0.35 * lean + _unit(rng.standard_normal((background, CHANNELS)))))
        picked = rng.choice(POOL, count, replace=False)
        proposals = Proposals(
            image_size=(HEIGHT, WIDTH),
            pred_iou=torch.from_numpy(rng.uniform(0.7, 1.0, count).astype(np.float32)),
            boxes=torch.from_numpy(self.boxes[picked]),
            features=torch.from_numpy(np.concatenate(features)[:count].astype(np.float32)),
            rles=[self.rles[i] for i in picked],
        )
        return proposals, kinds


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def _mask_pool(rng: np.random.Generator) -> tuple[list[dict], np.ndarray]:
    ys, xs = np.mgrid[:HEIGHT, :WIDTH]
    rles = []
    for _ in range(POOL):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ay, ax = rng.uniform(10, 200, 2)
        angle = rng.uniform(0, np.pi)
        u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
        v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
        inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1
        inside[int(np.clip(cy, 0, HEIGHT - 1)), int(np.clip(cx, 0, WIDTH - 1))] = True
        rles.append(mask_utils.encode(np.asfortranarray(inside.astype(np.uint8))))
    boxes = mask_utils.toBbox(rles).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    return rles, boxes


def main() -> None:
    args = _parse()
    config = NTTConfig(weights="random", device="cpu")
    world = World()
    dataset = _dataset(args.samples)
    try:
        bank = _bank(world, config)
        kinds = _fill_cache(dataset, config, world, args.proposals, bank)
        _report_size(dataset)
        for case, changed in _cases(bank, kinds, world).items():
            if args.cold:
                _drop_file_cache()
            _round(dataset, config, bank, changed, case, args.score_limit)
    finally:
        dataset.delete()


def _dataset(samples: int) -> fo.Dataset:
    folder = Path(_DB) / "images"
    folder.mkdir()
    paths = []
    for i in range(samples):
        path = folder / f"{i:05d}.jpg"
        path.write_bytes(os.urandom(64))
        paths.append(str(path))
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=p) for p in paths], progress=False)
    return dataset


def _fill_cache(
    dataset: fo.Dataset, config: NTTConfig, world: World, count: int, bank: MemoryBank
) -> dict[str, tuple[np.ndarray, int]]:
    """Caches every image's proposals, and scores them with ``bank`` as the first round does:
    each scoring's ``DecayRecord`` is kept beside its stamp, for the next re-score."""
    from ntt_core.cache import file_checksum

    cache, identity = ProposalCache(dataset, config), proposal_identity(config)
    predictor = NTTPredictor(config, load=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the plugin scores cached proposals
    start, kinds, records, scoring = time.perf_counter(), {}, {}, 0.0
    for sample_id, path in zip(*dataset.values(["id", "filepath"])):
        proposals, found = world.proposals(count)
        kinds = {**found, **kinds}  # the first image's, where it has that kind
        cache.set(sample_id, proposals_to_bytes(proposals, file_checksum(path), identity))
        scored = time.perf_counter()
        records[sample_id] = predictor.score(proposals, bank).decay_record.to_bytes()
        scoring += time.perf_counter() - scored
        if len(records) == 500:
            cache.save_records(FIELD, records)
            records = {}
    cache.save_records(FIELD, records)
    torch.set_num_threads(threads)
    print(
        f"wrote {len(dataset)} entries of {count} proposals x {CHANNELS}-d through the cache "
        f"and scored them ({scoring:.1f} s of it) in {time.perf_counter() - start:.1f} s "
        f"({_load()})",
        flush=True,
    )
    return kinds


def _bank(world: World, config: NTTConfig) -> MemoryBank:
    labels = np.repeat(np.arange(CLASSES), SHOTS)
    noise = _unit(world.rng.standard_normal((len(labels), CHANNELS)))
    features = _unit(world.centers[labels] + 0.6 * noise)
    return MemoryBank(
        classes=[f"class{k}" for k in range(CLASSES)],
        features=torch.from_numpy(features.astype(np.float32)),
        labels=torch.from_numpy(labels),
        ref_ids=[f"ref{i}" for i in range(len(labels))],
        encoder=encoder_identity(config),
        encoder_image_size=config.encoder_image_size,
    )


def _cases(
    bank: MemoryBank, kinds: dict[str, tuple[np.ndarray, int]], world: World
) -> dict[str, MemoryBank]:
    fp_feature, fp_label = kinds["fp"]
    object_feature, object_label = kinds["object"]
    fresh = _unit(world.centers[3] + 0.6 * _unit(world.rng.standard_normal(CHANNELS)))
    return {
        "a new negative": _with(bank, negative=(fp_feature, fp_label)),
        "a new reference": _with(bank, reference=(fresh, 3)),
        "an accepted prediction": _with(bank, reference=(object_feature, object_label)),
    }


def _with(bank: MemoryBank, negative=None, reference=None) -> MemoryBank:
    """``bank`` plus one negative or one positive reference."""
    features, labels, ids = bank.features, bank.labels, list(bank.ref_ids)
    negatives, negative_labels, negative_ids = None, None, []
    if reference is not None:
        features = torch.cat([features, torch.from_numpy(reference[0][None]).float()])
        labels, ids = torch.cat([labels, torch.tensor([reference[1]])]), [*ids, "new-ref"]
    if negative is not None:
        negatives = torch.from_numpy(negative[0][None]).float()
        negative_labels, negative_ids = torch.tensor([negative[1]]), ["new-negative"]
    return MemoryBank(
        classes=bank.classes,
        features=features,
        labels=labels,
        ref_ids=ids,
        encoder=bank.encoder,
        encoder_image_size=bank.encoder_image_size,
        negative_features=negatives,
        negative_labels=negative_labels,
        negative_ids=negative_ids,
    )


def _round(
    dataset: fo.Dataset,
    config: NTTConfig,
    before: MemoryBank,
    after: MemoryBank,
    case: str,
    score_limit: int | None,
) -> None:
    """Stamps every sample as scored by ``before``, then re-scores under ``after``."""
    cache = ProposalCache(dataset, config)
    sample_ids, paths = dataset.values(["id", "filepath"])
    old_state, old_base, old_negatives = scoring_state(before, config)
    state, base, negatives = scoring_state(after, config)
    epoch = uuid.uuid4().hex
    cache.stamp(sample_ids, FIELD, {"epoch": epoch, "state": old_state})
    states = {
        old_state: {"base": old_base, "negatives": old_negatives},
        state: {"base": base, "negatives": negatives},
    }
    identity = proposal_identity(config)
    screen = Screen(after, identity, epoch, (base, negatives), states, config.negative_sigma)
    stamping = Stamping({"epoch": uuid.uuid4().hex, "state": state}, states, screen, FIELD)
    predictor = NTTPredictor(config, load=False)
    timings = dict.fromkeys(("read_cache", "screen", "score"), 0.0)
    _reset_peak_rss()
    load_before, start = _load(), time.perf_counter()
    done = scored = 0
    results = _predict_locally(predictor, after, sample_ids, paths, cache, timings, stamping)
    with _Calls(NTTPredictor, "_decay_record") as full_scorings:
        for _, result, error in results:
            assert error is None, error
            done += 1
            scored += result is not UNCHANGED
            if score_limit and scored >= score_limit:
                break
        seconds = time.perf_counter() - start
        results.close()
    extrapolated = ""
    if done < len(sample_ids):
        factor = len(sample_ids) / done
        extrapolated = f"; stopped after {done} samples: x{factor:.1f} = {seconds * factor:.0f} s"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in timings.items())
    print(
        f"{case}: {seconds:.2f} s over {done} samples ({parts}); screened out "
        f"{done - scored}, scored {scored} ({full_scorings.count} of them from the masks, the "
        f"others from their records); peak RSS {_peak_rss_gb():.2f} GB{extrapolated}\n"
        f"  load before: {load_before}; after: {_load()}",
        flush=True,
    )


def _report_size(dataset: fo.Dataset) -> None:
    db = foo_odm.get_db_conn()
    stats = db.command("collStats", "ntt_proposal_cache")
    files = sum(p.stat().st_size for p in Path(_DB).rglob("*") if p.is_file())
    rows = Path(_DB) / "ntt-cache" / "proposal-features"
    compact = sum(p.stat().st_size for p in rows.rglob("*") if p.is_file())
    print(
        f"cache: {stats['count']} entries, {stats['size'] / 1e9:.2f} GB of documents "
        f"({stats['storageSize'] / 1e9:.2f} GB stored by MongoDB), float16 feature rows "
        f"{compact / 1e9:.2f} GB; the benchmark's folder (database, cache files, images) "
        f"holds {files / 1e9:.2f} GB",
        flush=True,
    )


class _Calls:
    """Counts the calls of ``owner.name`` inside ``with`` (full scorings: ``_decay_record``)."""

    def __init__(self, owner: type, name: str) -> None:
        self.owner, self.name, self.count = owner, name, 0
        self.original = getattr(owner, name)

    def __enter__(self) -> _Calls:
        def counted(*args, **kwargs):
            self.count += 1
            return self.original(*args, **kwargs)

        setattr(self.owner, self.name, counted)
        return self

    def __exit__(self, *_) -> None:
        setattr(self.owner, self.name, self.original)


def _drop_file_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident size


def _peak_rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1e6
    return float("nan")


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--proposals", type=int, default=300)
    parser.add_argument("--score-limit", type=int, default=None)
    parser.add_argument("--cold", action="store_true", help="read from the disk (root)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
