"""Keras callbacks: the base class, its dispatcher and the built-in callbacks."""
from .base import Callback, CallbackList
from .history import History
from .lambda_callback import LambdaCallback
from .progbar import ProgbarLogger

__all__ = ["Callback", "CallbackList", "History", "LambdaCallback", "ProgbarLogger"]
