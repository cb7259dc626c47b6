"""The fast path computes what the paper computes: held against an independent transcription.

``ntt_core.paper_transcription`` follows the method spec step by step on the SAM2 modules with
dense full-size masks; it shares nothing with the fast path but the networks. It is compared
with the tiny random models, and in a regime that looks like trained weights: logits far beyond
+-32 and partial, object-shaped masks.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ntt_core import NTTConfig, NTTPredictor, Reference
from ntt_core.paper_transcription import PaperSettings, predict_as_in_paper
from ntt_core.proposals import sam2_predictor
from ntt_core.synthetic import make_scene

# Features differ only by float summation order (separable pooling vs an upsampled map).
SCORE_TOLERANCE = 1e-5
CLASSES = ["disc", "square", "triangle"]


def paper_settings(config: NTTConfig) -> PaperSettings:
    return PaperSettings(
        sam_image_size=config.sam_image_size,
        encoder_image_size=config.encoder_image_size,
        points_per_side=config.points_per_side,
    )


def scenes_and_bank(predictor, seed):
    rng = np.random.default_rng(seed)
    scenes = [make_scene(rng, 128, 160, CLASSES) for _ in range(3)]
    bank = predictor.build_bank(
        [
            Reference(image, inst.mask, inst.label, f"{i}:{j}", inst.box_xywh)
            for i, (image, instances) in enumerate(scenes[:2])
            for j, inst in enumerate(instances)
        ]
    )
    return scenes[2][0], bank


def assert_same_detections(fast, paper):
    assert len(fast) == len(paper) > 0
    assert fast.labels.tolist() == paper.labels.tolist()
    np.testing.assert_allclose(fast.scores, paper.scores.numpy(), atol=SCORE_TOLERANCE)
    np.testing.assert_array_equal(fast.masks(), paper.masks.numpy())
    # FiftyOne boxes contain the mask (pixel-inclusive); the paper's end on the last pixel.
    np.testing.assert_array_equal(fast.boxes - [0, 0, 1, 1], paper.boxes.numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_equals_the_paper_transcription(seed):
    predictor = NTTPredictor(NTTConfig.tiny(weights="random", device="cpu"))
    target, bank = scenes_and_bank(predictor, seed)
    fast = predictor.predict(target, bank)
    paper = predict_as_in_paper(
        predictor.sam_model, predictor.encoder, target, bank.prototypes,
        paper_settings(predictor.config),
    )  # fmt: skip
    assert_same_detections(fast, paper)


class PromptRecorder(torch.nn.Module):
    """SAM2's prompt encoder, remembering the last point prompts for ``ObjectShapedDecoder``."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder, self.points = encoder, None

    def get_dense_pe(self):
        return self.encoder.get_dense_pe()

    def forward(self, points, boxes, masks):
        self.points = points[0][:, 0, :]  # (B, 2) xy in the input frame
        return self.encoder(points=points, boxes=boxes, masks=masks)


class ObjectShapedDecoder(torch.nn.Module):
    """SAM2's mask decoder made to answer like a trained one: partial masks, |logits| >> 32.

    Random weights give near-whole-image masks with |logit| < 1 that barely depend on the
    prompt. Here each mask's logit field (driven by the image) is smoothed, standardised, raised
    around its prompt point, cut at its 80th percentile and scaled: object-shaped masks near
    the prompt, with logits in the hundreds.
    """

    def __init__(self, decoder: torch.nn.Module, prompts: PromptRecorder, image_size: int):
        super().__init__()
        self.decoder, self.prompts, self.image_size = decoder, prompts, image_size
        # forward_image projects the high-resolution maps through these.
        self.conv_s0, self.conv_s1 = decoder.conv_s0, decoder.conv_s1

    def forward(self, *args, **kwargs):
        logits, iou, tokens, object_scores = self.decoder(*args, **kwargs)
        field = F.avg_pool2d(logits, kernel_size=9, stride=1, padding=4)
        mean = field.mean(dim=(2, 3), keepdim=True)
        field = (field - mean) / field.std(dim=(2, 3), keepdim=True)
        side = logits.shape[-1]
        centre = self.prompts.points * side / self.image_size  # (B, 2) in mask pixels
        axis = torch.arange(side, dtype=logits.dtype) + 0.5
        dx = (axis[None, :] - centre[:, 0:1])[:, None, :]
        dy = (axis[None, :] - centre[:, 1:2])[:, :, None]
        bump = 3 * torch.exp(-(dx**2 + dy**2) / (2 * (side / 6) ** 2))
        field = field + bump[:, None]
        cut = torch.quantile(field.flatten(2), 0.8, dim=2)[..., None, None]
        return 100 * (field - cut), iou, tokens, object_scores


def test_fast_path_equals_the_paper_transcription_in_a_trained_like_regime():
    # One prompt chunk for both paths, so the decoder sees the same batches.
    predictor = NTTPredictor(NTTConfig.tiny(weights="random", device="cpu", points_per_batch=256))
    # Models are shared per process: the wrappers go on a private copy.
    model = copy.deepcopy(predictor.sam_model)
    predictor._sam_parts = (model, sam2_predictor(model))
    model.sam_prompt_encoder = PromptRecorder(model.sam_prompt_encoder)
    model.sam_mask_decoder = ObjectShapedDecoder(
        model.sam_mask_decoder, model.sam_prompt_encoder, predictor.config.sam_image_size
    )
    target, bank = scenes_and_bank(predictor, seed=0)
    proposals = predictor.propose(target)
    fast = predictor.score(proposals, bank)
    paper = predict_as_in_paper(
        predictor.sam_model, predictor.encoder, target, bank.prototypes,
        paper_settings(predictor.config),
    )  # fmt: skip

    # The regime: logits far beyond SAM2's +-32 clamp, partial masks, several detections.
    coverage = fast.masks().mean(axis=(1, 2))
    print(proposals.logits.abs().max(), len(proposals), len(fast), coverage)
    assert proposals.logits.abs().max() > 100
    assert len(fast) >= 5
    assert np.mean((coverage > 0.03) & (coverage < 0.8)) >= 0.5
    assert_same_detections(fast, paper)
