"""Checkpoint registry, strict loading of Meta's layouts, devices, the model cache; no network."""

import hashlib
import importlib.resources
import inspect
import io
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import checkpoint_filter_fn

from ntt_core import models, registry
from ntt_core.config import NTTConfig
from ntt_core.errors import CheckpointError, DeviceError
from ntt_core.models import (
    build_dinov2_encoder,
    build_sam2_model,
    load_models,
    resolve_device,
)
from ntt_core.registry import CHECKPOINTS, cache_dir, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = "sam2.1_hiera_tiny"
TINY_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def checksum(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def random_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    sam = build_sam2_model(TINY, weights="random", image_size=256)
    return sam, build_dinov2_encoder("dinov2_vits14", weights="random", image_size=224)


# --- checkpoint files in Meta's layouts ---------------------------------------------------------


def sam2_state(seed: int = 1) -> dict[str, torch.Tensor]:
    """A hiera-tiny state dict unlike the seed-0 random model: what an official file holds."""
    generator = torch.Generator().manual_seed(seed)
    base = build_sam2_model(TINY, weights="random", image_size=256)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=generator)
        for k, v in base.state_dict().items()
    }


def meta_dinov2_state(
    width: int = 384, depth: int = 12, swiglu_hidden: int | None = None, seed: int = 2
) -> dict[str, torch.Tensor]:
    """Random weights under the keys and shapes of Meta's dinov2_vit*14_pretrain.pth.

    ``swiglu_hidden`` gives ViT-g/14's fused SwiGLU MLP (``mlp.w12``, ``mlp.w3``).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.02, offset: float = 0.0) -> torch.Tensor:
        return offset + scale * torch.randn(shape, generator=generator)

    state = {
        "cls_token": rand(1, 1, width),
        "pos_embed": rand(1, 1370, width),
        "mask_token": rand(1, width),
        "patch_embed.proj.weight": rand(width, 3, 14, 14),
        "patch_embed.proj.bias": rand(width),
        "norm.weight": rand(width, scale=0.1, offset=1.0),
        "norm.bias": rand(width),
    }
    for i in range(depth):
        block = {
            "norm1.weight": rand(width, scale=0.1, offset=1.0),
            "norm1.bias": rand(width),
            "attn.qkv.weight": rand(3 * width, width),
            "attn.qkv.bias": rand(3 * width),
            "attn.proj.weight": rand(width, width),
            "attn.proj.bias": rand(width),
            "ls1.gamma": rand(width, scale=0.1, offset=0.5),
            "norm2.weight": rand(width, scale=0.1, offset=1.0),
            "norm2.bias": rand(width),
            "ls2.gamma": rand(width, scale=0.1, offset=0.5),
        }
        if swiglu_hidden:
            block["mlp.w12.weight"] = rand(2 * swiglu_hidden, width)
            block["mlp.w12.bias"] = rand(2 * swiglu_hidden)
            block["mlp.w3.weight"] = rand(width, swiglu_hidden)
            block["mlp.w3.bias"] = rand(width)
        else:
            block["mlp.fc1.weight"] = rand(4 * width, width)
            block["mlp.fc1.bias"] = rand(4 * width)
            block["mlp.fc2.weight"] = rand(width, 4 * width)
            block["mlp.fc2.bias"] = rand(width)
        state.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    return state


def meta_vit_patch_tokens(state: dict[str, torch.Tensor], images: torch.Tensor, heads: int):
    """DINOv2's forward written out from Meta's definition, independent of timm."""
    w = state
    x = F.conv2d(images, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w["cls_token"].expand(len(x), -1, -1), x], dim=1) + w["pos_embed"]
    width = x.shape[-1]
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        b = {k[len(f"blocks.{i}.") :]: v for k, v in w.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (width,), b["norm1.weight"], b["norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, b["attn.qkv.weight"], b["attn.qkv.bias"]).chunk(3, dim=-1)
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        x = x + b["ls1.gamma"] * F.linear(attn, b["attn.proj.weight"], b["attn.proj.bias"])
        h = F.layer_norm(x, (width,), b["norm2.weight"], b["norm2.bias"], eps=1e-6)
        x = x + b["ls2.gamma"] * meta_mlp(b, h)
    x = F.layer_norm(x, (width,), w["norm.weight"], w["norm.bias"], eps=1e-6)
    side = images.shape[-1] // 14
    return x[:, 1:].reshape(len(x), side, side, width)


def meta_mlp(block: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    if "mlp.w12.weight" in block:  # SwiGLUFFNFused: silu(first half) * second half
        gate, value = F.linear(x, block["mlp.w12.weight"], block["mlp.w12.bias"]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * value, block["mlp.w3.weight"], block["mlp.w3.bias"])
    hidden = F.gelu(F.linear(x, block["mlp.fc1.weight"], block["mlp.fc1.bias"]))
    return F.linear(hidden, block["mlp.fc2.weight"], block["mlp.fc2.bias"])


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = sam2_state()
    path = tmp_path_factory.mktemp("sam2") / "my_sam2_tiny.pt"
    torch.save({"model": state}, path)
    return path, state


@pytest.fixture(scope="module")
def dinov2_file(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = meta_dinov2_state()
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def offline(monkeypatch) -> None:
    def refuse(url, timeout=None):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(registry, "urlopen", refuse)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- strict loading of official layouts ---------------------------------------------------------


def test_sam2_checkpoint_loads_strictly_by_path(sam2_file):
    path, state = sam2_file
    model = build_sam2_model(path, image_size=256, config_name=TINY_CONFIG)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())

    reference = build_sam2_model(TINY, weights="random", image_size=256)
    reference.load_state_dict(state, strict=True)
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ours = model.forward_image(image)["vision_features"]
        theirs = reference.forward_image(image)["vision_features"]
    assert torch.equal(ours, theirs)


def test_official_sam2_file_name_needs_no_config(sam2_file, tmp_path):
    path, state = sam2_file
    official = tmp_path / f"{TINY}.pt"
    official.write_bytes(path.read_bytes())
    model = build_sam2_model(official, image_size=256)
    assert torch.equal(model.state_dict()["no_obj_embed_spatial"], state["no_obj_embed_spatial"])


def test_dinov2_meta_layout_loads_strictly_and_matches_metas_forward(dinov2_file):
    path, state = dinov2_file
    encoder = build_dinov2_encoder(path, image_size=518)
    assert (encoder.name, encoder.embed_dim, encoder.patch_size) == ("dinov2_vits14", 384, 14)
    params = encoder.vit.state_dict()
    assert all(torch.equal(params[k], v) for k, v in state.items() if k != "mask_token")

    image = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        tokens = encoder(image)
        expected = meta_vit_patch_tokens(state, image, heads=6)
    assert tokens.shape == (1, 37, 37, 384)
    torch.testing.assert_close(tokens, expected, atol=1e-4, rtol=1e-4)


def test_vitg14_swiglu_layout_fits_the_registered_timm_arch():
    # One block of ViT-g/14 (the full model is 1.1 B parameters): Meta's fused SwiGLU keys must
    # load strictly into the registry's timm architecture and compute Meta's function.
    state = meta_dinov2_state(width=1536, depth=1, swiglu_hidden=4096)
    arch = CHECKPOINTS["dinov2_vitg14"].arch
    vit = timm.create_model(arch, pretrained=False, num_classes=0, depth=1)
    vit.load_state_dict(checkpoint_filter_fn(dict(state), vit), strict=True)
    block = {k.removeprefix("blocks.0."): v for k, v in state.items()}
    tokens = torch.randn(1, 5, 1536, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        torch.testing.assert_close(vit.blocks[0].mlp(tokens), meta_mlp(block, tokens))


def test_dinov2_pos_embed_is_resampled_for_smaller_inputs(dinov2_file):
    path, _ = dinov2_file
    encoder = build_dinov2_encoder(path, image_size=224)
    assert encoder.vit.pos_embed.shape == (1, 1 + 16 * 16, 384)
    with torch.inference_mode():
        assert encoder(torch.zeros(2, 3, 224, 224)).shape == (2, 16, 16, 384)


def test_unofficially_named_dinov2_file_is_identified_by_width(dinov2_file, tmp_path):
    path, _ = dinov2_file
    renamed = tmp_path / "my_encoder.pth"
    renamed.write_bytes(path.read_bytes())
    encoder = build_dinov2_encoder(renamed, image_size=224)
    assert (encoder.name, encoder.embed_dim) == ("my_encoder", 384)


# --- registry, cache and download ---------------------------------------------------------------


def test_registry_lists_every_official_checkpoint():
    assert len(CHECKPOINTS) == 12
    large = CHECKPOINTS["sam2_hiera_large"]
    assert (
        large.url == "https://dl.fbaipublicfiles.com/segment_anything_2/072824/sam2_hiera_large.pt"
    )
    assert large.arch == "configs/sam2/sam2_hiera_l.yaml"
    assert CHECKPOINTS["sam2.1_hiera_base_plus"].arch == "configs/sam2.1/sam2.1_hiera_b+.yaml"
    vitg = CHECKPOINTS["dinov2_vitg14"]
    assert (
        vitg.url == "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth"
    )
    assert (vitg.arch, vitg.embed_dim) == ("vit_giant_patch14_dinov2", 1536)
    for entry in CHECKPOINTS.values():  # every arch exists in the installed sam2 / timm
        if entry.kind == "sam2":
            assert (importlib.resources.files("sam2") / entry.arch).is_file(), entry.arch
        else:
            assert timm.is_model(entry.arch), entry.arch


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "ntt"))
    monkeypatch.setenv("FIFTYONE_MODEL_ZOO_DIR", str(tmp_path / "zoo"))
    assert cache_dir() == tmp_path / "ntt"
    monkeypatch.delenv("NTT_CACHE_DIR")
    assert cache_dir() == tmp_path / "zoo" / "ntt"
    monkeypatch.delenv("FIFTYONE_MODEL_ZOO_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "ntt"


def test_registry_name_uses_cached_file_without_downloading(cache, offline, sam2_file):
    cache.mkdir()
    (cache / f"{TINY}.pt").write_bytes(sam2_file[0].read_bytes())
    assert resolve_checkpoint(TINY) == cache / f"{TINY}.pt"
    model = build_sam2_model(TINY, image_size=256)
    assert torch.equal(
        model.state_dict()["no_obj_embed_spatial"], sam2_file[1]["no_obj_embed_spatial"]
    )


class _Response(io.BytesIO):
    """What urlopen returns, as far as a download reads it."""

    def __init__(self, body: bytes, send_length: bool = True) -> None:
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))} if send_length else {}


def test_download_is_atomic_into_the_cache(cache, monkeypatch):
    requested = []

    def serve(url, timeout=None):
        requested.append(url)
        return _Response(b"checkpoint bytes")

    monkeypatch.setattr(registry, "urlopen", serve)
    path = resolve_checkpoint("dinov2_vits14")
    assert path == cache / "dinov2_vits14_pretrain.pth"
    assert path.read_bytes() == b"checkpoint bytes"
    assert requested == [CHECKPOINTS["dinov2_vits14"].url]
    assert list(cache.iterdir()) == [path]


@pytest.mark.parametrize("send_length", [True, False])
def test_download_reports_each_chunk_with_the_total_when_known(
    cache, monkeypatch, tmp_path, send_length
):
    body = bytes(range(256)) * 10_000  # 2.56 MB: three chunks of at most 1 MiB
    monkeypatch.setattr(registry, "urlopen", lambda url, timeout=None: _Response(body, send_length))
    heard = []
    registry.download_file(
        "https://example.org/x.pt", tmp_path / "x.pt", progress=lambda *args: heard.append(args)
    )
    total = len(body) if send_length else None
    assert heard == [
        ("x.pt", 1 << 20, total),
        ("x.pt", 2 << 20, total),
        ("x.pt", len(body), total),
    ]
    assert (tmp_path / "x.pt").read_bytes() == body


def test_offline_download_explains_where_to_put_the_file(cache, offline):
    entry = CHECKPOINTS["sam2_hiera_large"]
    with pytest.raises(CheckpointError) as error:
        build_sam2_model("sam2_hiera_large", image_size=256)
    message = str(error.value)
    for part in (entry.url, entry.file_name, str(cache / entry.file_name), "sam_model", "path"):
        assert part in message
    assert list(cache.iterdir()) == []  # no partial download left behind


def test_no_download_when_disabled(cache, offline):
    with pytest.raises(CheckpointError, match="encoder_model"):
        resolve_checkpoint("dinov2_vitl14", download=False)


def test_missing_path_and_unknown_name():
    with pytest.raises(CheckpointError, match="does-not-exist.pt"):
        resolve_checkpoint("/nowhere/does-not-exist.pt")
    with pytest.raises(CheckpointError) as error:
        build_sam2_model("sam3_hiera_huge", weights="random")
    assert all(name in str(error.value) for name in CHECKPOINTS)


def test_truncated_checkpoint_is_reported_corrupt(sam2_file, tmp_path):
    truncated = tmp_path / f"{TINY}.pt"
    truncated.write_bytes(sam2_file[0].read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt") as error:
        build_sam2_model(truncated, image_size=256)
    assert "download it again" in str(error.value)


def test_dinov2_file_given_as_sam2_is_refused(dinov2_file, tmp_path):
    renamed = tmp_path / "weights.pt"
    renamed.write_bytes(dinov2_file[0].read_bytes())
    with pytest.raises(CheckpointError, match="not a SAM2 checkpoint.*DINOv2"):
        build_sam2_model(renamed, image_size=256, config_name=TINY_CONFIG)
    with pytest.raises(CheckpointError, match="is a dinov2 checkpoint"):
        build_sam2_model(dinov2_file[0], image_size=256)


def test_sam2_file_given_as_dinov2_is_refused(sam2_file):
    with pytest.raises(CheckpointError, match="not a DINOv2 checkpoint.*SAM2"):
        build_dinov2_encoder(sam2_file[0], image_size=224)


def test_tiny_sam2_file_with_large_config_names_expected_and_found(sam2_file):
    config = "configs/sam2.1/sam2.1_hiera_l.yaml"
    with pytest.raises(CheckpointError) as error:
        build_sam2_model(sam2_file[0], image_size=256, config_name=config)
    message = str(error.value)
    assert "expected SAM2.1 with a Hiera trunk of 48 blocks, width 144" in message
    assert "found SAM2.1 with a Hiera trunk of 12 blocks, width 96" in message
    assert config in message


def test_registry_name_of_the_other_kind_is_refused():
    with pytest.raises(CheckpointError, match="dinov2 checkpoint"):
        build_sam2_model("dinov2_vits14", weights="random")
    with pytest.raises(CheckpointError, match="sam2 checkpoint"):
        build_dinov2_encoder(TINY, weights="random")


def test_unknown_sam2_file_needs_sam_config(sam2_file):
    with pytest.raises(CheckpointError, match="sam_config"):
        build_sam2_model(sam2_file[0], image_size=256)


def test_unknown_sam2_config_lists_known_ones(sam2_file):
    with pytest.raises(CheckpointError, match="sam2.1_hiera_t.yaml"):
        build_sam2_model(sam2_file[0], image_size=256, config_name="configs/sam2/nope.yaml")


# --- devices ------------------------------------------------------------------------------------


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected_auto = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected_auto
    with pytest.raises(DeviceError, match="'auto'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_cuda_on_a_cpu_machine_is_a_device_error(spec):
    with pytest.raises(DeviceError, match="device='cpu'"):
        resolve_device(spec)


# --- random weights and the model cache ---------------------------------------------------------


@pytest.fixture(scope="module")
def random_checksums() -> list[str]:
    return [checksum(m) for m in random_models()]


def test_random_models_are_identical_and_leave_the_callers_rng_alone(random_checksums):
    rng_before = torch.get_rng_state()
    assert [checksum(m) for m in random_models()] == random_checksums
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_random_models_are_identical_across_processes(random_checksums):
    # A fresh interpreter stands for a Ray actor or worker process: it must build the same bytes.
    code = "\n".join(
        [
            "import hashlib, torch",
            "from ntt_core.models import build_dinov2_encoder, build_sam2_model",
            f"TINY = {TINY!r}",
            inspect.getsource(checksum),
            inspect.getsource(random_models),
            "print(*(checksum(m) for m in random_models()))",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == random_checksums


def test_load_models_caches_per_model_and_freezes():
    models.clear_model_cache()
    config = NTTConfig.tiny(weights="random", device="auto")
    sam, encoder, device = load_models(config)
    assert device == resolve_device("auto")
    explicit_sam, explicit_encoder, _ = load_models(config.replace(device=str(device)))
    assert explicit_sam is sam and explicit_encoder is encoder  # keyed by the resolved device
    resized_sam, same_encoder, _ = load_models(config.replace(sam_image_size=128))
    assert resized_sam is not sam and same_encoder is encoder
    for model in (sam, encoder):
        assert not model.training
        assert not any(p.requires_grad for p in model.parameters())
    assert (encoder.name, encoder.image_size) == ("dinov2_vits14", 224)
    models.clear_model_cache()


def test_weights_must_be_official_or_random():
    with pytest.raises(ValueError, match="weights"):
        build_dinov2_encoder("dinov2_vits14", weights="pretrained")
