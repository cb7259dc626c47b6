"""Each prediction's reasons (ntt_core.explain) and what the plugin builds on them."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import numpy as np
import pytest
import torch

from ntt_core import MemoryBank, Negatives
from ntt_core.explain import ATTRIBUTES, explain
from ntt_operators import api
from ntt_operators.api import explain as explain_api

TINY_ENCODER = ("dinov2_vits14", 518)
PREDICTIONS = "ntt_predictions"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


def unit(*values: float) -> list[float]:
    vector = np.asarray(values, dtype=np.float64)
    return list(vector / np.linalg.norm(vector))


def hand_made_bank() -> MemoryBank:
    """Three classes in 4-d; cat has two references pointing apart (their prototype is the
    normalised mean of the raw features: (0.5, 1, 0, 0)), dog and cow one, cat a negative."""
    features = torch.tensor(
        [[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0, 0, 0, 1.0]]
    )
    negatives = Negatives(torch.tensor([[1.0, 1.0, 0.0, 0.0]]), ["cat"], ["s9:n1"], [None])
    return MemoryBank.from_features(
        features,
        labels=["cat", "cat", "dog", "cow"],
        ref_ids=["s1:r1", "s1:r2", "s2:r3", "s3:r4"],
        encoder=TINY_ENCODER[0],
        encoder_image_size=TINY_ENCODER[1],
        classes=["cat", "dog", "cow"],
        negatives=negatives,
    )


def test_reasons_match_a_hand_computation():
    bank = hand_made_bank()
    proposals = [unit(0.9, 0.3, 0.5, 0.1), unit(0.1, 0.2, 0.9, 0.3)]
    labels = [0, 1]  # cat, dog
    out = explain(
        torch.tensor(proposals, dtype=torch.float32),
        torch.tensor(labels),
        torch.tensor([0.8, 0.6]),
        bank,
    )

    # By hand: the bank's own numbers, nothing of the code under test.
    refs = {"r1": ("cat", unit(1, 0, 0, 0)), "r2": ("cat", unit(0, 1, 0, 0)),
            "r3": ("dog", unit(0, 0, 1, 0)), "r4": ("cow", unit(0, 0, 0, 1))}  # fmt: skip
    prototypes = {"cat": unit(0.5, 1.0, 0, 0), "dog": unit(0, 0, 1, 0), "cow": unit(0, 0, 0, 1)}
    names = ["cat", "dog"]
    for k, feature in enumerate(proposals):
        cls = names[labels[k]]
        sims = {c: float(np.dot(feature, p)) for c, p in prototypes.items()}
        runner_up = max((c for c in sims if c != cls), key=sims.get)
        nearest = max(
            (r for r in refs if refs[r][0] == cls), key=lambda r: np.dot(feature, refs[r][1])
        )
        assert out.runner_up[k] == runner_up
        assert out.margin[k] == pytest.approx(sims[cls] - sims[runner_up], abs=1e-6)
        assert out.class_similarity[k] == pytest.approx(sims[cls], abs=1e-6)
        assert out.nearest_reference[k] == nearest
        assert out.nearest_reference_similarity[k] == pytest.approx(
            np.dot(feature, refs[nearest][1]), abs=1e-6
        )
    assert out.nearest_negative_similarity[0] == pytest.approx(
        np.dot(proposals[0], unit(1, 1, 0, 0)), abs=1e-6
    )
    assert out.nearest_reference == ["r1", "r3"]
    # Dog has no negative: None in the written attributes.
    rows = out.rows()
    assert rows[1]["nearest_negative_similarity"] is None and math.isnan(
        out.nearest_negative_similarity[1]
    )
    assert rows[0]["sam_iou"] == pytest.approx(0.8) and list(rows[0]) == list(ATTRIBUTES)


def test_a_one_class_bank_has_no_runner_up():
    bank = MemoryBank.from_features(torch.eye(2), ["cat", "cat"], ["s:a", "s:b"], *TINY_ENCODER)
    rows = explain(torch.tensor([unit(1, 1)]), torch.tensor([0]), torch.tensor([0.5]), bank).rows()
    assert rows[0]["runner_up"] is None and rows[0]["margin"] is None


# -- written on the predictions ---------------------------------------------------------------


@pytest.fixture
def banked(scene_dataset):
    from ntt_core import NTTConfig

    api.sample_references(scene_dataset, "ground_truth", shots=1, seed=33)
    tiny = NTTConfig.tiny(weights="random", device="cpu")
    api.build_memory_bank(scene_dataset, "ground_truth", "bank", config=tiny)
    api.segment(scene_dataset, "bank", PREDICTIONS, reuse_proposals=True)
    return scene_dataset


def reasons_by_mask(dataset, field: str) -> dict[tuple, dict]:
    """(sample id, mask bytes) -> the prediction's label, confidence and reasons."""
    rows = {}
    for sample_id, dets in zip(*dataset.values(["id", field])):
        for d in dets.detections if dets else []:
            values = {name: d[name] for name in ("label", "confidence", *ATTRIBUTES)}
            rows[(sample_id, d.mask.tobytes(), tuple(d.bounding_box))] = values
    return rows


def test_every_prediction_carries_its_reasons_and_a_rescore_updates_them(banked):
    dataset = banked
    bank = api.load_memory_bank(dataset, "bank")
    reference_ids = {ref_id.split(":")[1] for ref_id in bank.ref_ids}
    rows = reasons_by_mask(dataset, PREDICTIONS)
    assert rows
    for row in rows.values():
        assert row["nearest_reference"] in reference_ids
        assert 0 < row["sam_iou"] <= 1.5 and row["runner_up"] != row["label"]
        assert row["nearest_negative_similarity"] is None  # no negative yet
    schema = dataset.get_field_schema(flat=True)
    assert all(f"{PREDICTIONS}.detections.{name}" in schema for name in ATTRIBUTES)

    # A negative of the predicted class: the re-score in place writes its similarity.
    first = dataset.values(f"{PREDICTIONS}.detections.id", unwind=True)[0]
    dataset.select_labels(ids=[first], fields=PREDICTIONS).tag_labels("negative")
    api.update_memory_bank(dataset, "bank")
    out = api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True, rescore=True)
    assert out["edited"] > 0
    api.segment(dataset, "bank", "full", reuse_proposals=True)
    updated, full = reasons_by_mask(dataset, PREDICTIONS), reasons_by_mask(dataset, "full")
    assert updated.keys() == full.keys()
    assert any(row["nearest_negative_similarity"] is not None for row in updated.values())
    for key, row in updated.items():
        expected = full[key]
        negative = row.pop("nearest_negative_similarity")
        truth = expected.pop("nearest_negative_similarity")
        assert row == pytest.approx(expected, abs=1e-6)
        # An image the new negative cannot change is not scored again (README): its value may
        # lag, but only where the negative is no nearer than the class prototype.
        if negative != truth:
            assert truth is not None and truth < expected["class_similarity"]


# -- which reference hurts, and the review queue ----------------------------------------------


def cached_feature(dataset, sample_id: str, label_id: str) -> torch.Tensor:
    """The cached proposal feature behind a prediction (its id derives from the mask)."""
    from ntt_core import NTTConfig
    from ntt_core.cache import file_checksum, proposal_identity, proposals_from_bytes
    from ntt_core.coco import json_ready_rle
    from ntt_operators.proposal_cache import ProposalCache

    tiny = NTTConfig.tiny(weights="random", device="cpu")
    blob = ProposalCache(dataset, tiny).get(sample_id)
    checksum = file_checksum(dataset[sample_id].filepath)
    proposals = proposals_from_bytes(blob, checksum, proposal_identity(tiny))
    rles = [json_ready_rle(rle) for rle in proposals.rles]
    return proposals.features[ids_by_hand(f"{PREDICTIONS}:{sample_id}", rles).index(label_id)]


def ids_by_hand(seed: str, rles: list[dict]) -> list[str]:
    """Prediction ids as the plugin has always made them, written out here: the first 12 bytes
    of SHA-256 of 'seed:size:counts', a '+' more for each earlier identical mask."""
    ids, seen = [], set()
    for rle in rles:
        counts = rle["counts"] if isinstance(rle["counts"], str) else rle["counts"].decode()
        text = f"{seed}:{rle['size']}:{counts}"
        while text in seen:
            text += "+"
        seen.add(text)
        ids.append(hashlib.sha256(text.encode()).hexdigest()[:24])
    return ids


def test_prediction_ids_hash_the_seed_and_the_mask_and_rank_twins():
    from ntt_operators.labels import prediction_id_strings, prediction_ids

    counts = [b"0a1", b"3b2c", b"0a1", b"0a1"]  # one mask three times
    rles = [{"size": [6, 8], "counts": c.decode() if k % 2 else c} for k, c in enumerate(counts)]
    expected = ids_by_hand("field:sample", rles)
    assert len(set(expected)) == 4
    assert [str(i) for i in prediction_ids("field:sample", rles)] == expected
    assert prediction_id_strings("field:sample", [6, 8], counts) == expected


@pytest.fixture
def wrong_reference(scene_dataset):
    """A bank whose 'square' references are one square and one disc labelled 'square' (the
    deliberately wrong one), its predictions and their evaluation. Returns (dataset, wrong id)."""
    from ntt_core import NTTConfig

    dataset = scene_dataset
    gt = [(s, d) for s in dataset for d in s.ground_truth.detections]
    square = next((s, d) for s, d in gt if d.label == "square")
    disc = next((s, d) for s, d in gt if d.label == "disc" and s.id != square[0].id)
    first_disc = next((s, d) for s, d in gt if d.label == "disc" and d.id != disc[1].id)
    for sample, detection in (square, disc, first_disc):
        detection.tags = ["reference"]
        if detection is disc[1]:
            detection.label = "square"  # the mislabelled reference
        sample.save()
    tiny = NTTConfig.tiny(weights="random", device="cpu")
    api.build_memory_bank(dataset, "ground_truth", "bank", config=tiny)
    api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True)
    api.evaluate(dataset, PREDICTIONS, "ground_truth", "eval")
    return dataset, disc[1].id


def test_blame_counts_match_a_hand_count_on_a_bank_with_a_wrong_reference(wrong_reference):
    dataset, wrong = wrong_reference
    bank = api.load_memory_bank(dataset, "bank")
    references = normalized(bank.features)
    # By hand: each prediction's nearest reference of its class from the cached features.
    predictions, false_positives = {}, {}
    for sample in dataset:
        for d in sample[PREDICTIONS].detections if sample[PREDICTIONS] else []:
            feature = cached_feature(dataset, sample.id, d.id)
            k = bank.classes.index(d.label)
            members = [j for j in range(len(bank)) if int(bank.labels[j]) == k]
            nearest = max(members, key=lambda j: float(references[j] @ feature))
            ref = bank.ref_ids[nearest].split(":")[1]
            assert d.nearest_reference == ref
            predictions[ref] = predictions.get(ref, 0) + 1
            false_positives[ref] = false_positives.get(ref, 0) + (d.eval == "fp")
    rows = api.memory_bank_info(dataset, "bank")["blame"]
    assert {r["reference"] for r in rows} == {i.split(":")[1] for i in bank.ref_ids}
    for row in rows:
        assert row["predictions"] == predictions.get(row["reference"], 0)
        assert row["false_positives"] == false_positives.get(row["reference"], 0)
        assert (row["field"], row["evaluation"]) == (PREDICTIONS, "eval")
    worst = [(r["false_positives"], r["predictions"]) for r in rows]
    assert worst == sorted(worst, key=lambda fp_n: (-fp_n[0], -fp_n[1]))
    assert wrong in {r["reference"] for r in rows}  # listed, with its hand-checked counts
    busiest = max(predictions, key=predictions.get)
    view = explain_api.reference_view(dataset, PREDICTIONS, busiest)
    assert len(view) == predictions[busiest]
    assert set(view.values(f"{PREDICTIONS}.nearest_reference")) == {busiest}


def test_the_review_queue_puts_the_least_sure_first(wrong_reference):
    dataset, wrong = wrong_reference
    # The operators the App runs: the queue, a reference's predictions, the bank's blame table.
    reviewed = run_operator("review_predictions", dataset, pred_field=PREDICTIONS)
    assert reviewed == {"patches": dataset.count(f"{PREDICTIONS}.detections")}
    shown = run_operator(
        "show_reference_predictions", dataset, bank_name="bank", reference=f"{PREDICTIONS}|{wrong}"
    )
    assert shown == {"patches": len(explain_api.reference_view(dataset, PREDICTIONS, wrong))}
    info = run_operator("get_memory_bank_info", dataset, bank_name="bank")
    assert info["blame"] == api.memory_bank_info(dataset, "bank")["blame"]

    by_margin = explain_api.review_view(dataset, PREDICTIONS, "margin")
    margins = by_margin.values(f"{PREDICTIONS}.margin")
    assert margins == sorted(margins) and len(margins) == dataset.count(f"{PREDICTIONS}.detections")
    # Without negatives, nothing to sort by closeness to one.
    assert len(explain_api.review_view(dataset, PREDICTIONS, "negative")) == 0
    with pytest.raises(api.PluginInputError, match="order must be"):
        explain_api.review_view(dataset, PREDICTIONS, "confidence")


def normalized(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True)


# -- an evaluation with no ground truth says where it is --------------------------------------


def test_evaluating_targets_without_ground_truth_says_it_is_on_the_references(scene_dataset):
    from ntt_core import NTTConfig

    dataset = scene_dataset
    api.sample_references(dataset, "ground_truth", shots=1, seed=33)
    references = dataset.match_labels(tags="reference")
    targets = dataset.exclude(references.values("id"))
    targets.set_values("ground_truth", [None] * len(targets))  # the no-labels flow
    tiny = NTTConfig.tiny(weights="random", device="cpu")
    api.build_memory_bank(dataset, "ground_truth", "bank", config=tiny)
    api.segment(dataset, "bank", PREDICTIONS)
    report = api.class_report(api.evaluate(dataset, PREDICTIONS, "ground_truth", "eval"))
    assert report["mAP"] is None  # not FiftyOne's -1
    assert "samples tagged 'reference'" in report["no_ground_truth"]
    assert "include_unsegmented" in report["no_ground_truth"]
    # The choice offered: the references' objects count as missed, a real (low) mAP.
    results = api.evaluate(dataset, PREDICTIONS, "ground_truth", "eval", include_unsegmented=True)
    report = api.class_report(results)
    assert results.mAP() >= 0 and report["mAP"] >= 0 and "no_ground_truth" not in report
    # What FiftyOne's Model Evaluation panel lists: evaluations with stored results, by type.
    config = dataset.get_evaluation_info("eval").config
    assert (config.type, config.method) == ("detection", "coco")
    assert dataset.load_evaluation_results("eval").confusion_matrix().size > 0


# -- look-alikes and the map from the cached features -----------------------------------------


def test_the_similarity_index_sorts_look_alikes_by_their_cached_features(banked):
    dataset = banked
    out = explain_api.build_similarity_index(dataset, PREDICTIONS)
    assert out["predictions"] == dataset.count(f"{PREDICTIONS}.detections")
    patches = dataset.to_patches(PREDICTIONS)
    ids = patches.values(f"{PREDICTIONS}.id")
    sample_ids = patches.values("sample_id")
    features = {i: cached_feature(dataset, s, i) for i, s in zip(ids, sample_ids)}
    query = ids[0]
    # By hand: the cosine of every prediction's cached feature to the query's.
    by_hand = sorted(ids, key=lambda i: -float(features[i] @ features[query]))
    ranked = patches.sort_by_similarity(query, brain_key=out["brain_key"]).values(
        f"{PREDICTIONS}.id"
    )
    assert ranked[:2] == by_hand[:2]
    # Each stored vector is its prediction's cached feature, bit for bit (read back from the
    # database: a query centres the loaded index's embeddings in place).
    index = dataset.load_brain_results(out["brain_key"], cache=False)
    assert sorted(index.label_ids) == sorted(ids)
    for label_id, vector in zip(index.label_ids, index.embeddings):
        assert np.array_equal(vector, features[label_id].numpy())

    drawn = explain_api.build_embeddings_map(dataset, PREDICTIONS)
    umap = importlib.util.find_spec("umap") is not None
    assert drawn["method"] == ("umap" if umap else "pca")
    assert drawn["predictions"] == out["predictions"]
    assert drawn["brain_key"] in dataset.list_brain_runs()


def run_operator(name: str, dataset, **params):
    import fiftyone.operators as foo

    result = foo.execute_operator(
        f"@ntt/no_time_to_train/{name}", ctx={"view": dataset.view(), "params": params}
    )
    return result.result
