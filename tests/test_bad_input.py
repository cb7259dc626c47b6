"""Bad input ends in a clear error or a recorded per-sample failure, and nothing is lost.

Real embedded database, random-weight tiny models on the CPU. Each refusal is checked to leave
the dataset as it was (fields, runs, tags, ground truth); see README "When things go wrong".
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import textwrap
import urllib.request

import fiftyone as fo
import fiftyone.operators as foo
import numpy as np
import pytest
from fiftyone.operators.executor import ExecutionError
from PIL import Image

from ntt_core import NTTConfig, NTTError
from ntt_core.images import load_image
from ntt_operators import api
from ntt_operators.labels import paste_mask

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = NTTConfig.tiny(weights="random", device="cpu")
TINY_PARAMS = {"preset": "tiny", "weights": "random", "device": "cpu"}

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def run(name: str, dataset: fo.Dataset, **params):
    """Runs one of the plugin's operators immediately, as the App does.

    A failure is raised with the sentence the App shows (operators report failures to the App
    instead of raising, which FiftyOne would swallow or show as a traceback).
    """
    ctx = {"view": dataset.view(), "params": params}
    result = foo.execute_operator(f"@ntt/no_time_to_train/{name}", ctx=ctx)
    shown = [
        r.params["results"] for r in result.executor._requests if r.operator_uri == "show_output"
    ]
    for failure in [*shown, result.result]:
        if isinstance(failure, dict) and "error" in failure:
            raise ExecutionError(failure["error"])
    return result.result


def snapshot(dataset: fo.Dataset) -> tuple:
    """What a refused call must leave alone: fields, runs, tags, and the ground truth."""
    dataset.reload()
    return (
        sorted(dataset.get_field_schema()),
        dataset.list_runs(),
        dataset.values("tags"),
        dataset.values("ground_truth"),
    )


@pytest.fixture
def banked(scene_dataset):
    """The scenes with one reference per class tagged and a bank named ``bank`` built."""
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=TINY)
    return scene_dataset


def assert_refused(dataset: fo.Dataset, call, message: str, error=NTTError) -> None:
    before = snapshot(dataset)
    with pytest.raises(error, match=message):
        call(dataset)
    assert snapshot(dataset) == before


# -- dataset-level input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda d: api.sample_references(d, "missing", 1), "does not exist"),
        (lambda d: api.sample_references(d, "metadata", 1), "not an fo.Detections field"),
        (lambda d: api.sample_references(d, "ground_truth", 1, classes=["star"]), r"\['star'\]"),
        (lambda d: api.segment(d.limit(0), "bank", "pred"), "No target sample: the view is empty"),
        (lambda d: api.segment(d.match_tags("reference"), "bank", "pred"), "'reference' are left"),
        (lambda d: api.segment(d, "not a run key!", "pred"), "No memory bank named"),
        (lambda d: api.memory_bank_info(d, "not a run key!"), "No memory bank named"),
        (
            lambda d: api.segment(d, "bank", "pred", config=TINY.replace(encoder_image_size=112)),
            "built with encoder .* at 224px",
        ),
    ],
)
def test_dataset_level_refusals_change_nothing(banked, call, message):
    assert_refused(banked, call, message)


def test_an_output_field_fiftyone_refuses_is_refused_before_any_record(banked):
    assert_refused(banked, lambda d: api.segment(d, "bank", "_pred"), "cannot start with '_'")
    assert api.segment_status(banked, "_pred") is None


def test_a_run_that_fails_midway_ends_its_record_failed_with_why_and_the_counts(
    banked, monkeypatch
):
    segment_module = sys.modules["ntt_operators.api.segment"]  # api.segment is the function
    written = []
    real = segment_module._detections

    def fail_on_the_second_sample(result, label_field, sample_id, previous):
        if written:
            raise RuntimeError("disk full")
        written.append(sample_id)
        return real(result, label_field, sample_id, previous)

    monkeypatch.setattr(segment_module, "_detections", fail_on_the_second_sample)
    with pytest.raises(RuntimeError, match="disk full"):
        api.segment(banked, "bank", "pred")
    status = api.segment_status(banked, "pred")
    assert status["status"] == "failed" and "RuntimeError: disk full" in status["error"]
    assert status["processed"] == 1 == len(banked.exists("pred"))  # the sample written is kept


def test_reference_without_mask_or_box_is_refused(scene_dataset):
    sample = scene_dataset.first()
    detection = sample.ground_truth.detections[0]
    detection.mask, detection.bounding_box = None, None
    detection.tags = ["reference"]
    sample.save()
    assert_refused(
        scene_dataset,
        lambda d: api.build_memory_bank(d, "ground_truth", "b", config=TINY),
        "has no usable bounding box",
    )


def test_corrupt_or_swapped_bank_bytes_are_refused(banked):
    other = api.build_memory_bank(
        banked, "ground_truth", "disc_only", classes=["disc"], config=TINY
    )
    for blob, message in [
        (b"garbage", "Memory bank 'bank': Not an NTT memory bank"),
        (other.to_bytes(), r"holds classes \['disc'\] .* record says \['disc', 'square'\]"),
    ]:
        banked.save_run_results(
            "bank", banked.init_run_results("bank", bank=blob), overwrite=True, cache=False
        )
        assert_refused(banked, lambda d: api.segment(d, "bank", "pred"), message)


# -- images -----------------------------------------------------------------------------------


def write_image_zoo(folder: pathlib.Path, scene: np.ndarray) -> dict[str, pathlib.Path]:
    """The same scene in every awkward format, plus files that cannot be read."""
    folder.mkdir()
    image = Image.fromarray(scene)
    paths = {name: folder / f"{name}.{ext}" for name, ext in _ZOO.items()}
    image.convert("L").save(paths["gray"])
    image.convert("RGBA").save(paths["rgba"])
    gray16 = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(gray16).save(paths["gray16"])
    assert Image.open(paths["gray16"]).mode.startswith("I;16")
    image.convert("CMYK").save(paths["cmyk"], quality=95)
    image.crop((0, 0, 1, 1)).save(paths["one_pixel"])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated 90° clockwise
    image.save(paths["exif_rotated"], exif=exif.tobytes(), quality=95)
    # The upright pixels of the rotated JPEG, stored plainly: predictions must match exactly.
    Image.fromarray(load_image(paths["exif_rotated"])).save(paths["exif_upright"])
    image.save(paths["truncated"])
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["corrupt"].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    return paths  # "missing" is never written


_ZOO = {
    "gray": "png",
    "rgba": "png",
    "gray16": "png",
    "cmyk": "jpg",
    "one_pixel": "png",
    "exif_rotated": "jpg",
    "exif_upright": "png",
    "truncated": "png",
    "corrupt": "png",
    "missing": "png",
}
_UNREADABLE = {"truncated": "truncated", "corrupt": "Cannot decode", "missing": "not found"}


def test_awkward_images_are_segmented_and_unreadable_ones_recorded(banked, scene_files, run_dir):
    paths = write_image_zoo(run_dir / "zoo", np.asarray(Image.open(scene_files[0][0])))
    banked.add_samples([fo.Sample(filepath=str(p), zoo=name) for name, p in paths.items()])
    zoo = banked.exists("zoo")
    ids = dict(zip(zoo.values("zoo"), zoo.values("id")))
    gt_before = banked.values("ground_truth")

    out = api.segment(zoo, "bank", "pred", batch_size=3)

    assert out["processed"] == len(_ZOO) - len(_UNREADABLE)
    assert {name: ids[name] in out["failed"] for name in _ZOO} == {
        name: name in _UNREADABLE for name in _ZOO
    }
    for name, reason in _UNREADABLE.items():
        assert (
            out["failed"][ids[name]].startswith("ImageError") and reason in out["failed"][ids[name]]
        )
        assert banked[ids[name]]["pred"] is None  # left empty: skip_done retries it
    status = api.segment_status(banked, "pred")
    assert status["status"] == "completed" and status["failed"] == out["failed"]
    assert banked.values("ground_truth") == gt_before

    # The App shows an EXIF-rotated JPEG upright, and compute_metadata reports that upright
    # size: masks must be the upright image's, pixel for pixel.
    rotated, upright = banked[ids["exif_rotated"]], banked[ids["exif_upright"]]
    rotated.compute_metadata()
    height, width = load_image(rotated.filepath).shape[:2]
    assert (rotated.metadata.width, rotated.metadata.height) == (width, height) != (200, 160)
    assert len(rotated.pred.detections) > 0
    for a, b in zip(rotated.pred.detections, upright.pred.detections, strict=True):
        assert a.label == b.label and a.confidence == pytest.approx(b.confidence)
        assert a.bounding_box == pytest.approx(b.bounding_box)
        full = paste_mask(a.mask, a.bounding_box, width, height)
        assert full.shape == (height, width) and full.sum() == a.mask.sum()
        assert np.array_equal(a.mask, b.mask)
    for name in set(_ZOO) - set(_UNREADABLE):
        sample = banked[ids[name]]
        h, w = load_image(sample.filepath).shape[:2]
        for d in sample.pred.detections:
            assert paste_mask(d.mask, d.bounding_box, w, h).sum() == d.mask.sum() > 0


def test_exif_rotated_reference_is_read_in_the_frame_the_app_shows(scene_files, run_dir):
    """A reference's mask and box are relative to the upright image, whatever metadata says."""
    paths = write_image_zoo(run_dir / "zoo_refs", np.asarray(Image.open(scene_files[1][0])))
    upright = load_image(paths["exif_upright"])
    mask = np.zeros(upright.shape[:2], dtype=bool)
    mask[20:60, 30:70] = True
    dataset = fo.Dataset()
    for name in ("exif_rotated", "exif_upright"):
        gt = fo.Detections(detections=[fo.Detection.from_mask(mask, label=name)])
        dataset.add_sample(fo.Sample(filepath=str(paths[name]), ground_truth=gt, tags=["ref"]))
    dataset.compute_metadata()
    bank = api.build_memory_bank(
        dataset, "ground_truth", "b", ref_tag="ref", tag_type="sample", config=TINY
    )
    assert bank.classes == ["exif_rotated", "exif_upright"]
    rotated, plain = bank.features.numpy()  # one reference each, in sample order
    assert np.allclose(rotated, plain, atol=1e-5)
    dataset.delete()


def test_a_12000x9000_image_is_segmented_within_a_memory_bound(run_dir):
    """Peak memory of one predict on a 108-megapixel image, measured in a fresh process."""
    script = textwrap.dedent(
        f"""
        import re
        from PIL import Image
        from ntt_core import NTTConfig, NTTPredictor
        from ntt_core.references import Reference
        import numpy as np

        path = {str(run_dir / "huge.png")!r}
        image = Image.new("RGB", (12000, 9000), (90, 120, 30))
        image.paste((200, 30, 30), (2000, 2000, 7000, 6000))
        image.save(path, compress_level=1)
        del image
        predictor = NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))
        mask = np.zeros((64, 64), dtype=bool)
        mask[16:48, 16:48] = True
        scene = np.zeros((64, 64, 3), dtype=np.uint8)
        scene[mask] = (200, 30, 30)
        bank = predictor.build_bank([Reference(image=scene, mask=mask, label="box", ref_id="0")])
        predictor.predict(np.zeros((32, 32, 3), dtype=np.uint8), bank)  # warm up
        def status(key):
            text = open("/proc/self/status").read()
            return int(re.search(key + r":\\s+(\\d+)", text).group(1)) // 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak (VmHWM) to the current resident size
        before = status("VmRSS")
        result = predictor.predict(path, bank)
        assert result.image_size == (9000, 12000), result.image_size
        print("PEAK_MB", status("VmHWM") - before)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak = int(re.search(r"PEAK_MB (-?\d+)", done.stdout).group(1))
    # The decoded image alone is 324 MB (uint8 RGB); a bound of 4 copies leaves room for
    # decoding and the full-size masks, and fails if the work ever scales with P x H x W.
    assert peak < 1300, f"one predict on a 12000x9000 image peaked at +{peak} MB"


# -- models, through the operators --------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty checkpoint cache and no network."""
    monkeypatch.setenv("NTT_CACHE_DIR", str(tmp_path / "empty-cache"))

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr("ntt_core.registry.urlopen", refuse)


def bank_params(**changes) -> dict:
    return {"gt_field": "ground_truth", "bank_name": "b2", **TINY_PARAMS, **changes}


def test_checkpoint_missing_offline_is_refused_with_where_to_put_it(banked, offline):
    before = snapshot(banked)
    with pytest.raises(ExecutionError, match="is not available: the download failed.*put it at"):
        run("build_memory_bank", banked, **bank_params(weights="official"))
    assert snapshot(banked) == before


@pytest.mark.parametrize(
    "file_name, content, message",
    [
        ("sam2.1_hiera_tiny.pt", b"PK\x03\x04 truncated download", "corrupt or truncated"),
        ("dinov2_vits14_pretrain.pth", b"", "is a dinov2 checkpoint, but a sam2 one"),
        ("folder.pt", None, "is not an existing file"),
        ("nowhere/sam.pt", False, "is not an existing file"),
    ],
)
def test_bad_checkpoint_paths_are_refused(banked, tmp_path, file_name, content, message):
    path = tmp_path / file_name
    if content is None:
        path.mkdir()  # a directory is not a checkpoint file
    elif content is not False:
        path.write_bytes(content)
    before = snapshot(banked)
    with pytest.raises(ExecutionError, match=message):
        run("build_memory_bank", banked, **bank_params(weights="official", sam_model=str(path)))
    assert snapshot(banked) == before


@pytest.mark.parametrize("operator", ["build_memory_bank", "segment_with_references"])
def test_cuda_on_a_machine_without_it_is_refused(banked, operator):
    if operator == "build_memory_bank":
        params = bank_params(device="cuda")
    else:
        params = {"bank_name": "bank", "label_field": "ntt_predictions", "device": "cuda"}
    before = snapshot(banked)
    with pytest.raises(ExecutionError, match="CUDA is not available"):
        run(operator, banked, **params)
    assert snapshot(banked) == before and not banked.has_sample_field("ntt_predictions")


# -- data is never code -------------------------------------------------------------------------


def test_no_pickle_and_no_unsafe_torch_load_in_the_code():
    sources = [
        p
        for d in ("ntt_core", "ntt_operators", "scripts", "benchmarks")
        for p in (ROOT / d).rglob("*.py")
    ]
    sources.append(ROOT / "__init__.py")
    offenders = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            unsafe_load = "torch.load(" in code and "weights_only=True" not in code
            if unsafe_load or re.search(r"\b(c?pickle|dill|joblib|marshal)\b", code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_a_stored_bank_is_safetensors_not_pickle(banked):
    blob = banked.load_run_results("bank", cache=False).bank
    (length,) = np.frombuffer(blob[:8], dtype="<u8")
    assert blob[8:9] == b"{" and b'"__metadata__"' in blob[8 : 8 + int(length)]
    assert not blob.startswith(b"\x80")  # a pickle stream starts with PROTO
