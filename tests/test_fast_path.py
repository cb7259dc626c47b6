"""The fast path returns the straightforward path's detections (the fast path's contract)."""

import numpy as np
import pytest

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.baseline import propose_straightforward
from ntt_core.synthetic import make_scene

# Features differ only by float summation order (separable pooling vs an upsampled map).
SCORE_TOLERANCE = 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_equals_straightforward_path(seed):
    predictor = NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))
    rng = np.random.default_rng(seed)
    classes = ["disc", "square", "triangle"]
    scenes = [make_scene(rng, 128, 160, classes) for _ in range(3)]
    bank = predictor.build_bank(
        [
            Reference(image, inst.mask, inst.label, f"{i}:{j}", inst.box_xywh)
            for i, (image, instances) in enumerate(scenes[:2])
            for j, inst in enumerate(instances)
        ]
    )
    target = scenes[2][0]
    fast = predictor.predict(target, bank)
    straight = predictor.score(propose_straightforward(predictor, target), bank)
    assert len(fast) > 0
    assert fast.rles == straight.rles
    np.testing.assert_array_equal(fast.boxes, straight.boxes)
    assert fast.label_names == straight.label_names
    np.testing.assert_allclose(fast.scores, straight.scores, atol=SCORE_TOLERANCE)
