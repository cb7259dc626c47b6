"""SAM2 and DINOv2 from Meta's official checkpoints (or untrained), cached once per process."""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import timm
import torch
from hydra.errors import MissingConfigException
from sam2.build_sam import build_sam2
from sam2.modeling.sam2_base import SAM2Base
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from ntt_core.config import NTTConfig
from ntt_core.errors import CheckpointError, DeviceError
from ntt_core.registry import (
    CHECKPOINTS,
    Checkpoint,
    DownloadProgress,
    find_by_file_name,
    resolve_checkpoint,
)

_SEED = 0
_DEVICE_FORMS = "'auto', 'cpu', 'cuda' or 'cuda:N'"
_T = TypeVar("_T")
_M = TypeVar("_M", bound=nn.Module)

# The process-wide model cache: building hiera-large + ViT-L costs seconds and GBs, so every
# predictor in a process shares one copy per (checkpoint, weights, input size, device).
_MODELS: dict[tuple[Any, ...], Any] = {}
_MODELS_LOCK = threading.Lock()

LoadProgress = Callable[[str], None]
"""Hears what model loading is doing, as a label ("Downloading x.pt: 12.0 / 148.7 MB")."""


def resolve_device(spec: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"Unknown device {spec!r}: use {_DEVICE_FORMS}.") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"Unsupported device {spec!r}: use {_DEVICE_FORMS}.")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"Device {spec!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}). Use device='cpu', or device='auto' to pick CUDA "
            "only when it exists."
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(
            f"Device {spec!r} does not exist: this machine has {count} CUDA device(s)."
        )
    return device


def build_sam2_model(
    name_or_path: str | Path,
    weights: str = "official",
    image_size: int = 1024,
    device: str | torch.device = "cpu",
    config_name: str | None = None,
    progress: DownloadProgress | None = None,
) -> SAM2Base:
    """SAM2 from a registry name or local checkpoint, in eval mode with frozen parameters.

    ``config_name`` (e.g. ``"configs/sam2.1/sam2.1_hiera_l.yaml"``) is only needed for a local file
    whose name is not an official one.
    """
    config = _sam2_config(name_or_path, config_name)
    # The file is read before the (seconds-long) build so that a bad one fails fast.
    state = path = None
    if _wants_official(weights):
        path = resolve_checkpoint(name_or_path, progress=progress)
        state = _read_sam2(path, config)
    with _fixed_seed():
        model = _compose_sam2(config, image_size)
    if state is not None:
        _load_strict(model, state, path, config)
    return _frozen(model, device)


def build_dinov2_encoder(
    name_or_path: str | Path,
    weights: str = "official",
    image_size: int = 518,
    device: str | torch.device = "cpu",
    progress: DownloadProgress | None = None,
) -> DINOv2Encoder:
    """DINOv2 from a registry name or Meta's ``dinov2_vit*14_pretrain.pth``, eval mode, frozen."""
    entry = _identify(name_or_path, "dinov2")
    state = path = None
    if _wants_official(weights):
        path = resolve_checkpoint(name_or_path, progress=progress)
        state = _read_dinov2(path)
    arch = entry.arch if entry else _dinov2_arch(name_or_path, state)
    # Official weights replace every parameter, so the network is laid out on the meta device
    # (no memory, no init) rather than paying for timm's random init: ~6 CPU-seconds for ViT-L.
    with torch.device("meta") if state is not None else _fixed_seed():
        vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=image_size)
    if state is not None:
        # timm's filter renames Meta's keys (SwiGLU w12/w3 → fc1/fc2), drops mask_token and
        # resamples pos_embed to this image size; it mutates its input, hence the copy.
        _load_strict(vit, checkpoint_filter_fn(dict(state), vit), path, arch)
    name = entry.name if entry else Path(name_or_path).stem
    return _frozen(DINOv2Encoder(vit, name, image_size), device)


def load_models(
    config: NTTConfig, progress: LoadProgress | None = None
) -> tuple[SAM2Base, DINOv2Encoder, torch.device]:
    """The config's SAM2 and DINOv2 on its device, built on first use and then shared.

    ``progress`` hears which model is loading and how a checkpoint download goes.
    """
    sam, encoder = load_sam2(config, progress), load_encoder(config, progress)
    return sam, encoder, resolve_device(config.device)


def load_sam2(config: NTTConfig, progress: LoadProgress | None = None) -> SAM2Base:
    """The config's SAM2 on its device, built on first use and then shared."""
    report = progress or (lambda label: None)
    device = resolve_device(config.device)
    sam_key = ("sam2", config.sam_model, config.sam_config, config.weights, config.sam_image_size)
    report(f"Loading SAM2 {config.sam_model} ({config.weights} weights)")
    return _cached(
        (*sam_key, str(device)),
        lambda: build_sam2_model(
            config.sam_model,
            config.weights,
            config.sam_image_size,
            device,
            config.sam_config,
            _download_labels(report),
        ),
    )


def load_encoder(config: NTTConfig, progress: LoadProgress | None = None) -> DINOv2Encoder:
    """The config's DINOv2 on its device, built on first use and then shared."""
    report = progress or (lambda label: None)
    device = resolve_device(config.device)
    encoder_key = ("dinov2", config.encoder_model, config.weights, config.encoder_image_size)
    report(f"Loading DINOv2 {config.encoder_model} ({config.weights} weights)")
    return _cached(
        (*encoder_key, str(device)),
        lambda: build_dinov2_encoder(
            config.encoder_model,
            config.weights,
            config.encoder_image_size,
            device,
            _download_labels(report),
        ),
    )


def _download_labels(report: LoadProgress) -> DownloadProgress:
    """Download chunks as labels, one per percent (or 10 MB when the size is unknown)."""
    reported = 0

    def on_chunk(file_name: str, done: int, total: int | None) -> None:
        nonlocal reported
        step = total / 100 if total else 10e6
        if done - reported < step and done != total:
            return
        reported = done
        of_total = f" / {total / 1e6:.1f}" if total else ""
        report(f"Downloading {file_name}: {done / 1e6:.1f}{of_total} MB")

    return on_chunk


def clear_model_cache() -> None:
    """Drops every cached model (frees their memory once no predictor holds them)."""
    with _MODELS_LOCK:
        _MODELS.clear()


class DINOv2Encoder(nn.Module):
    """DINOv2 ViT/14 returning its final-layer patch tokens as a spatial grid."""

    def __init__(self, vit: VisionTransformer, name: str, image_size: int) -> None:
        super().__init__()
        self.vit = vit
        self.name = name
        self.image_size = image_size
        self.embed_dim: int = vit.embed_dim
        self.patch_size: int = vit.patch_embed.patch_size[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) ImageNet-normalised images → (B, S/14, S/14, C) final-LayerNorm tokens."""
        tokens = self.vit.forward_features(images)[:, self.vit.num_prefix_tokens :]
        rows, cols = (side // self.patch_size for side in images.shape[-2:])
        return tokens.reshape(images.shape[0], rows, cols, self.embed_dim)


# --- construction -------------------------------------------------------------------------------


@contextlib.contextmanager
def _fixed_seed() -> Iterator[None]:
    # Random-weight models must be byte-identical in every process (Ray actors, subprocesses,
    # reruns), and building one must not disturb the caller's random stream. Models are always
    # constructed on the CPU, so the CPU generator is the only one that matters.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def _compose_sam2(config: str, image_size: int) -> SAM2Base:
    overrides = [f"++model.image_size={image_size}"]
    try:
        return build_sam2(config, ckpt_path=None, device="cpu", hydra_overrides_extra=overrides)
    except MissingConfigException:
        known = sorted({e.arch for e in CHECKPOINTS.values() if e.kind == "sam2"})
        raise CheckpointError(f"Unknown SAM2 config {config!r}; known configs: {known}.") from None


def _frozen(model: _M, device: str | torch.device) -> _M:
    model.eval()
    model.requires_grad_(False)
    return model.to(resolve_device(str(device)))


def _wants_official(weights: str) -> bool:
    if weights not in ("official", "random"):
        raise ValueError(f"weights must be 'official' or 'random', got {weights!r}")
    return weights == "official"


def encoder_identity(config: NTTConfig) -> str:
    """What a memory bank records as its encoder: the model, and whether its weights are random.

    Computed from the config alone, so a driver can refuse a foreign bank without loading models.
    """
    text = str(config.encoder_model)
    entry = CHECKPOINTS.get(text) or find_by_file_name(text)
    name = entry.name if entry else Path(text).stem
    return f"{name} (random weights)" if config.weights == "random" else name


def _identify(name_or_path: str | Path, kind: str) -> Checkpoint | None:
    """The registry entry a name or official file name stands for; None for another local file."""
    text = str(name_or_path)
    entry = CHECKPOINTS.get(text) or find_by_file_name(text)
    if entry is None:
        resolve_checkpoint(text, download=False)  # raises for a missing path or an unknown name
        return None
    if entry.kind != kind:
        same_kind = [name for name, e in CHECKPOINTS.items() if e.kind == kind]
        raise CheckpointError(
            f"{text!r} is a {entry.kind} checkpoint, but a {kind} one is needed here: "
            f"use one of {same_kind} or a local {kind} checkpoint file."
        )
    return entry


def _sam2_config(name_or_path: str | Path, config_name: str | None) -> str:
    entry = _identify(name_or_path, "sam2")
    if config_name:
        return config_name
    if entry:
        return entry.arch
    raise CheckpointError(
        f"Cannot tell which SAM2 model {str(name_or_path)!r} is from its file name: set sam_config "
        "to its config, e.g. 'configs/sam2.1/sam2.1_hiera_l.yaml'."
    )


def _dinov2_arch(name_or_path: str | Path, state: dict[str, torch.Tensor] | None) -> str:
    """The timm architecture of an unofficially named DINOv2 file, from its token width."""
    width = None if state is None else state["patch_embed.proj.weight"].shape[0]
    entry = next(
        (e for e in CHECKPOINTS.values() if e.kind == "dinov2" and e.embed_dim == width), None
    )
    if entry is None:
        raise CheckpointError(
            f"Cannot tell which DINOv2 model {str(name_or_path)!r} is: use a registry name "
            "or Meta's official file name (dinov2_vit{s,b,l,g}14_pretrain.pth), or "
            "weights='official' so that the file itself tells."
        )
    return entry.arch


# --- checkpoint loading -------------------------------------------------------------------------


def _read(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever the reader trips on, the file is unusable
        raise CheckpointError(
            f"Checkpoint {path} cannot be read: the file is corrupt or truncated (an interrupted "
            f"download?) or not a PyTorch checkpoint ({type(error).__name__}: {error}). "
            "Delete it and download it again."
        ) from error


def _read_sam2(path: Path, config: str) -> dict[str, torch.Tensor]:
    checkpoint = _read(path)
    state = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} is not a SAM2 checkpoint: expected {{'model': state dict}} for {config}, "
            f"found {_describe(checkpoint)}."
        )
    return state


def _read_dinov2(path: Path) -> dict[str, torch.Tensor]:
    state = _read(path)
    if not (
        isinstance(state, dict)
        and {"cls_token", "pos_embed", "patch_embed.proj.weight"} <= set(state)
    ):
        raise CheckpointError(
            f"{path} is not a DINOv2 checkpoint in Meta's layout (dinov2_vit*14_pretrain.pth with "
            f"cls_token, pos_embed, patch_embed.*, blocks.N.*): found {_describe(state)}."
        )
    return state


def _load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    expected = model.state_dict()
    _check_fits(expected, state, path, arch)
    # assign=True adopts the checkpoint's tensors: no second copy of the weights in memory, and it
    # fills a network laid out on the meta device. The model's dtypes win over the file's.
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)


def _check_fits(expected: dict[str, Any], found: dict[str, Any], path: Path, model: str) -> None:
    """Refuses a checkpoint of another model, naming what was expected and what the file holds."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    resized = [
        f"{k}: {tuple(expected[k].shape)} vs {tuple(found[k].shape)}"
        for k in expected
        if k in found and expected[k].shape != found[k].shape
    ]
    if not (missing or unexpected or resized):
        return
    details = "; ".join(
        f"{len(items)} {label} (e.g. {items[:3]})"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", resized),
        )
        if items
    )
    raise CheckpointError(
        f"{path} is a checkpoint of another model: expected {_describe(expected)} ({model}), "
        f"found {_describe(found)}; {details}. Pass the checkpoint that matches the model "
        "(sam_model / encoder_model, and sam_config for SAM2)."
    )


def _describe(state: Any) -> str:
    """A human description of a state dict: which network it looks like, and its size."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a state dict"
    if isinstance(state.get("model"), dict):
        return f"{{'model': {_describe(state['model'])}}}"
    if "image_encoder.trunk.patch_embed.proj.weight" in state:
        family = "SAM2.1" if "no_obj_embed_spatial" in state else "SAM2"
        width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
        depth = _count_blocks(state, "image_encoder.trunk.blocks.")
        return f"{family} with a Hiera trunk of {depth} blocks, width {width}"
    if "cls_token" in state and "patch_embed.proj.weight" in state:
        width = state["patch_embed.proj.weight"].shape[0]
        return f"a DINOv2 ViT/14 of {_count_blocks(state, 'blocks.')} blocks, width {width}"
    keys = list(state)
    return f"an unrecognised state dict of {len(keys)} keys ({keys[:5]})"


def _count_blocks(state: dict[str, Any], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def _cached(key: tuple[Any, ...], build: Callable[[], _T]) -> _T:
    # Held while building, so concurrent first calls build (and hold in memory) one copy.
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = build()
        return _MODELS[key]
