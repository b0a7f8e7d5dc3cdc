"""The stitch menu: typed rows of a manifest's stitch table, their preference order and front.

Every place that ranks stitches or checks a stitch id uses this module, so "most accurate" and
"valid id" mean the same thing in the CLI, the server's planner and ``GET /stitches``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .profile import pareto_front


class UnknownStitch(ValueError):
    """A stitch id outside the menu; the message names the valid range."""


@dataclass(frozen=True)
class StitchRow:
    """One row of the manifest's stitch table."""

    id: int
    description: str
    anchors: tuple[str, ...]
    gflops: float  # multiply-add GFLOPs per image
    params_m: float
    accuracy: float | None  # held-out top-1, percent; None before evaluation

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> StitchRow:
        return cls(
            id=int(row["id"]),
            description=str(row["description"]),
            anchors=tuple(row["anchors"]),
            gflops=float(row["gflops"]),
            params_m=float(row["params_m"]),
            accuracy=None if row.get("accuracy") is None else float(row["accuracy"]),
        )


@dataclass(frozen=True)
class StitchMenu:
    """The rows in id order, each stitch's score, the ids best first, and the Pareto front.

    The score is the held-out accuracy where the checkpoint has one; a checkpoint without any
    accuracy ranks by GFLOPs instead (more compute stands in for more accuracy), and a stitch
    without one in a checkpoint that has others ranks last.
    """

    rows: tuple[StitchRow, ...]
    scores: Mapping[int, float]
    ranking: tuple[int, ...]  # most preferred first; ties: the cheaper first
    pareto: frozenset[int]  # on the (GFLOPs, score) front
    has_accuracy: bool

    @classmethod
    def of(cls, rows: Iterable[Mapping[str, Any] | StitchRow]) -> StitchMenu:
        typed = tuple(r if isinstance(r, StitchRow) else StitchRow.from_dict(r) for r in rows)
        if [r.id for r in typed] != list(range(len(typed))):
            raise ValueError("stitch rows must have ids 0..n-1 in order")
        has_accuracy = any(r.accuracy is not None for r in typed)
        scores = {
            r.id: (
                (r.accuracy if r.accuracy is not None else float("-inf"))
                if has_accuracy
                else r.gflops
            )
            for r in typed
        }
        ranking = tuple(sorted(scores, key=lambda i: (-scores[i], typed[i].gflops)))
        front = pareto_front([r.gflops for r in typed], [scores[r.id] for r in typed])
        return cls(typed, scores, ranking, frozenset(front), has_accuracy)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, stitch_id: int) -> StitchRow:
        """The row of ``stitch_id``.

        Raises:
            UnknownStitch: the id is not in the menu.
        """
        if not 0 <= stitch_id < len(self.rows):
            raise UnknownStitch(
                f"unknown stitch_id {stitch_id}; valid ids are 0..{len(self.rows) - 1}"
            )
        return self.rows[stitch_id]
