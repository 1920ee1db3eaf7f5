"""BatchNorm statistics from the GLOBAL batch on N ranks, so N ranks train exactly as one.

On N ranks each rank holds only its part of a global batch. A torch BatchNorm layer would normalise by
that part's statistics; here the mean and variance come from all parts (one all-reduce of
``(sum, sum of squares, count)`` per layer in forward, one of the two gradient sums in backward).

How the layers are switched: ``set_synchronized(module, True)`` swaps the class of each torch
BatchNorm1d/2d/3d instance (in place) to a subclass that has the SAME class name, constructor and
attributes, and only a different ``forward``. So parameters, buffers, ``state_dict()`` keys,
``get_config()``, ``save``/``load_model`` and optimizer references are untouched, and a pickled or deep-copied
layer comes back as the plain torch class. ``set_synchronized(module, False)`` swaps them back. A layer
whose class overrides ``forward`` (a user subclass) is left as it is.

The gradient: dfit scales each rank's loss by ``world / global_batch`` and DDP averages gradients over
ranks, so rank r's backward must give the gradient of the SUM over ranks of their losses w.r.t. its own
input rows; DDP's average of those ``(1 / world) * (world / global_batch) * d(sum of all per-sample losses)``
is then exactly one rank's ``(1 / global_batch) * d(...)``. The standard sync-BN backward computes that
gradient of the sum: with ``xhat = (x - mean) * invstd`` and ``g`` the gradient w.r.t. ``xhat``,
``dx = invstd * (g - sum(g) / M - xhat * sum(g * xhat) / M)``, both sums over all ranks, M the global count.
"""
from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["set_synchronized", "batchnorm_layers", "global_batch_norm"]

_PLAIN_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _group_world() -> int:
    """World size of the default process group (1 when there is none)."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_world_size()
    return 1


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return t.dtype if t.dtype in (torch.float32, torch.float64) else torch.float32


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast against an input of ``ndim`` dimensions (channels: dim 1)."""
    return t.reshape((1, -1) + (1,) * (ndim - 2))


class _GlobalNormalize(torch.autograd.Function):
    """``(x - mean) * invstd`` with mean and variance over every rank's rows (no affine part)."""

    @staticmethod
    def forward(ctx, x, shift, running_mean, running_var, momentum, eps):  # type: ignore[override]
        dtype = _compute_dtype(x)
        xc = x.to(dtype)
        dims = [0] + list(range(2, x.dim()))
        channels = x.shape[1]
        shifted = xc - _channel_view(shift.to(dtype), x.dim())  # a shift common to all ranks, for accuracy
        local = torch.cat([shifted.sum(dims), (shifted * shifted).sum(dims),
                           torch.tensor([x.numel() // max(channels, 1)], dtype=dtype, device=x.device)])
        tdist.all_reduce(local)
        sums, squares, count = local[:channels], local[channels:2 * channels], local[2 * channels]
        total = int(count.item())
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {total} over all ranks "
                             f"(input size {list(x.shape)} on this rank)")
        shifted_mean = sums / total
        var = (squares / total - shifted_mean * shifted_mean).clamp_min(0)
        mean = shifted_mean + shift.to(dtype)
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                unbiased = var * (total / (total - 1))
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        xhat = (xc - _channel_view(mean, x.dim())) * _channel_view(invstd, x.dim())
        ctx.save_for_backward(xhat, invstd)
        ctx.total, ctx.input_dtype = total, x.dtype
        return xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        xhat, invstd = ctx.saved_tensors
        g = grad.to(xhat.dtype)
        dims = [0] + list(range(2, g.dim()))
        channels = xhat.shape[1]
        sums = torch.cat([g.sum(dims), (g * xhat).sum(dims)])
        tdist.all_reduce(sums)
        mean_g = _channel_view(sums[:channels] / ctx.total, g.dim())
        mean_gx = _channel_view(sums[channels:] / ctx.total, g.dim())
        dx = (g - mean_g - xhat * mean_gx) * _channel_view(invstd, g.dim())
        return dx.to(ctx.input_dtype), None, None, None, None, None


def global_batch_norm(x: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
                      weight: torch.Tensor | None, bias: torch.Tensor | None, momentum: float,
                      eps: float) -> torch.Tensor:
    """Batch normalisation of ``x`` with statistics over every rank's rows (a collective: every rank calls it).

    ``running_mean``/``running_var`` (None: not tracked) are updated as one process would, with the
    unbiased variance over the global count.
    """
    if x.dim() < 2:
        raise ValueError(f"BatchNorm expects an input with a channel dimension; got shape {list(x.shape)}")
    shift = running_mean.detach().clone() if running_mean is not None else x.new_zeros(x.shape[1])
    y = _GlobalNormalize.apply(x, shift, running_mean, running_var, momentum, eps)
    if weight is not None:
        y = y * _channel_view(weight, x.dim()).to(y.dtype)
    if bias is not None:
        y = y + _channel_view(bias, x.dim()).to(y.dtype)
    return y


def _torch_sync_function():
    """torch's own SyncBatchNorm autograd function (fused CUDA kernels), or None."""
    try:
        from torch.nn.modules._functions import SyncBatchNorm
    except ImportError:  # pragma: no cover - a torch without it
        return None
    return SyncBatchNorm


class _Synchronized:
    """The forward of a BatchNorm layer whose batch statistics come from the global batch.

    Mixed in front of a torch BatchNorm class by ``_synchronized_class``; outside a multi-process job it
    is the plain torch forward.
    """

    _dfit_plain_class: type

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        world = _group_world()
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        if world == 1 or not bn_training:  # running statistics need no synchronisation
            return super().forward(input)  # type: ignore[misc]
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if update else None
        running_var = self.running_var if update else None
        if input.is_cuda and self.training and _TORCH_SYNC is not None:
            return _TORCH_SYNC.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                     momentum, tdist.group.WORLD, world)
        return global_batch_norm(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps)

    def __reduce_ex__(self, protocol):
        """Pickle and deep-copy as the plain torch class."""
        reduced = super().__reduce_ex__(protocol)  # type: ignore[misc]
        return (_new_instance, (self._dfit_plain_class,)) + tuple(reduced[2:])


def _new_instance(cls: type) -> object:
    """An uninitialised ``cls`` (its state is set by unpickling)."""
    return cls.__new__(cls)


_TORCH_SYNC = _torch_sync_function()
_SYNCHRONIZED: dict[type, type] = {}


def _synchronized_class(cls: type) -> type:
    """The synchronised twin of a torch BatchNorm class: same name and constructor, another forward."""
    if cls not in _SYNCHRONIZED:
        _SYNCHRONIZED[cls] = type(cls.__name__, (_Synchronized, cls), {
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            "_dfit_plain_class": cls})
    return _SYNCHRONIZED[cls]


def batchnorm_layers(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer of ``module`` (torch's, dfit's synchronised ones and user subclasses)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def set_synchronized(module: nn.Module, enabled: bool) -> list[str]:
    """Make the torch BatchNorm layers of ``module`` use global-batch statistics (or per-rank ones again).

    Returns the names of the synchronised layers. Layers of a class that overrides ``forward`` (other than
    torch's BatchNorm1d/2d/3d) and torch's own ``nn.SyncBatchNorm`` are left unchanged.
    """
    synced = []
    for name, layer in batchnorm_layers(module):
        cls = type(layer)
        plain = getattr(cls, "_dfit_plain_class", cls)
        if plain not in _PLAIN_CLASSES:
            continue
        layer.__class__ = _synchronized_class(plain) if enabled else plain
        if enabled:
            synced.append(name)
    return synced
