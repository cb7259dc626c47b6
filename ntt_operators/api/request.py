"""One segmentation run as one object: the panel, the Segment operator and the CLI build a
``SegmentRequest`` instead of passing ``segment()``'s keyword arguments one by one.

What a run does to an existing field is one ``SegmentMode``, so "replace", "continue" and
"re-score in place" exclude one another by construction; the request translates itself into
``segment()``'s flags, whose checks stay where they are.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from ntt_core import NTTConfig

from .common import Collection, PluginInputError, Progress, Steps, drive_steps
from .segment import iter_segment


class SegmentMode(enum.Enum):
    """What the run does with the output field."""

    NEW = "new"
    """Write a new field (refused if it exists)."""
    REPLACE = "replace"
    """Delete the field, then write it afresh."""
    CONTINUE = "continue"
    """Segment only the targets the field does not hold yet (an interrupted run)."""
    RESCORE = "rescore"
    """Update the plugin's field in place: predictions keep their ids and tags."""

    @classmethod
    def from_flags(
        cls, overwrite: bool = False, skip_done: bool = False, rescore: bool = False
    ) -> SegmentMode:
        """The mode that ``segment()``'s flags name (forms and the CLI have one tick each);
        refuses more than one."""
        named = [cls.REPLACE] * overwrite + [cls.CONTINUE] * skip_done + [cls.RESCORE] * rescore
        if len(named) > 1:
            raise PluginInputError(
                "overwrite=True starts the field afresh, skip_done=True continues it and "
                "rescore=True updates it in place: choose one"
            )
        return named[0] if named else cls.NEW


@dataclass(frozen=True)
class RayOptions:
    """Where the Ray backend runs (``segment()``'s ``ray_address``, ``num_actors``, ...)."""

    address: str | None = None
    num_actors: int = 2
    gpus_per_actor: float | None = None


@dataclass(frozen=True)
class SegmentRequest:
    """A segmentation run: targets, bank, output field, mode, cache and backend."""

    target: Collection
    bank_name: str
    label_field: str
    mode: SegmentMode = SegmentMode.NEW
    reuse_proposals: bool = False
    """Keep each sample's proposals in the dataset and re-score them next time."""
    backend: Literal["local", "ray"] = "local"
    ray: RayOptions = field(default_factory=RayOptions)
    exclude_tag: str | None = "reference"
    config: NTTConfig | None = None
    batch_size: int = 16

    def segment_kwargs(self) -> dict[str, Any]:
        """``segment()``'s keyword arguments for this request."""
        return {
            "exclude_tag": self.exclude_tag,
            "overwrite": self.mode is SegmentMode.REPLACE,
            "skip_done": self.mode is SegmentMode.CONTINUE,
            "rescore": self.mode is SegmentMode.RESCORE,
            "config": self.config,
            "batch_size": self.batch_size,
            "backend": self.backend,
            "ray_address": self.ray.address,
            "num_actors": self.ray.num_actors,
            "gpus_per_actor": self.ray.gpus_per_actor,
            "reuse_proposals": self.reuse_proposals,
        }

    def steps(self) -> Steps:
        """The run as progress steps (``iter_segment``); returns its summary."""
        return iter_segment(self.target, self.bank_name, self.label_field, **self.segment_kwargs())

    def run(self, progress: Progress | None = None) -> dict[str, Any]:
        """Runs the request; returns ``segment()``'s summary."""
        return drive_steps(self.steps(), progress)
