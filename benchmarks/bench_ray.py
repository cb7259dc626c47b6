"""Images/s of segmenting on Ray Data with 1 and 2 actors, against the single-process baseline.

    .venv/bin/python benchmarks/bench_ray.py                        # tiny random models, CPU
    .venv/bin/python benchmarks/bench_ray.py --points-per-side 16 --images 16
    .venv/bin/python benchmarks/bench_ray.py --address auto --device cuda --actors 1 4

Every run segments the same generated PNGs. "end to end" includes starting the actors (each
builds its models once); "steady" counts only the images after the first result arrived, which
is what a long run converges to. The single-process figure excludes model building.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.ray_backend import predict_or_error, segment_on_ray
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle", "ring"]


def main() -> None:
    args = _parse()
    config = NTTConfig.tiny(
        weights="random", device=args.device, points_per_side=args.points_per_side
    )
    predictor = NTTPredictor(config)
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, args.height, args.width, CLASSES) for _ in range(args.images + 2)]
    bank = predictor.build_bank(
        [
            Reference(image, inst.mask, inst.label, f"{i}:{j}", inst.box_xywh)
            for i, (image, instances) in enumerate(scenes[:2])
            for j, inst in enumerate(instances)
        ]
    )
    with tempfile.TemporaryDirectory() as root:
        items = _write_images([image for image, _ in scenes[2:]], Path(root))
        baseline = _single_process(predictor, bank, items)
        print(
            f"device={predictor.device} grid={config.points_per_side}^2 images={len(items)} "
            f"size={args.height}x{args.width} batch_size={args.batch_size}"
        )
        print(f"  single process          {baseline:7.3f} images/s")
        _start_ray(args.address)
        rates = {n: _on_ray(items, bank.to_bytes(), config, n, args) for n in args.actors}
    first = rates[args.actors[0]]
    for n, (end_to_end, steady) in rates.items():
        print(
            f"  ray, {n} actor(s)         {end_to_end:7.3f} images/s end to end, "
            f"{steady:7.3f} steady  (x{steady / first[1]:.2f} steady vs {args.actors[0]} actor, "
            f"x{steady / baseline:.2f} vs single process)"
        )


def _write_images(images: list[np.ndarray], root: Path) -> list[tuple[str, str]]:
    items = []
    for i, image in enumerate(images):
        path = root / f"{i:04d}.png"
        Image.fromarray(image).save(path)
        items.append((f"image{i}", str(path)))
    return items


def _single_process(predictor: NTTPredictor, bank, items: list[tuple[str, str]]) -> float:
    predict_or_error(predictor, items[0][1], bank)  # warm-up: first-call allocations
    start = time.perf_counter()
    for _, path in items:
        predict_or_error(predictor, path, bank)
    return len(items) / (time.perf_counter() - start)


def _on_ray(items, bank_bytes: bytes, config: NTTConfig, num_actors: int, args) -> tuple:
    """(end-to-end images/s, steady images/s after the first result)."""
    start = time.perf_counter()
    first = None
    count = 0
    for _ in segment_on_ray(
        items, bank_bytes, config, num_actors=num_actors, batch_size=args.batch_size,
        address=args.address,
    ):  # fmt: skip
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    steady = (count - 1) / (end - first) if count > 1 else float("nan")
    return count / (end - start), steady


def _start_ray(address: str | None) -> None:
    import ray

    if address is None:
        # Started once up front so that no timed run pays for the cluster's start.
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--points-per-side", type=int, default=8, help="8..16 on a CPU")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--address", default=None, help="an existing Ray cluster; default local")
    return parser.parse_args()


if __name__ == "__main__":
    main()
