"""The method's hyperparameters in one object; every default is the paper's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class NTTConfig:
    """Models and hyperparameters of "No Time to Train!" (arXiv 2507.02798).

    Defaults reproduce the paper's COCO few-shot configuration (SAM2 hiera-large, DINOv2 ViT-L/14).
    """

    sam_model: str = "sam2_hiera_large"
    """SAM2 checkpoint: a registry name (see ``ntt_core.registry``) or a local ``.pt`` path."""
    sam_config: str | None = None
    """SAM2 config name; only needed when ``sam_model`` is a path the registry cannot identify."""
    encoder_model: str = "dinov2_vitl14"
    """DINOv2 checkpoint: a registry name or a local ``dinov2_vit*14_pretrain.pth`` path."""
    weights: str = "official"
    """``"official"`` loads the checkpoints; ``"random"`` builds the same networks untrained."""

    sam_image_size: int = 1024
    """Side of the square SAM2 input; targets are squashed to it (aspect ratio not kept)."""
    encoder_image_size: int = 518
    """Side of the square DINOv2 input (37x37 patches at 518)."""
    points_per_side: int = 32
    """The prompt grid is points_per_side x points_per_side single positive points."""
    points_per_batch: int | None = None
    """Prompts per mask-decoder call; bounds memory, does not change results.

    ``None`` picks per device: 256 on a GPU (the paper's chunk), 4 on a CPU, where the decoder's
    per-prompt cost grows several-fold with the chunk (53 ms at 1-4 prompts, 150-275 ms at 16-64
    for hiera-tiny at 1024 px on two cores).
    """
    add_no_mem_embed: bool = False
    """Add SAM2's ``no_mem_embed`` to the image embedding before decoding prompts. Not the paper's.

    ``SAM2ImagePredictor.set_image`` adds it (SAM2's image model was trained with it); the
    paper decodes without it, and its numbers were obtained so.
    """
    pred_iou_threshold: float = 0.4
    """Proposals whose SAM-predicted IoU is at or below this are dropped."""
    context_ratio: float = 0.2
    """Reference crops are squares of the box's longer side x (1 + context_ratio)."""
    nms_iou_threshold: float = 0.5
    """Class-wise box NMS threshold, ranked by SAM's predicted IoU."""
    max_before_decay: int = 800
    """Proposals kept after NMS, before the semantic-aware overlap decay."""
    max_detections: int = 100
    """Instances kept per image after the decay."""
    negative_sigma: float = 0.8
    """Temperature of the negative-reference decay (the reference implementation's 0.8).

    A proposal whose best similarity to a class's negative references, ``neg``, exceeds its
    similarity to the class prototype, ``pos``, scores ``pos * exp(-(neg - pos) / sigma)`` for
    that class; smaller values punish a resemblance to a negative harder. Without negative
    references it changes nothing.
    """

    device: str = "auto"
    """``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``."""
    precision: str = "fp32"
    """``"fp32"``, or ``"bf16"`` / ``"fp16"`` autocast (GPU only)."""

    def __post_init__(self) -> None:
        _require(self.weights in ("official", "random"), "weights must be 'official' or 'random'")
        _require(self.precision in _PRECISIONS, f"precision must be one of {_PRECISIONS}")
        _require(self.sam_image_size % 16 == 0, "sam_image_size must be a multiple of 16")
        _require(self.encoder_image_size % 14 == 0, "encoder_image_size must be a multiple of 14")
        _require(self.points_per_side >= 1, "points_per_side must be >= 1")
        _require(
            self.points_per_batch is None or self.points_per_batch >= 1,
            "points_per_batch must be None (automatic) or >= 1",
        )
        _require(0.0 <= self.pred_iou_threshold < 1.0, "pred_iou_threshold must be in [0, 1)")
        _require(self.context_ratio >= 0.0, "context_ratio must be >= 0")
        _require(0.0 < self.nms_iou_threshold <= 1.0, "nms_iou_threshold must be in (0, 1]")
        _require(self.max_before_decay >= 1, "max_before_decay must be >= 1")
        _require(self.max_detections >= 1, "max_detections must be >= 1")
        _require(self.negative_sigma > 0.0, "negative_sigma must be > 0")

    def replace(self, **changes: Any) -> NTTConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NTTConfig:
        """Builds a config from a dict, refusing unknown keys (a typo must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown NTTConfig fields: {unknown}; known fields: {sorted(known)}")
        return cls(**values)

    @classmethod
    def tiny(cls, **changes: Any) -> NTTConfig:
        """SAM2.1 hiera-tiny + DINOv2 ViT-S/14 at small sizes: seconds per image on a CPU.

        With ``weights="random"`` this is what the tests and offline smoke runs use.
        """
        base = dict(
            sam_model="sam2.1_hiera_tiny",
            encoder_model="dinov2_vits14",
            sam_image_size=256,
            encoder_image_size=224,
            points_per_side=8,
        )
        base.update(changes)
        return cls(**base)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"Invalid NTTConfig: {message}")
