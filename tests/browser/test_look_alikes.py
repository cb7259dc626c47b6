"""Look-alikes in the real App: *Index look-alikes*, then the grid's own similarity search.

One false positive gets a planted look-alike: the cached feature of a prediction in another image
is set to the false positive's, nudged. *Index look-alikes* (one form) builds the index from the
cache and shows the prediction patches; the false positive's patch is ticked, *Sort by image
similarity* then *Show similar samples* runs FiftyOne's similarity search (FiftyOne 1.22.1 saves
it as a run of its Similarity Search panel), and the run's *Show results* puts the results in the
grid. The patches the grid then loads (the App's own paginated query, in grid order) must be the
false positive, then the planted look-alike, which the unsorted grid shows last.

With ``NTT_BROWSER_ARTIFACTS`` set, the sorted grid and FiftyOne's Embeddings panel showing the
map are photographed there (the README's ``docs/images/app-look-alikes*.png``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import time

import fiftyone as fo
import numpy as np
import pytest
import torch

from ntt_core import NTTConfig
from ntt_core.cache import (
    file_checksum,
    proposal_identity,
    proposals_from_bytes,
    proposals_to_bytes,
)
from ntt_operators import api
from ntt_operators.labels import prediction_ids
from ntt_operators.proposal_cache import ProposalCache

from ..conftest import add_scenes
from .conftest import RUN_TIMEOUT_MS, persistent_dataset

DATASET = "ntt-browser-look-alikes"
PREDICTIONS = "ntt_predictions"
TINY = NTTConfig.tiny(weights="random", device="cpu")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning"),
    pytest.mark.browser,
]


@pytest.fixture(scope="module")
def dataset(scene_files):
    """The scenes segmented with proposals cached, the predictions evaluated."""
    dataset = persistent_dataset(DATASET)
    add_scenes(dataset, scene_files)
    api.sample_references(dataset, "ground_truth", shots=1, seed=33)
    api.build_memory_bank(dataset, "ground_truth", "bank", config=TINY)
    api.segment(dataset, "bank", PREDICTIONS, reuse_proposals=True)
    api.evaluate(dataset, PREDICTIONS, "ground_truth", "eval")
    yield dataset
    dataset.delete()


def query_and_look_alike(dataset: fo.Dataset) -> tuple[str, str]:
    """The first false positive of the patches grid, and the last patch of another image: the
    one the unsorted grid shows furthest from it."""
    patches = dataset.to_patches(PREDICTIONS)
    ids, sample_ids, outcomes = patches.values(
        [f"{PREDICTIONS}.id", "sample_id", f"{PREDICTIONS}.eval"]
    )
    query = next((k for k, outcome in enumerate(outcomes) if outcome == "fp"), None)
    if query is None:
        pytest.fail(f"no false positive among the predictions: {outcomes}")
    others = [k for k in range(query + 2, len(ids)) if sample_ids[k] != sample_ids[query]]
    if not others:
        pytest.fail(f"no prediction two tiles after the query in another image: {sample_ids}")
    return ids[query], ids[others[-1]]


def plant_look_alike(dataset: fo.Dataset, query: str, planted: str) -> None:
    """Sets the cached feature of ``planted``'s proposal to ``query``'s, nudged (not equal: the
    query itself must stay the nearest)."""
    proposals, index, _ = cached_proposals(dataset, query)
    query_feature = proposals.features[index]
    noise = torch.from_numpy(np.random.default_rng(5).standard_normal(len(query_feature)))
    nudged = query_feature + 0.01 * (noise / noise.norm()).float()  # the features are unit
    nudged = nudged / nudged.norm()
    proposals, index, sample = cached_proposals(dataset, planted)
    features = proposals.features.clone()
    features[index] = nudged
    blob = proposals_to_bytes(
        dataclasses.replace(proposals, features=features),
        file_checksum(sample.filepath),
        proposal_identity(TINY),
    )
    ProposalCache(dataset, TINY).set(sample.id, blob)
    # By hand, the planted feature is now the query's nearest.
    assert float(nudged @ query_feature) > 0.999


def cached_proposals(dataset: fo.Dataset, label_id: str):
    """The cached proposals of the prediction's image, the index of its proposal, the sample."""
    (sample,) = dataset.select_labels(ids=[label_id], fields=PREDICTIONS)
    blob = ProposalCache(dataset, TINY).get(sample.id)
    proposals = proposals_from_bytes(blob, file_checksum(sample.filepath), proposal_identity(TINY))
    ids = [str(i) for i in prediction_ids(f"{PREDICTIONS}:{sample.id}", proposals.rles)]
    return proposals, ids.index(label_id), sample


class GridPages:
    """The patches the grid loads (the App's ``paginateSamplesQuery``), with the view each was
    asked for, and the similarity searches run (their query ids), as the page receives them."""

    def __init__(self, page) -> None:
        self.pages: list[tuple[list, list[str]]] = []
        self.searches: list[list[str]] = []
        page.on("response", self._seen)

    def _seen(self, response) -> None:
        request = response.request
        if request.method != "POST" or not request.post_data:
            return
        try:
            sent = json.loads(request.post_data)
        except ValueError:
            return
        if sent.get("operator_uri") == "@voxel51/panels/similarity_search":
            self.searches.append(sent["params"]["query"])
        elif "paginateSamplesQuery" in sent.get("query", ""):
            edges = response.json()["data"]["samples"]["edges"]
            self.pages.append((sent["variables"]["view"], [e["node"]["id"] for e in edges]))

    def sorted_ids(self, timeout_s: float) -> list[str] | None:
        """The ids of the first page of the grid whose view selects results in order (None:
        none within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for view, ids in self.pages:
                if any(stage["_cls"] == "fiftyone.core.stages.Select" for stage in view):
                    return ids
            time.sleep(0.5)
        return None


def show_results(page, grid: GridPages, tries: int = 3) -> list[str]:
    """Clicks the search run's *Show results* (again, as a user would, when a click right after
    the run completed went unanswered); returns the grid's first page of results."""
    button = page.locator("[aria-label='Show results']").first
    for _ in range(tries):
        page.wait_for_timeout(2000)
        # The run's card sits in a drag-and-drop wrapper marked aria-disabled (it cannot be
        # dragged), which Playwright takes for a disabled button: no actionability checks.
        button.hover(force=True)
        page.wait_for_timeout(1000)
        button.click(force=True)
        ranked = grid.sorted_ids(20)
        if ranked is not None:
            return ranked
    pytest.fail(f"the grid never loaded the search's results: {grid.pages}")


def test_the_grid_sorts_a_false_positives_look_alike_next_to_it(curator, dataset):
    query, planted = query_and_look_alike(dataset)
    plant_look_alike(dataset, query, planted)
    page = curator.page
    grid = GridPages(page)
    curator.open_dataset(DATASET)

    # The index, from the cache, in one form; the grid then shows the prediction patches.
    count = dataset.count(f"{PREDICTIONS}.detections")
    curator.open_operator("Index look-alikes")
    curator.execute()
    curator.expect_text("Look-alikes indexed", timeout=RUN_TIMEOUT_MS)
    assert f"{count} predictions" in curator.dialog_text()
    curator.close_dialogs()
    page.get_by_text(f"{count} patches").wait_for()
    page.wait_for_timeout(2000)  # the tiles settle
    patches = dataset.to_patches(PREDICTIONS).values(f"{PREDICTIONS}.id")
    assert grid.pages and grid.pages[-1][1] == patches  # the unsorted grid: planted last
    tick(page, patches.index(query))

    # FiftyOne's own similarity search on the selection, then its results in the grid.
    page.locator("[data-cy=action-sort-by-similarity]").first.click()
    page.get_by_text(re.compile("^Show similar (samples|patches)$")).first.click()
    page.get_by_text("Completed", exact=True).first.wait_for()
    ranked = show_results(page, grid)
    assert grid.searches == [[query]]
    assert ranked[:2] == [query, planted], ranked
    page.wait_for_timeout(2000)
    photograph(page, "app-look-alikes.png")

    # The map, in FiftyOne's Embeddings panel.
    page.mouse.move(640, 880)  # no tooltip over the "+" of the panels
    page.locator("[data-cy=new-panel-btn]").first.click()
    page.get_by_text("Embeddings", exact=True).first.click()
    card = page.get_by_text(f"ntt_map_{PREDICTIONS}", exact=True).first
    card.wait_for()
    page.get_by_text(re.compile(r"pre-computed embeddings \((PCA|UMAP)\)")).first.wait_for()
    dismiss = page.get_by_text("Dismiss", exact=True)  # the "3D in Enterprise" pop-up
    if dismiss.count():
        dismiss.first.click()
    card.click()
    page.get_by_text(f"{count} points").first.wait_for()  # every prediction is on the map
    page.wait_for_timeout(3000)  # the plot draws
    photograph(page, "app-look-alikes-map.png")


def tick(page, index: int) -> None:
    """Ticks the tile's checkbox (it shows once the pointer is over the tile)."""
    box = page.locator("[data-cy=looker]").nth(index).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_timeout(500)
    page.mouse.click(box["x"] + 19, box["y"] + 19)
    page.wait_for_timeout(1000)


def photograph(page, name: str) -> None:
    folder = os.environ.get("NTT_BROWSER_ARTIFACTS")
    if folder:
        pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
        page.mouse.move(4, 896)  # no hover overlay on a tile
        page.wait_for_timeout(500)
        page.screenshot(path=str(pathlib.Path(folder) / name))
