"""dfit: Keras fit() for any PyTorch module, as exact distributed data-parallel training."""
from . import callbacks, distributed, losses, metrics
from .callbacks import History
from .model import Model, Sequential, load_model

__version__ = "0.1.0"

__all__ = ["Model", "Sequential", "load_model", "History", "callbacks", "distributed", "losses", "metrics",
           "multi_gpu_model", "__version__"]


def __getattr__(name):
    if name == "multi_gpu_model":
        from .spawn import multi_gpu_model

        return multi_gpu_model
    if name == "data":
        import importlib

        return importlib.import_module(".data", __name__)
    raise AttributeError(f"module 'dfit' has no attribute {name!r}")
