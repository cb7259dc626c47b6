"""Fast path vs the paper's computation: images/s and peak memory, side by side in one run.

    .venv/bin/python benchmarks/bench_fast_path.py              # hiera-tiny + ViT-S/14 at 1024/518
    .venv/bin/python benchmarks/bench_fast_path.py --device cuda --paper --precision bf16

Each path runs in its own subprocess (same models, same generated images) so that its peak
resident memory (and peak CUDA memory on a GPU) is its own. The paper-shaped path is
``ntt_core.paper_transcription`` (the method spec step by step, dense full-size masks).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.paper_transcription import PaperSettings, predict_as_in_paper
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle", "ring"]


def measure(path: str, args: argparse.Namespace) -> dict:
    predictor = NTTPredictor(_config(args))
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, args.height, args.width, CLASSES) for _ in range(args.images + 1)]
    image, instances = scenes[0]
    bank = predictor.build_bank(
        [Reference(image, i.mask, i.label, str(n)) for n, i in enumerate(instances)]
    )
    config = predictor.config
    settings = PaperSettings(
        config.sam_image_size, config.encoder_image_size, config.points_per_side
    )
    if path == "fast":
        predict = lambda im: predictor.predict(im, bank)  # noqa: E731
    else:
        predict = lambda im: predict_as_in_paper(  # noqa: E731
            predictor.sam_model, predictor.encoder, im, bank.prototypes.to(predictor.device),
            settings,
        )  # fmt: skip
    predict(scenes[1][0])  # warm-up
    if predictor.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for image, _ in scenes[1:]:
        predict(image)
    if predictor.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": args.images / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
        if torch.cuda.is_available()
        else 0.0,
        "device": str(predictor.device),
        "chunk": predictor.points_per_batch if path == "fast" else 256,
    }


def main() -> None:
    args = _parse()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"skipped: --device {args.device} asks for a GPU and this machine has none")
        return
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    results = {path: _in_subprocess(path) for path in ("paper", "fast")}
    config = _config(args)
    print(
        f"sam={config.sam_model}@{config.sam_image_size} encoder={config.encoder_model}@"
        f"{config.encoder_image_size} grid={config.points_per_side}^2 precision={config.precision} "
        f"images={args.images} of {args.height}x{args.width} on {results['fast']['device']}"
    )
    print(
        f"{'path':<16s} {'chunk':>6s} {'images/s':>10s} {'peak RSS MB':>12s} {'peak CUDA MB':>13s}"
    )
    for path, r in results.items():
        print(
            f"{path:<16s} {r['chunk']:>6d} {r['images_per_s']:>10.4f} {r['peak_rss_mb']:>12.0f} "
            f"{r['peak_cuda_mb']:>13.0f}"
        )
    fast, straight = results["fast"], results["paper"]
    speed_up = fast["images_per_s"] / straight["images_per_s"]
    print(f"speed-up (images/s, fast / paper): {speed_up:.2f}x")
    rss_ratio = straight["peak_rss_mb"] / fast["peak_rss_mb"]
    print(f"peak RSS ratio (paper / fast): {rss_ratio:.2f}x")
    if fast["peak_cuda_mb"]:
        cuda_ratio = straight["peak_cuda_mb"] / fast["peak_cuda_mb"]
        print(f"peak CUDA ratio (paper / fast): {cuda_ratio:.2f}x")


def _in_subprocess(path: str) -> dict:
    command = [sys.executable, __file__, "--only", path, *sys.argv[1:]]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _config(args: argparse.Namespace) -> NTTConfig:
    base = (
        NTTConfig(weights="random")
        if args.paper
        else NTTConfig.tiny(weights="random", sam_image_size=1024, encoder_image_size=518)
    )
    return base.replace(
        device=args.device, precision=args.precision, points_per_side=args.points_per_side
    )


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper", action="store_true", help="SAM2-L + DINOv2-L instead of tiny + ViT-S"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--points-per-side", type=int, default=16)
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--only", choices=["fast", "paper"], help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
