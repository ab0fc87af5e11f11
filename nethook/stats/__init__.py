"""Streaming statistics: small mergeable accumulators with one protocol.

See ``docs/stats.md``. Every stat has ``update``, ``merge``, ``state_dict``,
``load_state_dict`` and ``to``; :func:`from_state_dict` rebuilds any of them.
"""

from nethook.stats.base import Stat, check_batch, flatten, from_state_dict
from nethook.stats.compose import Combined, Conditional
from nethook.stats.histogram import Bincount, Histogram
from nethook.stats.iou import IoU
from nethook.stats.moments import Covariance, CrossCovariance, Mean, SecondMoment, Variance
from nethook.stats.pair_iou import PairIoU
from nethook.stats.persist import cached, load, save
from nethook.stats.quantile import Quantile
from nethook.stats.top_quantile import TopQuantile
from nethook.stats.topk import TopK

__all__ = [
    "Bincount",
    "Combined",
    "Conditional",
    "Covariance",
    "CrossCovariance",
    "Histogram",
    "IoU",
    "Mean",
    "PairIoU",
    "Quantile",
    "SecondMoment",
    "Stat",
    "TopK",
    "TopQuantile",
    "Variance",
    "cached",
    "check_batch",
    "flatten",
    "from_state_dict",
    "load",
    "save",
]
