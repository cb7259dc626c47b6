"""Re-scoring in place skips the images that a bank change cannot affect.

Each cached entry has, per field, a stamp (``ProposalCache.stamps``): the epoch of the run that
last scored it into the field and the scoring state that run used
(``ntt_core.cache.scoring_state``). A run records its epoch and the states it knows in its run
results. When only negatives were added since an image's stamp, and no proposal of the image
resembles a new negative more than both its class prototype and that class's older negatives,
or the ones that do had a better class than the negative's, every proposal keeps its best class
and score, so the image keeps its result, and it is neither scored nor written
(``NegativesScreen``). The screen reads the entries' float16 feature rows, not the entries.

Every run starts a new epoch and stamps what it scored only once it completes: a run that
stopped midway, or one that wrote the field without the cache, leaves no stamp to trust.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import fiftyone as fo
import numpy as np
import torch

from ntt_core import MemoryBank, NTTConfig
from ntt_core.cache import negatives_added_since, proposal_identity, scoring_state
from ntt_core.matching import NegativesScreen

from ..proposal_cache import ProposalCache
from .records import has_run, load_results

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
    sigma: float
    """The scoring's ``negative_sigma``."""
    screened: int = field(default=0, init=False)
    _since: dict = field(default_factory=dict, init=False)
    _counting: threading.Lock = field(default_factory=threading.Lock, init=False)
    """The screen runs in several reading threads at once."""

    def unchanged(
        self,
        cache: ProposalCache,
        sample_ids: Sequence[str],
        stamps: dict[str, dict],
        checksums: dict[str, str | None],
    ) -> set[str]:
        """The samples of ``sample_ids`` whose predictions the bank change leaves as they are,
        given their ``stamps`` and their image files' ``checksums``; one screen per recorded
        state, over all its images at once, on the entries' float16 feature rows."""
        candidates = []
        for sample_id in sample_ids:
            stamp = stamps.get(sample_id)
            if not stamp or checksums.get(sample_id) is None or stamp.get("epoch") != self.epoch:
                continue
            if self._added(stamp.get("state")) is not None:
                candidates.append(sample_id)
        # A stale or missing entry has no valid rows: its image is proposed again.
        found, rows, counts = cache.screening_features(candidates, checksums)
        starts = np.cumsum([0, *counts])
        by_state: dict[str, list[int]] = {}
        for position, sample_id in enumerate(found):
            by_state.setdefault(stamps[sample_id]["state"], []).append(position)
        kept = set()
        for state, positions in by_state.items():
            if len(positions) == len(found):  # one state (the usual case): no copy
                features, sizes = rows, counts
            else:
                features = torch.cat([rows[starts[p] : starts[p + 1]] for p in positions])
                sizes = [counts[p] for p in positions]
            verdicts = self._added(state).unchanged(features, sizes)
            kept.update(found[p] for p, same in zip(positions, verdicts) if same)
        with self._counting:
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
                bank.prototypes, bank.negatives, bank.negative_labels, added, self.sigma
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
            Screen(
                bank,
                proposal_identity(config),
                previous["epoch"],
                (base, negatives),
                states,
                config.negative_sigma,
            )
            if usable
            else None
        ),
        label_field=label_field,
    )


def _previous_results(dataset: fo.Dataset, run_key: str) -> dict[str, Any]:
    if not has_run(dataset, run_key):
        return {}
    results = load_results(dataset, run_key)
    return {k: getattr(results, k, None) for k in ("status", "epoch", "scoring_states")}
