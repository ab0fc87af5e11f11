"""Rewriting a learned rule: rank-one and low-rank weight edits (thesis ch. 6).

See ``docs/rewriting.md``. The closed forms are in :mod:`nethook.rewrite.linalg`,
the layer views in :mod:`nethook.rewrite.memory`, reversible edits in
:mod:`nethook.rewrite.edit`, and :func:`insert` composes them.
"""

from nethook.rewrite.edit import Edit
from nethook.rewrite.insert import insert
from nethook.rewrite.linalg import (
    NotPositiveDefiniteError,
    constrained_update,
    context_directions,
    least_squares_update,
    rank_one_update,
    update_direction,
)
from nethook.rewrite.memory import LinearMemory

__all__ = [
    "Edit",
    "LinearMemory",
    "NotPositiveDefiniteError",
    "constrained_update",
    "context_directions",
    "insert",
    "least_squares_update",
    "rank_one_update",
    "update_direction",
]
