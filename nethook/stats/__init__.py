"""Streaming statistics: small mergeable accumulators with one protocol.

See ``docs/stats.md``. Every stat has ``update``, ``merge``, ``state_dict``,
``load_state_dict`` and ``to``; :func:`from_state_dict` rebuilds any of them.
"""

from nethook.stats.base import Stat, check_batch, flatten, from_state_dict

__all__ = ["Stat", "check_batch", "flatten", "from_state_dict"]
