"""Post-processing (``NTTPredictor.score``) and the share of an image's time outside the networks.

    .venv/bin/python benchmarks/bench_postprocess.py                  # CPU
    .venv/bin/python benchmarks/bench_postprocess.py --device cuda    # skips without a GPU

1. ``score()`` on synthetic proposals (blob-shaped 256x256 low-res logits with |logit| far beyond
   32, random features, a 20-class bank, a 480x640 image) at 100, 300 and 800 proposals: the
   previous post-processing (every kept proposal upsampled to full size, RLE-encoded, decayed with
   pycocotools) and today's, side by side in one run, with a check that both give the same
   instances.
2. One image end to end (tiny random models at the default 32x32 grid): time inside the networks
   (DINOv2, SAM2 image encoder, prompt encoder, mask decoder; timed by forward hooks) versus
   everything else (pooling, NMS, masks, decay, RLE).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from ntt_core import MemoryBank, NTTConfig, NTTPredictor, Proposals, Reference
from ntt_core.coco import json_ready_rle
from ntt_core.matching import assign_classes, semantic_scores
from ntt_core.postprocess import mask_boxes, nms_order, rle_areas, rle_boxes_xyxy
from ntt_core.result import Instances
from ntt_core.synthetic import make_scene

IMAGE_SIZE = (480, 640)
CLASSES = 20


def main() -> None:
    args = _parse()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"skipped: --device {args.device} asks for a GPU and this machine has none")
        return
    torch.set_num_threads(args.threads)
    predictor = NTTPredictor(NTTConfig.tiny(weights="random", device=args.device))
    device = predictor.device
    bank = _random_bank(predictor)
    print(
        f"post-processing on {device} ({args.threads} CPU thread(s)), "
        f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, {CLASSES} classes"
    )
    print(f"{'proposals':>10s} {'kept':>6s} {'previous ms':>12s} {'now ms':>8s} {'ratio':>7s}")
    for count in args.proposals:
        proposals = _blob_proposals(count, bank.prototypes.shape[1], device)
        previous = partial(_previous_score, predictor, proposals, bank)
        now = partial(predictor.score, proposals, bank)
        assert previous().rles == now().rles, "previous and current post-processing disagree"
        before = _median_ms(previous, args.repeats, device)
        after = _median_ms(now, args.repeats, device)
        kept = _kept(predictor, proposals, bank)
        print(f"{count:>10d} {kept:>6d} {before:>12.1f} {after:>8.1f} {before / after:>6.1f}x")
    if args.end_to_end:
        _networks_versus_rest(args)


def _random_bank(predictor: NTTPredictor) -> MemoryBank:
    features = torch.randn(CLASSES * 2, predictor.encoder.embed_dim, generator=_generator(1))
    labels = [f"class{k % CLASSES}" for k in range(CLASSES * 2)]
    return MemoryBank.from_features(
        features, labels, [str(k) for k in range(len(labels))], predictor.encoder_identity,
        predictor.config.encoder_image_size,
    )  # fmt: skip


def _blob_proposals(count: int, channels: int, device: torch.device) -> Proposals:
    """Round blobs of random centre and radius on 256x256 logits, |logit| up to a few hundred."""
    generator = _generator(count)
    axis = torch.arange(256, dtype=torch.float32) + 0.5
    centres = torch.rand(count, 2, generator=generator) * 256
    radii = 4 + torch.rand(count, generator=generator) * 40
    distance = (
        (axis[None, :, None] - centres[:, None, None, 1]) ** 2
        + (axis[None, None, :] - centres[:, None, None, 0]) ** 2
    ).sqrt()
    logits = 10 * (radii[:, None, None] - distance)
    features = F.normalize(torch.randn(count, channels, generator=generator), dim=1)
    return Proposals(
        image_size=IMAGE_SIZE,
        pred_iou=torch.rand(count, generator=generator).to(device),
        boxes=mask_boxes(logits > 0).to(device),
        features=features.to(device),
        logits=logits.to(device),
    )


def _previous_score(predictor: NTTPredictor, proposals: Proposals, bank) -> Instances:
    """The post-processing before this change (with pycocotools' area() batched)."""
    config = predictor.config
    prototypes = bank.prototypes.to(proposals.features.device)
    scores, labels = assign_classes(semantic_scores(proposals.features, prototypes))
    order = nms_order(
        proposals.boxes, proposals.pred_iou, labels, config.nms_iou_threshold,
        config.max_before_decay,
    )  # fmt: skip
    order = order[scores[order] > 0]
    kept = proposals.select(order)
    scores, labels = scores[order].cpu(), labels[order].cpu()
    rles = []
    for chunk in kept.logits.split(16):
        full = F.interpolate(
            chunk[:, None], size=IMAGE_SIZE, mode="bilinear", align_corners=False, antialias=True
        )[:, 0] > 0  # fmt: skip
        rles += mask_utils.encode(np.asfortranarray(full.permute(1, 2, 0).cpu().numpy(), np.uint8))
    nonempty = torch.from_numpy(rle_areas(rles) > 0)
    rles = [rle for rle, ok in zip(rles, nonempty.tolist()) if ok]
    features, scores, labels = kept.features.cpu()[nonempty], scores[nonempty], labels[nonempty]
    decayed = scores.clone()
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        if members.numel() < 2:
            continue
        member_rles = [rles[i] for i in members.tolist()]
        crowd = np.ones(len(member_rles), dtype=np.uint8)
        ios = torch.from_numpy(np.asarray(mask_utils.iou(member_rles, member_rles, crowd)))
        similarity = (features[members] @ features[members].T).clamp(min=0)
        weighted = (ios.float() * similarity).tril(diagonal=-1)
        decayed[members] = scores[members] * torch.sqrt(1 - weighted.max(dim=1).values.clamp(0, 1))
    top = torch.sort(decayed, descending=True, stable=True).indices[: config.max_detections]
    rles = [json_ready_rle(rles[i]) for i in top.tolist()]
    return Instances(
        IMAGE_SIZE, rle_boxes_xyxy(rles), decayed[top].numpy(), labels[top].numpy(),
        list(bank.classes), rles,
    )  # fmt: skip


def _kept(predictor: NTTPredictor, proposals: Proposals, bank) -> int:
    scores, labels = assign_classes(
        semantic_scores(proposals.features, bank.prototypes.to(proposals.features.device))
    )
    config = predictor.config
    order = nms_order(
        proposals.boxes, proposals.pred_iou, labels, config.nms_iou_threshold,
        config.max_before_decay,
    )  # fmt: skip
    return int((scores[order] > 0).sum())


def _networks_versus_rest(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.network_threads)
    config = NTTConfig.tiny(weights="random", device=args.device, points_per_side=32)
    predictor = NTTPredictor(config)
    rng = np.random.default_rng(0)
    scenes = [make_scene(rng, *IMAGE_SIZE, ["disc", "square", "triangle"]) for _ in range(2)]
    image, instances = scenes[0]
    bank = predictor.build_bank(
        [Reference(image, i.mask, i.label, str(n)) for n, i in enumerate(instances)]
    )
    networks = _NetworkTimer(predictor)
    predictor.predict(scenes[1][0], bank)  # warm-up
    totals, inside = [], []
    for _ in range(args.repeats):
        networks.seconds = 0.0
        start = time.perf_counter()
        predictor.predict(scenes[1][0], bank)
        _sync(predictor.device)
        totals.append(time.perf_counter() - start)
        inside.append(networks.seconds)
    total, net = float(np.median(totals)), float(np.median(inside))
    print(
        f"one {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} image, {config.sam_model}@{config.sam_image_size} + "
        f"{config.encoder_model}@{config.encoder_image_size}, grid 32x32, "
        f"chunk {predictor.points_per_batch}, on {predictor.device}:"
    )
    print(
        f"  total {total * 1000:.0f} ms, networks {net * 1000:.0f} ms, everything else "
        f"{(total - net) * 1000:.0f} ms = {100 * (total - net) / total:.1f}% of the total"
    )


class _NetworkTimer:
    """Adds up the wall time spent inside the frozen networks' forward passes."""

    def __init__(self, predictor: NTTPredictor) -> None:
        self.seconds, self._device, self._started = 0.0, predictor.device, 0.0
        sam = predictor.sam_model
        for module in (
            predictor.encoder,
            sam.image_encoder,
            sam.sam_prompt_encoder,
            sam.sam_mask_decoder,
        ):
            module.register_forward_pre_hook(self._start)
            module.register_forward_hook(self._stop)

    def _start(self, *_) -> None:
        _sync(self._device)
        self._started = time.perf_counter()

    def _stop(self, *_) -> None:
        _sync(self._device)
        self.seconds += time.perf_counter() - self._started


def _median_ms(run, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--network-threads", type=int, default=2, help="CPU threads for the end-to-end image"
    )
    parser.add_argument("--proposals", type=int, nargs="+", default=[100, 300, 800])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-end-to-end", dest="end_to_end", action="store_false", help="skip part 2"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads for torch (1: one core, as quoted)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    main()
