"""Configs, saving and loading. Files are written atomically by rank 0; loading never unpickles code."""
from __future__ import annotations

import inspect
import os
import tempfile
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from . import distributed as dist
from . import optimizers

if TYPE_CHECKING:
    from .model import Model

FORMAT = "dfit.model/1"
_SKIP_ARGS = {"self", "device", "dtype"}


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename: readers see the old file or the new
    one, never a part, and a crash half-way leaves the old file and no temporary file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, mode, **({"newline": ""} if "b" not in mode else {})) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (tuple, list)):
        items = [_jsonable(v) for v in value]
        return None if any(i is _UNSERIALIZABLE for i in items) else items
    return _UNSERIALIZABLE


_UNSERIALIZABLE = object()


def layer_config(name: str, layer: nn.Module) -> dict[str, Any]:
    """A layer's class and constructor arguments, read back from its attributes (torch stores them)."""
    config: dict[str, Any] = {}
    for arg, param in inspect.signature(type(layer).__init__).parameters.items():
        if arg in _SKIP_ARGS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if not hasattr(layer, arg):
            if param.default is param.empty:
                raise NotImplementedError(
                    f"cannot read constructor argument {arg!r} of layer {name!r} ({type(layer).__name__}); "
                    "give the class a get_config() or save weights only"
                )
            continue
        value = getattr(layer, arg)
        if arg == "bias" and (value is None or isinstance(value, torch.Tensor)):
            value = value is not None
        jv = _jsonable(value)
        if jv is _UNSERIALIZABLE:
            if param.default is not param.empty:
                continue
            raise NotImplementedError(f"layer {name!r}: argument {arg!r} is not serializable ({type(value).__name__})")
        config[arg] = jv
    # torch keeps no dtype attribute: read it off the layer's tensors (Keras configs carry a dtype too).
    float_dtypes = {t.dtype for t in [*layer.parameters(), *layer.buffers()] if t.is_floating_point()}
    if len(float_dtypes) == 1 and "dtype" in inspect.signature(type(layer).__init__).parameters:
        config["dtype"] = str(float_dtypes.pop()).removeprefix("torch.")
    if hasattr(layer, "get_config") and callable(layer.get_config):
        config = dict(layer.get_config())
    return {"class_name": type(layer).__name__, "name": name, "config": config}


def layer_from_config(entry: Mapping[str, Any], custom_objects: Mapping[str, type] | None = None) -> nn.Module:
    """Build a layer from ``layer_config``'s output: torch.nn classes, or classes in ``custom_objects``."""
    class_name = entry["class_name"]
    cls = (custom_objects or {}).get(class_name) or getattr(nn, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"Unknown layer class {class_name!r}; pass it in custom_objects={{'{class_name}': cls}}")
    config = dict(entry.get("config", {}))
    if isinstance(config.get("dtype"), str):
        dtype = getattr(torch, config["dtype"], None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"layer {entry.get('name')!r}: unknown dtype {config['dtype']!r}")
        config["dtype"] = dtype
    return cls(**config)


def model_config(model: "Model") -> dict[str, Any]:
    if not isinstance(model.module, nn.Sequential):
        if hasattr(model.module, "get_config"):
            return {"name": model.name, "module_config": model.module.get_config()}
        raise NotImplementedError(
            f"get_config() needs a Sequential model or a module with get_config(); {type(model.module).__name__} "
            "has none. Save and load its weights instead"
        )
    return {"name": model.name,
            "layers": [layer_config(name, layer) for name, layer in model.module.named_children()]}


def save_weights(model: "Model", path: str) -> None:
    """The module's state dict (rank 0 writes; other ranks return at once)."""
    if dist.is_chief():
        atomic_save(model.module.state_dict(), path)


def save_model(model: "Model", path: str) -> None:
    """Architecture (when it has a config), weights, compile settings and optimizer state."""
    if not dist.is_chief():
        return
    from .model import Sequential

    try:
        config = model.get_config()
    except NotImplementedError:
        config = None
    args = model._compile_args
    compile_cfg = None
    if model.compiled:
        plain = {k: v for k, v in args.items() if _jsonable(v) is not _UNSERIALIZABLE or isinstance(v, dict)}
        compile_cfg = {k: v for k, v in plain.items() if k != "loss" or isinstance(v, (str, list, dict))}
        if compile_cfg.get("optimizer") is None:   # a Keras optimizer object: its class and config
            compile_cfg["optimizer"] = optimizers.serialize(model.optimizer)
    payload = {
        "format": FORMAT,
        "kind": "Sequential" if isinstance(model, Sequential) else "Model",
        "module_class": f"{type(model.module).__module__}.{type(model.module).__qualname__}",
        "config": config,
        "state_dict": model.module.state_dict(),
        "compile": compile_cfg,
        "optimizer_state": model.optimizer.state_dict() if model.optimizer is not None else None,
    }
    atomic_save(payload, path)


def _read(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights(model: "Model", path: str) -> None:
    payload = _read(path)
    state = payload["state_dict"] if isinstance(payload, dict) and payload.get("format") == FORMAT else payload
    model.module.load_state_dict(state)


def load_model(path: str, module: nn.Module | None, custom_objects: Mapping[str, type] | None, compile: bool,
               model_classes: Mapping[str, type]) -> "Model":
    payload = _read(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a model saved by dfit Model.save (for weights use load_weights)")
    if module is not None:
        model = model_classes["Model"](module)
    elif payload["kind"] == "Sequential" and payload["config"] is not None:
        model = model_classes["Sequential"].from_config(payload["config"], custom_objects)
    else:
        raise ValueError(
            f"{path} holds a {payload['module_class']} whose code is not stored in the file; "
            "call dfit.load_model(path, module=YourModule(...)) with a freshly built instance"
        )
    model.module.load_state_dict(payload["state_dict"])
    cfg = payload.get("compile")
    if compile and cfg and cfg.get("optimizer") and cfg.get("loss") is not None:
        optimizer = cfg["optimizer"]
        model.compile(**{**cfg, "optimizer": optimizers.deserialize(optimizer) if isinstance(optimizer, dict)
                         else optimizer})
        if payload.get("optimizer_state"):
            model.optimizer.load_state_dict(payload["optimizer_state"])
    return model
