"""Configs, saving and loading. Files are written atomically by rank 0 (``atomic_write``, the one writer of every
dfit file); loading (``load_file``) checks each record's CRC-32 and never unpickles code."""
from __future__ import annotations

import inspect
import os
import pickle
import socket
import tempfile
import time
import zipfile
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from . import distributed as dist
from . import optimizers

if TYPE_CHECKING:
    from .model import Model

FORMAT = "dfit.model/1"
_SKIP_ARGS = {"self", "device", "dtype"}


TEMP_MARK = ".dfit-tmp."
STALE_FOREIGN_TEMP_S = 3600.0  # a temporary file written on another host is stale after this long


class CheckpointError(ValueError):
    """A file that cannot be loaded as a checkpoint: not one, damaged, of another model, or holding code."""


def _host() -> str:
    return socket.gethostname().replace("@", "_")


def temp_prefix(path: str) -> str:
    """The start of the names of ``path``'s temporary files: ``.<name>.dfit-tmp.<pid>.<random>@<host>``."""
    return f".{os.path.basename(path)}{TEMP_MARK}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: str) -> list[str]:
    """Remove the temporary files of ``path`` left by writers that died (killed mid-write): those of a process
    of this host that no longer runs, and those of another host untouched for ``STALE_FOREIGN_TEMP_S``.
    Returns the names removed."""
    folder, prefix, host = os.path.dirname(os.path.abspath(path)), temp_prefix(path), _host()
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(prefix):
            continue
        head, _, owner_host = name[len(prefix):].rpartition("@")
        pid_text = head.split(".", 1)[0]
        full = os.path.join(folder, name)
        try:
            if owner_host == host and pid_text.isdigit():
                stale = int(pid_text) != os.getpid() and not _pid_alive(int(pid_text))
            else:
                stale = time.time() - os.path.getmtime(full) > STALE_FOREIGN_TEMP_S
            if stale:
                os.unlink(full)
                removed.append(name)
        except OSError:  # gone already (another cleaner), or not ours to remove
            continue
    return removed


def _fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """``write(file)`` into a temporary file beside ``path`` (``.<name>.dfit-tmp.<pid>.<random>@<host>``),
    flushed to disk, then renamed over ``path``: readers see the old file or the new one, never a part. An
    error half-way removes the temporary file; a process killed half-way leaves the old file, and its
    temporary file is removed by the next successful write of ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{temp_prefix(path)}{os.getpid()}.", suffix=f"@{_host()}", dir=folder)
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
    _fsync_folder(folder)  # the rename itself survives a power cut
    remove_stale_temps(path)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically (see ``atomic_write``). The file is torch's zip archive, whose
    records each carry a CRC-32 of their bytes: ``load_file`` checks them all."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _verify_archive(path: str) -> None:
    """Check that ``path`` is a complete torch zip archive whose every record matches its CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            # torch's reader (miniz) reads a record marked as a folder as empty, leaving its tensor uninitialised
            bad = bad or next((i.filename for i in archive.infolist() if i.is_dir() or i.external_attr & 0x10), None)
    except FileNotFoundError:
        raise
    except Exception as exc:  # BadZipFile, EOFError, struct.error, zlib.error, ...: not a whole archive
        raise CheckpointError(
            f"{path} is not a readable checkpoint: not a complete torch zip archive ({type(exc).__name__}: "
            f"{exc}); it may be truncated (a copy or a write that did not finish) or another kind of file"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"{path} is damaged: the checksum (CRC-32) of its record {bad!r} does not match the bytes stored; "
            "nothing was loaded. Use another copy of the checkpoint (e.g. an earlier epoch's)"
        )


def load_file(path: str) -> Any:
    """What ``atomic_save`` wrote to ``path``, on the CPU, after checking every record's checksum. Only
    tensors and plain containers are read (``torch.load(weights_only=True)``): a file asking to run code is
    refused without running it. Every failure is a ``CheckpointError`` naming the file."""
    path = os.fspath(path)
    _verify_archive(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain containers, which dfit never loads (they could "
            f"run code; nothing was run). torch says: {first[0] if first else exc}"
        ) from None
    except (RuntimeError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{path} could not be read as a checkpoint: {type(exc).__name__}: {exc}") from None


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_state(module: nn.Module, state: Any, path: str) -> None:
    """``module.load_state_dict(state)``, or a ``CheckpointError`` naming ``path`` and the keys that are missing,
    unexpected or of another shape, before any weight changes."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of weights")
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in own
              if k in state and isinstance(own[k], torch.Tensor) and isinstance(state[k], torch.Tensor)
              and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"missing keys: {_listing(missing)}" if missing else "",
                 f"unexpected keys: {_listing(unexpected)}" if unexpected else "",
                 f"shape mismatches: {_listing(shapes)}" if shapes else ""]
        raise CheckpointError(
            f"{path} does not fit this model ({type(module).__name__}): " + "; ".join(p for p in parts if p)
            + ". Was it saved from another model, or another version of this one?"
        )
    module.load_state_dict(state)


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


def load_weights(model: "Model", path: str) -> None:
    payload = load_file(path)
    state = payload["state_dict"] if isinstance(payload, dict) and payload.get("format") == FORMAT else payload
    load_state(model.module, state, path)


def load_model(path: str, module: nn.Module | None, custom_objects: Mapping[str, type] | None, compile: bool,
               model_classes: Mapping[str, type]) -> "Model":
    payload = load_file(path)
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
    load_state(model.module, payload["state_dict"], path)
    cfg = payload.get("compile")
    if compile and cfg and cfg.get("optimizer") and cfg.get("loss") is not None:
        optimizer = cfg["optimizer"]
        model.compile(**{**cfg, "optimizer": optimizers.deserialize(optimizer) if isinstance(optimizer, dict)
                         else optimizer})
        if payload.get("optimizer_state"):
            model.optimizer.load_state_dict(payload["optimizer_state"])
    return model
