"""Build a model from a short spec string: ``nethook.load_model(spec, weights=None)``.

Specs (``:kwargs`` optional everywhere, as ``a=1,b=x``):

- ``torchvision:resnet18`` — a torchvision architecture, randomly initialized
  unless ``weights`` names a file; ``torchvision:resnet18:num_classes=365`` passes
  keyword arguments; ``torchvision:resnet18:IMAGENET1K_V1`` (a weights name) needs
  ``weights=FILE``, because nethook never downloads at run time.
- ``package.module:factory`` — imports the module and calls ``factory(**kwargs)``
  (``factory`` may be dotted, e.g. ``Class.build``; a Module instance is returned as is).
- ``path/to/file.py:factory`` — the same for a Python file on disk.

Strings are only split and looked up, never evaluated. Weights are read with
``torch.load(weights_only=True)`` (or safetensors); a checkpoint dict holding a
``state_dict`` or ``model`` entry, and ``module.`` prefixes from DataParallel, are
accepted. The model is returned in eval mode.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["load_model", "load_weights", "model_device", "parse_spec"]


def _parse_value(text: str) -> Any:
    """``"3"`` -> 3, ``"0.5"`` -> 0.5, ``"true"`` -> True, ``"none"`` -> None, else the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_kwargs(text: str, spec: str) -> dict[str, Any]:
    """``"a=1,b=x"`` -> ``{"a": 1, "b": "x"}``; anything else is an error naming ``spec``."""
    kwargs: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(
                f"model spec {spec!r}: expected keyword arguments 'a=1,b=x', got {item!r}"
            )
        kwargs[key.strip()] = _parse_value(value.strip())
    return kwargs


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); CPU for a stateless model."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def parse_spec(spec: str) -> tuple[str, str, str]:
    """Split ``spec`` into (source, factory, extra) where extra is the text after a second colon."""
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a non-empty string, got {spec!r}")
    if ".py:" in spec:
        source, _, rest = spec.partition(".py:")
        source += ".py"
    else:
        source, sep, rest = spec.partition(":")
        if not sep:
            raise ValueError(
                f"model spec {spec!r} has no ':'; expected 'torchvision:resnet18', "
                "'package.module:factory' or 'path/to/file.py:factory'"
            )
    factory, _, extra = rest.partition(":")
    if not factory:
        raise ValueError(f"model spec {spec!r} names no factory after ':'")
    return source, factory, extra


def load_model(spec: str, weights: str | Path | None = None) -> nn.Module:
    """Build the model ``spec`` names, load ``weights`` (a file) if given, return it in eval mode."""
    source, factory, extra = parse_spec(spec)
    if source == "torchvision":
        model = _torchvision_model(spec, factory, extra, weights)
    else:
        obj = _import_source(spec, source)
        for part in factory.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"model spec {spec!r}: {source} has no attribute {factory!r}")
            obj = getattr(obj, part)
        kwargs = _parse_kwargs(extra, spec)
        model = obj if isinstance(obj, nn.Module) and not kwargs else obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model spec {spec!r} built a {type(model).__qualname__}, not an nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _torchvision_model(spec: str, name: str, extra: str, weights: str | Path | None) -> nn.Module:
    """A torchvision architecture with random weights (the file, if any, is loaded later)."""
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(
            f"model spec {spec!r}: torchvision has no model {name!r}"
            + (f" (closest: {', '.join(close)})" if close else "")
        )
    kwargs: dict[str, Any] = {}
    if extra and "=" not in extra:
        known = _weights_names(name)
        if extra.upper() not in known:
            raise ValueError(
                f"model spec {spec!r}: {extra!r} is neither a weights name of {name} "
                f"({', '.join(sorted(known))}) nor keyword arguments 'a=1,b=x'"
            )
        if weights is None:
            raise ValueError(_download_hint(spec, name, extra))
    else:
        kwargs = _parse_kwargs(extra, spec)
    for key in ("weights", "pretrained", "weights_backbone"):
        value = kwargs.pop(key, None)
        if value not in (None, False) and weights is None:
            raise ValueError(_download_hint(spec, name, str(value)))
    builder = torchvision.models.get_model_builder(name)
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # its default would download a backbone
    return builder(weights=None, **kwargs)


def _weights_names(name: str) -> set[str]:
    """The pretrained-weights names torchvision knows for model ``name`` (plus DEFAULT)."""
    import torchvision

    try:
        return {w.name for w in torchvision.models.get_model_weights(name)} | {"DEFAULT"}
    except (KeyError, ValueError):
        return {"DEFAULT"}


def _download_hint(spec: str, name: str, weights_name: str) -> str:
    """The error text for a spec that would need pretrained weights from the internet."""
    import torchvision

    url = ""
    try:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum.DEFAULT if weights_name.upper() in ("DEFAULT", "TRUE") else enum[weights_name]
        url = f" (torchvision's file is {chosen.url})"
    except (KeyError, ValueError, AttributeError):
        pass
    return (
        f"model spec {spec!r} asks for pretrained weights {weights_name!r}, which would need a "
        f"download; nethook never downloads at run time. Download the file yourself{url} and "
        f"pass it: load_model('torchvision:{name}', weights='FILE.pth') or "
        f"`--weights FILE.pth` on the command line."
    )


def _import_source(spec: str, source: str) -> Any:
    """Import the module named by ``source``: a dotted module name or a ``.py`` file path."""
    if source.endswith(".py"):
        path = Path(source).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"model spec {spec!r}: no such file {str(path)!r}")
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
        name = f"_nethook_model_{path.stem}_{digest}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"model spec {spec!r}: cannot import {str(path)!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return module
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        raise ValueError(
            f"model spec {spec!r}: cannot import module {source!r} ({exc}); expected "
            "'torchvision:NAME', 'package.module:factory' or 'path/to/file.py:factory'"
        ) from exc


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from ``path`` into ``model`` (strict), never unpickling code."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"weights file {str(path)!r} is not a state dict loadable with "
                f"weights_only=True ({exc})"
            ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(
            f"weights file {str(path)!r} holds a {type(state).__name__}, not a state dict"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(
            f"weights file {str(path)!r} does not fit {type(model).__qualname__}: {exc}"
        ) from exc
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"weights file {str(path)!r} does not fit {type(model).__qualname__}: "
            f"missing {_few(result.missing_keys)}, unexpected {_few(result.unexpected_keys)}"
        )
    return model


def _few(keys: list[str], limit: int = 5) -> str:
    """At most ``limit`` keys and how many more."""
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
