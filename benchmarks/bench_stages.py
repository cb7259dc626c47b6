"""Per-stage timings of the pipeline on generated images.

    .venv/bin/python benchmarks/bench_stages.py                       # tiny random models, CPU
    .venv/bin/python benchmarks/bench_stages.py --paper --device cuda  # SAM2-L + DINOv2-L shapes

Prints seconds per image for each stage (bank build per reference, DINOv2 target features,
SAM2 image embedding, prompt decoding, proposal features, matching + post-processing), the
resulting images/s, and the bank's bytes per reference.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager

import numpy as np
import torch

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.images import imagenet_normalize, resize_square_pil, to_float_chw
from ntt_core.matching import pooled_features
from ntt_core.proposals import Proposals, decode_points, embed_image
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle", "ring"]


def main() -> None:
    args = _parse()
    config = _config(args)
    predictor = NTTPredictor(config)
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, args.height, args.width, CLASSES) for _ in range(args.images + 2)]
    timings: dict[str, list[float]] = defaultdict(list)

    references = [
        Reference(image, inst.mask, inst.label, f"{i}:{j}", inst.box_xywh)
        for i, (image, instances) in enumerate(scenes[:2])
        for j, inst in enumerate(instances)
    ]
    with _timed(
        timings, "bank build (per reference)", scale=1 / len(references), device=predictor.device
    ):
        bank = predictor.build_bank(references)

    for image, _ in scenes[2:]:
        _run_stages(predictor, bank, image, timings)

    per_image = {name: float(np.median(values)) for name, values in timings.items()}
    total = sum(value for name, value in per_image.items() if not name.startswith("bank"))
    print(
        f"device={predictor.device} sam={config.sam_model}@{config.sam_image_size} "
        f"encoder={config.encoder_model}@{config.encoder_image_size} "
        f"grid={config.points_per_side}^2 chunk={predictor.points_per_batch} "
        f"precision={config.precision} images={args.images} size={args.height}x{args.width}"
    )
    for name, seconds in per_image.items():
        print(f"  {name:<34s} {seconds * 1000:10.1f} ms")
    print(f"  {'total per image':<34s} {total * 1000:10.1f} ms  ->  {1 / total:.3f} images/s")
    print(
        f"  bank bytes per reference: {len(bank.to_bytes()) / len(bank):.0f} "
        f"({len(bank)} references, C={bank.features.shape[1]})"
    )


def _run_stages(predictor: NTTPredictor, bank, image: np.ndarray, timings) -> None:
    config, device = predictor.config, predictor.device
    with torch.inference_mode(), predictor._autocast():
        square = resize_square_pil(image, config.sam_image_size)
        pixels = to_float_chw(square, device)[None]
        with _timed(timings, "DINOv2 target features", device=device):
            tokens = predictor._target_tokens(pixels)
        with _timed(timings, "SAM2 image embedding", device=device):
            embedding = embed_image(
                predictor.sam_model, imagenet_normalize(pixels), config.add_no_mem_embed
            )
        with _timed(timings, "SAM2 prompt decoding", device=device):
            logits, pred_iou = decode_points(
                predictor.sam_model, embedding, predictor._grid, predictor.points_per_batch
            )
        with _timed(timings, "proposal features", device=device):
            keep = pred_iou > config.pred_iou_threshold
            logits, pred_iou = logits[keep], pred_iou[keep]
            masks = logits > 0
            features, valid = pooled_features(tokens, masks)
            proposals = Proposals(
                image.shape[:2],
                pred_iou[valid].cpu(),
                _boxes(masks[valid]),
                features[valid].cpu(),
                logits[valid].cpu(),
            )
    with _timed(timings, "matching + post-processing", device=device):
        predictor.score(proposals, bank)


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    from ntt_core.postprocess import mask_boxes

    return mask_boxes(masks).cpu()


@contextmanager
def _timed(timings, name: str, device: torch.device, scale: float = 1.0):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timings[name].append((time.perf_counter() - start) * scale)


def _config(args: argparse.Namespace) -> NTTConfig:
    base = NTTConfig(weights="random") if args.paper else NTTConfig.tiny(weights="random")
    changes = {"device": args.device, "precision": args.precision}
    if args.points_per_side:
        changes["points_per_side"] = args.points_per_side
    if args.points_per_batch:
        changes["points_per_batch"] = args.points_per_batch
    return base.replace(**changes)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--paper", action="store_true", help="SAM2-L + DINOv2-L at 1024/518, 32x32 grid"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--height", type=int, default=240)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--points-per-side", type=int, default=0, help="default: the config's")
    parser.add_argument("--points-per-batch", type=int, default=0, help="default: the config's")
    return parser.parse_args()


if __name__ == "__main__":
    main()
