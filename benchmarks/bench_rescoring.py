"""Re-scoring from cached proposals vs full inference, bank size, and label-field writes.

    .venv/bin/python benchmarks/bench_rescoring.py --samples 200

On a throwaway FiftyOne database (never the user's), with generated images and random-weight
tiny models, side by side in one run:
1. full inference (``segment`` with ``reuse_proposals=True``, which also fills the cache) vs
   re-scoring every sample with a new bank from the cache: seconds per image and the ratio, for
   the whole plugin step and for the engine alone;
2. memory-bank bytes per reference at ViT-L width (C=1024, 80 classes x 10 shots);
3. label-field writes per second: the plugin's batched writer vs saving sample by sample.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from pathlib import Path

from ntt_operators import sandbox  # imports no fiftyone

# A private mongod and folder, removed at exit: a 10,000-sample run writes gigabytes.
_DB = sandbox.throwaway("ntt-bench-", Path(__file__).resolve().parents[1])

import fiftyone as fo  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ntt_core import MemoryBank, NTTConfig, NTTPredictor  # noqa: E402
from ntt_core.cache import predict_cached  # noqa: E402
from ntt_core.synthetic import make_scene  # noqa: E402
from ntt_operators import api  # noqa: E402
from ntt_operators.labels import FieldWriter  # noqa: E402
from ntt_operators.proposal_cache import ProposalCache  # noqa: E402

CLASSES = ("disc", "square", "triangle")


def main() -> None:
    args = _parse()
    config = NTTConfig.tiny(weights="random", points_per_side=args.points_per_side)
    dataset = _dataset(args.samples)
    try:
        _plugin_rescoring(dataset, config)
        _engine_rescoring(dataset, config)
        _bank_size()
        _field_writes(dataset)
    finally:
        dataset.delete()


def _plugin_rescoring(dataset: fo.Dataset, config: NTTConfig) -> None:
    api.sample_references(dataset, "ground_truth", shots=1, seed=33, tag="ref1")
    api.build_memory_bank(dataset, "ground_truth", "one_shot", ref_tag="ref1", config=config)
    api.sample_references(dataset, "ground_truth", shots=3, seed=5, tag="ref3")
    api.build_memory_bank(dataset, "ground_truth", "three_shot", ref_tag="ref3", config=config)
    full = _timed(
        lambda: api.segment(dataset, "one_shot", "full", exclude_tag=None, reuse_proposals=True)
    )
    rescored = _timed(
        lambda: api.segment(
            dataset, "three_shot", "rescored", exclude_tag=None, reuse_proposals=True
        )
    )
    n = len(dataset)
    print(f"plugin segment over {n} samples ({config.points_per_side}^2 grid, CPU):")
    print(f"  full inference     {full / n * 1000:9.1f} ms/image  {n / full:8.2f} images/s")
    print(f"  re-score (cache)   {rescored / n * 1000:9.1f} ms/image  {n / rescored:8.2f} images/s")
    print(f"  ratio              {full / rescored:9.1f}x")


def _engine_rescoring(dataset: fo.Dataset, config: NTTConfig) -> None:
    predictor = NTTPredictor(config)
    bank = api.load_memory_bank(dataset, "three_shot")
    store = ProposalCache(dataset, config)
    ids, paths = dataset.values(["id", "filepath"])
    sample = list(zip(ids, paths))[:20]
    full = _timed(lambda: [predictor.predict(path, bank) for _, path in sample])
    cached = _timed(lambda: [predict_cached(predictor, p, bank, store, i) for i, p in sample])
    print(
        f"engine only, {len(sample)} images: full {full / len(sample) * 1000:.1f} ms/image, "
        f"re-score {cached / len(sample) * 1000:.2f} ms/image -> {full / cached:.1f}x"
    )


def _bank_size() -> None:
    classes = [f"class{i}" for i in range(80)]
    labels = [name for name in classes for _ in range(10)]
    bank = MemoryBank.from_features(
        torch.randn(len(labels), 1024),
        labels,
        [f"{uuid.uuid4().hex}:{i}" for i in range(len(labels))],
        "dinov2_vitl14",
        518,
    )
    per_reference = len(bank.to_bytes()) / len(bank)
    dense = 37 * 37 * 1024 * 4
    print(
        f"bank at ViT-L width, 80 classes x 10 shots: {per_reference / 1024:.1f} KB/reference "
        f"(a dense 37x37x1024 fp32 map per reference: {dense / 2**20:.1f} MB, "
        f"{dense / per_reference:.0f}x more)"
    )


def _field_writes(dataset: fo.Dataset) -> None:
    values = dict(zip(dataset.values("id"), dataset.values("rescored")))
    start = time.perf_counter()
    writer = FieldWriter(dataset, "batched_copy", batch_size=16)
    for sample_id, detections in values.items():
        writer.add(sample_id, detections)
    writer.flush()
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for sample in dataset.iter_samples():
        sample["one_by_one_copy"] = values[sample.id]
        sample.save()
    single = time.perf_counter() - start
    n = len(values)
    instances = sum(len(v.detections) for v in values.values() if v is not None)
    print(
        f"label-field writes ({n} samples, {instances} masks): batched {n / batched:.0f} "
        f"samples/s, one by one {n / single:.0f} samples/s -> {single / batched:.1f}x"
    )


def _dataset(samples: int) -> fo.Dataset:
    folder = os.path.join(_DB, "images")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    dataset = fo.Dataset()
    batch = []
    for i in range(samples):
        pixels, instances = make_scene(rng, 120, 160, CLASSES)
        path = os.path.join(folder, f"{i:05d}.png")
        Image.fromarray(pixels).save(path)
        detections = [fo.Detection.from_mask(inst.mask, label=inst.label) for inst in instances]
        batch.append(fo.Sample(filepath=path, ground_truth=fo.Detections(detections=detections)))
    dataset.add_samples(batch)
    dataset.compute_metadata()
    return dataset


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--points-per-side", type=int, default=8)
    return parser.parse_args()


if __name__ == "__main__":
    main()
