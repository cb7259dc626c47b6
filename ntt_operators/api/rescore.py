"""Re-scoring in place skips the images that a bank change cannot affect.

Each cached entry has, per field, a stamp (``ProposalCache.stamps``): the epoch of the run that
last scored it into the field and the scoring state that run used
(``ntt_core.cache.scoring_state``). A run records its epoch and the states it knows in its run
results. When only negatives were added since an image's stamp, and no proposal of the image
resembles a new negative more than both its class prototype and that class's older negatives,
every class score of the image is unchanged, so is its result, and the image is neither scored
nor written.

Every run starts a new epoch and stamps what it scored only once it completes: a run that
stopped midway, or one that wrote the field without the cache, leaves no stamp to trust.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fiftyone as fo
import torch

from ntt_core import MemoryBank, NTTConfig
from ntt_core.cache import (
    cached_features,
    negatives_added_since,
    proposal_identity,
    scoring_state,
)
from ntt_core.matching import NegativesScreen

from ..proposal_cache import Prefetched, ProposalCache

KEPT_STATES = 16
"""Scoring states a field's run remembers (one per round, newest kept)."""


@dataclass
class Screen:
    """Tells which cached images keep their predictions under the current bank."""

    bank: MemoryBank
    identity: str
    """The proposals' ``proposal_identity``."""
    epoch: str
    """The previous run's: only stamps it wrote are trusted."""
    current: tuple[str, list[str]]
    """``(base, negatives)`` of the current scoring state."""
    states: dict[str, dict[str, Any]]
    screened: int = field(default=0, init=False)
    _since: dict = field(default_factory=dict, init=False)

    def unchanged(self, store: Prefetched, sample_ids: Sequence[str]) -> set[str]:
        """The samples of ``sample_ids`` (all in ``store``'s batch) whose predictions the bank
        change leaves as they are; one screen per recorded state, over all its images at once."""
        by_state: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for sample_id in sample_ids:
            stamp, blob = store.stamps.get(sample_id), store.blobs.get(sample_id)
            checksum = store.checksums.get(sample_id)
            if not stamp or blob is None or checksum is None or stamp.get("epoch") != self.epoch:
                continue
            if self._added(stamp.get("state")) is None:
                continue
            features = cached_features(blob, checksum, self.identity)
            if features is not None:  # else a stale entry: the image is proposed again
                by_state.setdefault(stamp["state"], []).append((sample_id, features))
        kept = set()
        for state, entries in by_state.items():
            verdicts = self._added(state).unchanged([features for _, features in entries])
            kept.update(sample_id for (sample_id, _), same in zip(entries, verdicts) if same)
        self.screened += len(kept)
        return kept

    def _added(self, state: str | None) -> NegativesScreen | None:
        """The test for the negatives added since ``state`` (None: the bank changed otherwise)."""
        if state not in self._since:
            recorded = self.states.get(state)
            added = recorded and negatives_added_since(
                self.current, (recorded["base"], recorded["negatives"])
            )
            bank = self.bank
            self._since[state] = added is not None and NegativesScreen.of(
                bank.prototypes, bank.negatives, bank.negative_labels, added
            )
        return self._since[state] or None


@dataclass
class Stamping:
    """A run's stamp (epoch and scoring state) and the states it knows, and the screen from
    the previous run (if usable)."""

    stamp: dict[str, str]
    states: dict[str, dict[str, Any]]
    screen: Screen | None
    label_field: str

    @property
    def screened(self) -> int:
        return self.screen.screened if self.screen else 0

    def record(self) -> dict[str, Any]:
        """What the run's results keep for the next run's screen."""
        return {"epoch": self.stamp["epoch"], "scoring_states": self.states}

    def stamp_scored(self, cache: ProposalCache, sample_ids: list[str]) -> None:
        """Stamps the entries of the samples this run scored (once it has completed)."""
        cache.stamp(sample_ids, self.label_field, self.stamp)


def plan_stamping(
    dataset: fo.Dataset,
    run_key: str,
    bank: MemoryBank,
    config: NTTConfig,
    screen: bool,
    label_field: str,
) -> Stamping:
    """This run's stamp and states; ``screen``: skip images using the previous run's stamps,
    which only a completed previous run of the field can provide."""
    previous = _previous_results(dataset, run_key)
    states = dict(previous.get("scoring_states") or {})
    state, base, negatives = scoring_state(bank, config)
    states.pop(state, None)
    states[state] = {"base": base, "negatives": negatives}
    states = dict(list(states.items())[-KEPT_STATES:])
    usable = screen and previous.get("status") == "completed" and previous.get("epoch")
    return Stamping(
        stamp={"epoch": uuid.uuid4().hex, "state": state},
        states=states,
        screen=(
            Screen(bank, proposal_identity(config), previous["epoch"], (base, negatives), states)
            if usable
            else None
        ),
        label_field=label_field,
    )


def _previous_results(dataset: fo.Dataset, run_key: str) -> dict[str, Any]:
    if run_key not in dataset.list_runs():
        return {}
    results = dataset.load_run_results(run_key, cache=False, load_view=False)
    return {k: getattr(results, k, None) for k in ("status", "epoch", "scoring_states")}
