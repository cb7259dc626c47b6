"""The Ray Data path gives the single-process answers, image for image (local Ray, 2 CPU actors)."""

import os

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray", reason="the Ray backend needs the extra: pip install .[ray]")

from ntt_core import NTTConfig, NTTPredictor, Reference  # noqa: E402
from ntt_core.ray_backend import predict_or_error, segment_on_ray  # noqa: E402
from ntt_core.synthetic import make_scene  # noqa: E402

pytestmark = pytest.mark.ray

CLASSES = ["disc", "square", "triangle"]
CONFIG = NTTConfig.tiny(weights="random", device="cpu")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def predictor() -> NTTPredictor:
    return NTTPredictor(CONFIG)


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(11)
    return [make_scene(rng, 110 + 10 * i, 150 - 5 * i, CLASSES) for i in range(8)]


@pytest.fixture(scope="module")
def bank(predictor, scenes):
    references = [
        Reference(image, inst.mask, inst.label, f"ref{i}:{j}", inst.box_xywh)
        for i, (image, instances) in enumerate(scenes[:2])
        for j, inst in enumerate(instances)
    ]
    return predictor.build_bank(references)


@pytest.fixture(scope="module")
def items(scenes, tmp_path_factory) -> list[tuple[str, str]]:
    """Six generated PNG targets and one corrupt file, as (sample id, path)."""
    root = tmp_path_factory.mktemp("ray-images")
    items = []
    for i, (image, _) in enumerate(scenes[2:]):
        path = root / f"target{i}.png"
        Image.fromarray(image).save(path)
        items.append((f"sample{i}", str(path)))
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    items.append(("corrupt", str(corrupt)))
    return items


@pytest.fixture(scope="module")
def expected(predictor, bank, items):
    return {sample_id: predict_or_error(predictor, path, bank) for sample_id, path in items}


def _assert_same(results, expected) -> None:
    assert sorted(sample_id for sample_id, _, _ in results) == sorted(expected)
    for sample_id, instances, error in results:
        want, want_error = expected[sample_id]
        assert error == want_error, sample_id
        if want is None:
            assert instances is None
            continue
        assert instances.image_size == want.image_size
        assert instances.rles == want.rles
        np.testing.assert_array_equal(instances.labels, want.labels)
        np.testing.assert_array_equal(instances.boxes, want.boxes)
        np.testing.assert_allclose(instances.scores, want.scores, rtol=0, atol=1e-6)
        assert instances.class_names == want.class_names
        # The reasons travel too (SAM2's IoU as closely as the scores: another process).
        for row, wanted in zip(instances.explanation.rows(), want.explanation.rows(), strict=True):
            assert row == pytest.approx(wanted, abs=1e-6)


def test_ray_matches_single_process_and_reports_bad_images(local_ray, bank, items, expected):
    results = list(segment_on_ray(items, bank.to_bytes(), CONFIG, num_actors=2, batch_size=2))
    _assert_same(results, expected)
    assert sum(len(instances) for _, instances, _ in results if instances) > 0
    errors = {sample_id: error for sample_id, _, error in results if error}
    assert list(errors) == ["corrupt"] and errors["corrupt"].startswith("ImageError: ")


def test_a_killed_worker_is_replaced_and_the_run_finishes(local_ray, bank, items, expected):
    psutil = pytest.importorskip("psutil")
    results = []
    for result in segment_on_ray(items, bank.to_bytes(), CONFIG, num_actors=2, batch_size=1):
        if not results:
            _kill_one_segment_worker(psutil)
        results.append(result)
    _assert_same(results, expected)


def _kill_one_segment_worker(psutil) -> None:
    # Only this test's own Ray workers: descendants of this process (its local cluster).
    workers = [
        process
        for process in psutil.Process(os.getpid()).children(recursive=True)
        if "SegmentActor" in " ".join(process.cmdline())
    ]
    assert workers, "no SegmentActor worker found to kill"
    workers[0].kill()


def test_plugin_segment_on_ray_writes_the_local_field(local_ray, scenes, items):
    fo = pytest.importorskip("fiftyone")
    from ntt_operators import api

    dataset = fo.Dataset()
    try:
        dataset.add_samples(
            fo.Sample(
                filepath=path,
                ground_truth=fo.Detections(
                    detections=[fo.Detection.from_mask(i.mask, label=i.label) for i in instances]
                ),
            )
            for (_, path), (_, instances) in zip(items[:-1], scenes[2:])
        )
        api.sample_references(dataset, "ground_truth", shots=1, seed=33)
        api.build_memory_bank(dataset, "ground_truth", "bank", config=CONFIG)
        dataset.add_sample(fo.Sample(filepath=items[-1][1]))  # the corrupt file
        local = api.segment(dataset, "bank", "local_pred")
        on_ray = api.segment(dataset, "bank", "ray_pred", backend="ray", num_actors=2)
        assert (on_ray["processed"], on_ray["skipped"]) == (local["processed"], local["skipped"])
        assert on_ray["failed"].keys() == local["failed"].keys() and len(local["failed"]) == 1
        for want, got in zip(dataset.values("local_pred"), dataset.values("ray_pred")):
            _assert_same_detections(want, got)
    finally:
        dataset.delete()


def _assert_same_detections(want, got) -> None:
    if want is None:
        assert got is None
        return
    assert len(got.detections) == len(want.detections)
    for a, b in zip(want.detections, got.detections):
        assert (b.label, b.bounding_box) == (a.label, a.bounding_box)
        np.testing.assert_array_equal(b.mask, a.mask)
        assert b.confidence == pytest.approx(a.confidence, abs=1e-6)


def test_a_foreign_bank_is_refused_before_ray_starts(scene_dataset):
    from ntt_core.errors import BankMismatchError
    from ntt_operators import api

    tiny = NTTConfig.tiny(weights="random", device="cpu")
    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=tiny)
    other_encoder = tiny.replace(encoder_model="dinov2_vitb14")
    with pytest.raises(BankMismatchError, match="dinov2_vitb14"):
        api.segment(scene_dataset, "bank", "ntt", config=other_encoder, backend="ray")
    assert not scene_dataset.has_sample_field("ntt")
