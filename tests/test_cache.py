"""Cached proposals re-score to exactly what full inference gives, and stale entries are redone."""

import numpy as np
import pytest
from PIL import Image

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.cache import predict_cached, proposal_identity
from ntt_core.synthetic import make_scene

CLASSES = ["disc", "square", "triangle"]


class DictStore(dict):
    def set(self, key, value):
        self[key] = value


@pytest.fixture(scope="module")
def predictor():
    return NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    rng = np.random.default_rng(11)
    folder = tmp_path_factory.mktemp("cache-scenes")
    scenes = []
    for i in range(4):
        image, instances = make_scene(rng, 140, 180, CLASSES)
        path = folder / f"{i}.png"
        Image.fromarray(image).save(path)
        scenes.append((path, image, instances))
    return scenes


def _bank(predictor, scenes):
    return predictor.build_bank(
        [
            Reference(image, inst.mask, inst.label, f"{path.stem}:{j}", inst.box_xywh)
            for path, image, instances in scenes
            for j, inst in enumerate(instances)
        ]
    )


def test_rescoring_from_cache_equals_full_inference_with_the_new_bank(predictor, scenes):
    store = DictStore()
    target = scenes[3][0]
    first, hit = predict_cached(predictor, target, _bank(predictor, scenes[:1]), store, "s3")
    assert not hit and list(store) == ["s3"]
    assert first.rles == predictor.predict(target, _bank(predictor, scenes[:1])).rles

    new_bank = _bank(predictor, scenes[:3])  # a curator added references
    rescored, hit = predict_cached(predictor, target, new_bank, store, "s3")
    expected = predictor.predict(target, new_bank)
    assert hit
    assert rescored.rles == expected.rles and rescored.label_names == expected.label_names
    np.testing.assert_array_equal(rescored.scores, expected.scores)


def test_stale_or_damaged_entries_are_recomputed(predictor, scenes, tmp_path):
    store = DictStore()
    bank = _bank(predictor, scenes[:2])
    path = tmp_path / "target.png"
    Image.fromarray(scenes[3][1]).save(path)
    predict_cached(predictor, path, bank, store, "t")

    Image.fromarray(scenes[2][1]).save(path)  # the file changed under the same sample
    result, hit = predict_cached(predictor, path, bank, store, "t")
    assert not hit and result.rles == predictor.predict(path, bank).rles

    store["t"] = store["t"][:100]  # truncated entry
    _, hit = predict_cached(predictor, path, bank, store, "t")
    assert not hit
    _, hit = predict_cached(predictor, path, bank, store, "t")
    assert hit


def test_identity_covers_proposal_settings_only():
    config = NTTConfig.tiny(weights="random")
    assert proposal_identity(config) == proposal_identity(config.replace(max_detections=5))
    assert proposal_identity(config) != proposal_identity(config.replace(points_per_side=4))
    assert proposal_identity(config) != proposal_identity(
        config.replace(encoder_model="dinov2_vitb14")
    )
