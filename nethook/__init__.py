"""nethook: look inside any PyTorch network and change it."""

__version__ = "0.1.0"

from nethook import interventions
from nethook.layers import get_module, get_parameter, replace_module, set_requires_grad
from nethook.models import load_model
from nethook.trace import StopForward, Trace, TraceDict

__all__ = [
    "StopForward",
    "Trace",
    "TraceDict",
    "__version__",
    "get_module",
    "get_parameter",
    "interventions",
    "load_model",
    "replace_module",
    "set_requires_grad",
]
