"""nethook: look inside any PyTorch network and change it."""

__version__ = "0.1.0"

from nethook import interventions
from nethook.models import load_model
from nethook.trace import StopForward, Trace, TraceDict

__all__ = ["StopForward", "Trace", "TraceDict", "__version__", "interventions", "load_model"]
