"""``LambdaCallback``: a callback made of plain functions, as in Keras."""
from __future__ import annotations

from typing import Callable

from .base import Callback


class LambdaCallback(Callback):
    """``LambdaCallback(on_epoch_end=lambda epoch, logs: ...)``; also ``on_batch_begin/on_batch_end``."""

    def __init__(self, on_epoch_begin: Callable | None = None, on_epoch_end: Callable | None = None,
                 on_batch_begin: Callable | None = None, on_batch_end: Callable | None = None,
                 on_train_begin: Callable | None = None, on_train_end: Callable | None = None, **kwargs: Callable):
        super().__init__()
        given = dict(on_epoch_begin=on_epoch_begin, on_epoch_end=on_epoch_end, on_train_begin=on_train_begin,
                     on_train_end=on_train_end, on_train_batch_begin=kwargs.pop("on_train_batch_begin", on_batch_begin),
                     on_train_batch_end=kwargs.pop("on_train_batch_end", on_batch_end), **kwargs)
        for hook, fn in given.items():
            if fn is not None:
                setattr(self, hook, fn)  # instance attribute: dispatch sees it via getattr
