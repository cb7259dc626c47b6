"""The ``ntt`` command line on generated COCO roots: the benchmark end to end and the steps.

Models are tiny and untrained (``--tiny --weights random``): these tests check the plumbing
(sampling, import, tags, bank, segmentation, both evaluations, printed layout), not accuracy.
"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import fiftyone as fo
import numpy as np
import pytest
from fiftyone import ViewField as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from ntt_core import NTTPredictor
from ntt_core.coco import evaluate_coco
from ntt_core.fewshot import FEW_SHOT_CLASSES, class_ids_by_name, sample_references
from ntt_core.synthetic import write_coco_dataset, write_coco_root
from ntt_operators import cli
from ntt_operators.coco_download import ensure_annotations, ensure_images
from ntt_operators.coco_protocol import coco_results

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# The 20 split classes plus two outside it, so the split filter has something to drop.
CLASSES = list(FEW_SHOT_CLASSES) + ["kite", "truck"]
SHOTS, SEED = 2, 33
RUN = f"few_shot_classes_{SHOTS}shot_seed{SEED}"
FAST = ["--tiny", "--weights", "random", "--points-per-side", "4", "--device", "cpu"]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def reproduce_args(root: Path, dataset: str, *extra: str, download: bool = False) -> list[str]:
    return [
        "reproduce",
        "--coco-root",
        str(root),
        "--shots",
        str(SHOTS),
        "--seed",
        str(SEED),
        "--split",
        "few_shot_classes",
        "--max-samples",
        "2",
        "--dataset-name",
        dataset,
        *([] if download else ["--no-download"]),
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    # 70 train images (data seed 5) give each class 2 usable references for seed 33.
    root = write_coco_root(tmp_path_factory.mktemp("coco"), CLASSES, 70, 6, seed=5)
    # Like some real COCO boxes, start each train box 0.6 px inside its polygon's first column:
    # FiftyOne crops the mask to the rounded box and loses that column; annToMask keeps it.
    path = root / "annotations/instances_train2017.json"
    train = json.loads(path.read_text())
    for ann in train["annotations"]:
        x, y, w, h = ann["bbox"]
        ann["bbox"] = [x + 0.6, y, w - 0.6, h]
    path.write_text(json.dumps(train))
    return root


@pytest.fixture(scope="module")
def encoded_references():
    """Every Reference that reaches NTTPredictor.encode while the module's fixtures run."""
    seen = []
    encode = NTTPredictor.encode

    def recording(self, references):
        seen.extend(references)
        return encode(self, references)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(NTTPredictor, "encode", recording)
        yield seen


@pytest.fixture(scope="module")
def reproduced(coco_root, encoded_references):
    code, out, err = run_cli(*reproduce_args(coco_root, "cli-coco"))
    assert code == 0, err
    return out, err


def test_reproduce_prints_the_papers_table_and_fiftyones_map(reproduced):
    out, err = reproduced
    # Progress goes to stderr (plain lines: it is not a terminal), the summary to stdout.
    assert re.search(r"\] Segmented 2/2 samples \(100%, [\d.]+ samples/s\)\n", err), err
    summary = rf"\nSegmented 2 samples into 'ntt_{RUN}' in [\d.]+s \([\d.]+ samples/s\): "
    assert re.search(summary, out), out
    for block in ("BBOX RESULTS:", "SEGM RESULTS:"):
        lines = out.split(block + "\n", 1)[1].splitlines()[:13]
        assert all(line.startswith(" Average ") for line in lines[:12]), lines
        assert not lines[12].startswith(" Average ")
    assert "FiftyOne mAP (segm, masks" in out
    assert out.count("the numbers below MEAN NOTHING") == 2  # before and after the table


def test_reproduce_tags_exactly_the_papers_references(reproduced, coco_root):
    train = json.loads((coco_root / "annotations/instances_train2017.json").read_text())
    ids = class_ids_by_name(train["categories"], list(FEW_SHOT_CLASSES))
    picks = sample_references(train["annotations"], train["images"], ids, SHOTS, SEED)
    expected = {a for refs in picks.values() for r in refs for a in r["ann_ids"]}

    dataset = fo.load_dataset("cli-coco")
    tagged = dataset.select_labels(tags=f"ref_{RUN}", fields="ground_truth")
    assert set(tagged.values("ground_truth.detections.coco_id", unwind=True)) == expected
    assert len(dataset.match_tags("val2017")) == 2


def test_reproduce_encodes_the_annotations_own_masks_and_boxes(
    reproduced, encoded_references, coco_root
):
    train = COCO(str(coco_root / "annotations/instances_train2017.json"))
    dataset = fo.load_dataset("cli-coco")
    label_ids, ann_ids = dataset.values(
        ["ground_truth.detections.id", "ground_truth.detections.coco_id"], unwind=True
    )
    ann_of = dict(zip(label_ids, ann_ids))
    assert len(encoded_references) == SHOTS * len(FEW_SHOT_CLASSES)
    for reference in encoded_references:
        ann = train.anns[ann_of[reference.ref_id.split(":")[1]]]
        np.testing.assert_array_equal(reference.mask, train.annToMask(ann).astype(bool))
        np.testing.assert_allclose(reference.box_xywh, ann["bbox"], rtol=0, atol=1e-9)


def test_reproduce_predicts_only_the_splits_classes(reproduced):
    dataset = fo.load_dataset("cli-coco")
    predicted = set(dataset.distinct(f"ntt_{RUN}.detections.label"))
    assert predicted <= set(FEW_SHOT_CLASSES)
    code, out, _ = run_cli("banks", "info", "--dataset", "cli-coco", "--bank", f"coco_{RUN}")
    assert code == 0 and "num_references: 40" in out


def test_ground_truth_as_predictions_scores_one(reproduced, coco_root, tmp_path):
    # The results plumbing (sample -> image id, class -> category id, full-size RLE, px boxes)
    # is right exactly when the ground truth, fed back as predictions, scores AP 1.
    view = fo.load_dataset("cli-coco").match_tags("val2017")
    oracle = view.filter_labels("ground_truth", F("label").is_in(FEW_SHOT_CLASSES))
    oracle.set_field("ground_truth.detections.confidence", 1.0).save()
    oracle.clone_sample_field("ground_truth", "oracle")
    val = json.loads((coco_root / "annotations/instances_val2017.json").read_text())
    results = coco_results(view, "oracle", val, list(FEW_SHOT_CLASSES))
    image_ids = set(view.values("coco_id"))
    gt = {
        "images": [i for i in val["images"] if i["id"] in image_ids],
        "annotations": [a for a in val["annotations"] if a["image_id"] in image_ids],
        "categories": val["categories"],
    }
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    category_ids = class_ids_by_name(val["categories"], list(FEW_SHOT_CLASSES))
    stats = evaluate_coco(tmp_path / "gt.json", results, category_ids)
    assert stats["segm"]["AP"] == pytest.approx(1.0)
    # Result boxes follow the paper (width = last column - first), one pixel inside the
    # ground truth's, so only the strictest IoU thresholds can miss.
    assert stats["bbox"]["AP50"] == pytest.approx(1.0) and stats["bbox"]["AP"] > 0.8
    for result in results:
        x, y, w, h = mask_utils.toBbox(result["segmentation"])
        assert result["bbox"] == [x, y, w - 1, h - 1]


def test_console_script_resumes_on_the_same_dataset(reproduced, coco_root):
    script = Path(sys.executable).parent / "ntt"
    args = reproduce_args(coco_root, "cli-coco", "--resume")
    done = subprocess.run(
        [str(script), *args], env=os.environ, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Reusing FiftyOne dataset 'cli-coco'" in done.stderr
    assert "Reusing memory bank" in done.stderr
    assert "Skipped 2 samples already done." in done.stdout
    # Nothing was re-segmented, so the table is the first run's.
    table = reproduced[0].split("BBOX RESULTS:", 1)[1].split("FiftyOne mAP", 1)[0]
    assert table in done.stdout


def test_other_data_under_the_same_dataset_name_is_refused(reproduced, tmp_path):
    root = write_coco_root(tmp_path, CLASSES, 70, 6, seed=5)
    code, _, err = run_cli(*reproduce_args(root, "cli-coco"))
    assert code == 2
    assert "holds other COCO data" in err and "Traceback" not in err


def test_too_few_usable_references_is_one_clear_error(tmp_path):
    root = write_coco_root(tmp_path, CLASSES, 50, 2, seed=5)
    code, out, err = run_cli(*reproduce_args(root, "cli-too-few"))
    assert code == 2 and not out
    last = err.strip().splitlines()[-1]
    assert last.startswith("ntt: error: class '")  # named, not a COCO category id
    assert last.split("'")[1] in CLASSES
    assert "usable reference instances" in err and "2 shots were asked" in err


def test_missing_coco_root_offline_names_the_file_and_url(tmp_path):
    root = tmp_path / "coco"
    code, _, err = run_cli(*reproduce_args(root, "cli-offline"))
    assert code == 2
    assert "annotations_trainval2017.zip" in err and "--no-download" in err
    # A failed download (an unreachable mirror) says the same, with the reason.
    mirror = ["--coco-url", "http://127.0.0.1:9"]
    code, _, err = run_cli(*reproduce_args(root, "cli-offline", *mirror, download=True))
    assert code == 2
    assert "http://127.0.0.1:9/annotations/annotations_trainval2017.zip" in err
    assert "download failed" in err and "Traceback" not in err


def test_missing_checkpoint_offline_names_file_url_and_flag(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr("ntt_core.registry.urlopen", offline)
    code, _, err = run_cli("reproduce", "--coco-root", tmp_path, "--weights", "official")
    assert code == 2
    assert "sam2_hiera_large.pt" in err and "https://dl.fbaipublicfiles.com/" in err
    assert "--sam-model" in err and len(err.strip().splitlines()) == 1


def test_downloads_from_a_mirror_are_complete_files(tmp_path):
    mirror, root = tmp_path / "mirror", tmp_path / "coco"
    (mirror / "annotations").mkdir(parents=True)
    with zipfile.ZipFile(mirror / "annotations/annotations_trainval2017.zip", "w") as z:
        for split in ("train2017", "val2017"):
            z.writestr(f"annotations/instances_{split}.json", "{}")
    (mirror / "val2017").mkdir()
    (mirror / "val2017/000000000001.jpg").write_bytes(b"jpeg")

    ensure_annotations(root, True, mirror.as_uri())
    ensure_images(root, "val2017", ["000000000001.jpg"], True, mirror.as_uri())
    assert (root / "annotations/instances_val2017.json").read_text() == "{}"
    assert (root / "val2017/000000000001.jpg").read_bytes() == b"jpeg"
    assert not list(root.rglob("*.part")) and not list(root.glob("*.zip"))


def test_the_four_steps_on_an_existing_dataset(tmp_path):
    labels = write_coco_dataset(tmp_path, 4, ["disc", "square"], seed=3, split="val2017")
    dataset = fo.Dataset.from_dir(
        dataset_type=fo.types.COCODetectionDataset,
        data_path=str(tmp_path / "val2017"),
        labels_path=str(labels),
        label_types="segmentations",
        label_field="gt",
        name="cli-steps",
    )
    steps = [
        ("sample", "--dataset", "cli-steps", "--gt-field", "gt", "--shots", "1"),
        ("build-bank", "--dataset", "cli-steps", "--gt-field", "gt", "--bank", "b", *FAST),
        ("segment", "--dataset", "cli-steps", "--bank", "b", "--label-field", "ntt"),
        (
            "evaluate",
            "--dataset",
            "cli-steps",
            "--pred-field",
            "ntt",
            "--gt-field",
            "gt",
            "--eval-key",
            "ev",
        ),
        ("banks", "list", "--dataset", "cli-steps"),
    ]
    outputs = []
    for step in steps:
        code, out, err = run_cli(*step)
        assert code == 0, (step, err)
        outputs.append(out)
    assert "tagged 2 instances 'reference'" in outputs[0]
    assert outputs[2].startswith("Segmented ") and " samples into 'ntt' in " in outputs[2]
    assert dataset.match_tags("reference", bool=False).exists("ntt").count() > 0
    assert outputs[3].startswith("mAP: ") and outputs[4].strip() == "b"

    # Writing into the same field again is refused with one line, not a traceback.
    code, _, err = run_cli(*steps[2])
    assert code == 2 and "already exists" in err and "Traceback" not in err


def test_main_job_offline_stops_at_the_first_missing_file(tmp_path):
    root = tmp_path / "no-coco"
    done = subprocess.run(
        ["bash", "scripts/main_job.sh", "--no-download", "--weights", "random"],
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "COCO_ROOT": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ntt: error: COCO file") and "annotations_trainval2017.zip" in last
    assert "Traceback" not in done.stderr


def test_backend_flags_reach_api_segment(monkeypatch):
    """``segment`` and ``reproduce`` pass --backend and the Ray settings through unchanged."""
    from ntt_core import NTTConfig
    from ntt_operators import api, coco_protocol

    calls = []
    monkeypatch.setattr(api, "memory_bank_config", lambda *_: {"ntt_config": {}})
    summary = {"label_field": "ntt", "processed": 0, "skipped": 0, "failed": {}, "instances": 0}
    monkeypatch.setattr(api, "segment", lambda *a, **kw: calls.append(kw) or summary)
    fo.Dataset("cli-backend")
    ray = ["--backend", "ray", "--ray-address", "auto", "--num-actors", "3"]
    code, out, err = run_cli("segment", "--dataset", "cli-backend", "--bank", "b", *ray)
    assert code == 0, err
    code, _, err = run_cli(
        "segment", "--dataset", "cli-backend", "--bank", "b", "--gpus-per-actor", "0.5"
    )
    assert code == 0, err
    wanted = [
        {"backend": "ray", "ray_address": "auto", "num_actors": 3, "gpus_per_actor": None},
        {"backend": "local", "ray_address": None, "num_actors": 2, "gpus_per_actor": 0.5},
    ]
    assert [{k: kw[k] for k in wanted[0]} for kw in calls] == wanted

    class Stop(Exception):
        pass

    def capture(settings, log, progress):
        calls.append(settings)
        raise Stop

    monkeypatch.setattr(coco_protocol, "reproduce", capture)
    with pytest.raises(Stop):
        run_cli(*reproduce_args(Path("unused"), "unused", *ray, "--gpus-per-actor", "1"))
    settings = calls.pop()
    assert (settings.backend, settings.ray_address) == ("ray", "auto")
    assert (settings.num_actors, settings.gpus_per_actor) == (3, 1.0)
    coco_protocol._segment(
        fo.Dataset().view(), settings, dict.fromkeys(("bank", "label_field", "ref_tag"), "x"), print
    )
    assert {k: calls[-1][k] for k in wanted[0]} == {
        "backend": "ray",
        "ray_address": "auto",
        "num_actors": 3,
        "gpus_per_actor": 1.0,
    }
    assert isinstance(settings.config, NTTConfig)
