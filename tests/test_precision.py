"""Mixed precision and torch.compile: the optimizer sees the float32 gradients (unscaled), training with plain
SGD follows float32's course, logs stay exact floats.

Plain SGD without momentum throughout: its update is proportional to the gradient, so a gradient left scaled
(GradScaler's 65536) or normalised wrongly changes the weights by that factor. Adam, being nearly
scale-invariant, would hide it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dfit

# GradScaler's documented initial scale (torch.amp.GradScaler(init_scale=2.0**16)); it stays there for the first
# 2000 finite steps (growth_interval), so a one-step test sees exactly this factor.
INITIAL_LOSS_SCALE = 2.0 ** 16
# Tolerances of one step's gradients against float32's, relative to the largest float32 gradient entry: a
# float16 rounding is 2**-11 ~ 4.9e-4, a bfloat16 one 2**-8 ~ 3.9e-3, and a gradient goes through a few of them
# (inputs, weights and activations rounded in the forward and backward matmuls). Measured on this model:
# 3.2e-4 and 1.6e-3; the bounds leave ~6x room. A gradient left scaled is off by a factor 65536.
GRAD_TOL = {"16-mixed": 2e-3, "bf16-mixed": 1e-2}
# Epoch losses after 24 SGD steps, relative: measured 8.5e-5 (float16) and 1.3e-3 (bfloat16).
HISTORY_RTOL = {"16-mixed": 5e-4, "bf16-mixed": 6e-3}
# Final weights (largest about 0.8), absolute: measured 1.3e-4 and 1.9e-2.
WEIGHT_ATOL = {"16-mixed": 1e-3, "bf16-mixed": 6e-2}
AUTOCAST_DTYPE = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


class SpySGD(torch.optim.SGD):
    """Plain SGD (no momentum) that records the gradients it is asked to apply, at every step."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def _model(precision: str, lr: float, jit_compile: bool = False, seen_dtypes: set | None = None):
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)])
    if seen_dtypes is not None:
        model.module[0].register_forward_hook(lambda _m, _i, out: seen_dtypes.add(out.dtype))
    optimizer = SpySGD(model.module.parameters(), lr=lr)
    model.compile(optimizer=optimizer, loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], precision=precision, jit_compile=jit_compile)
    return model, optimizer


def _one_step(precision: str):
    """One training step on 64 rows: (gradients as backward produced them, gradients the optimizer saw)."""
    x, y = _data()
    model, optimizer = _model(precision, lr=0.1)
    raw: list[torch.Tensor] = []
    for p in model.module.parameters():
        p.register_hook(lambda g: raw.append(g.detach().clone()) or g)
    model.fit(x[:64], y[:64], batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert len(optimizer.seen) == 1, "the step was skipped (inf/nan gradients?)"
    # backward visits the parameters last-layer first: put the hooked gradients in parameter order
    by_shape = {tuple(g.shape): g for g in raw}
    return [by_shape[tuple(p.shape)] for p in model.module.parameters()], optimizer.seen[0]


def _max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g.double() - w.double()).abs().max()) for g, w in zip(got, want)) / scale


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_optimizer_sees_the_unscaled_float32_gradients(precision):
    _, reference = _one_step("32")
    raw, seen = _one_step(precision)
    assert all(g.dtype == torch.float32 for g in seen)  # parameters and their gradients stay float32
    error = _max_rel_error(seen, reference)
    assert error < GRAD_TOL[precision], f"{precision}: optimizer gradients off by {error:.2e} (relative)"
    assert error > 0  # autocast really changed the arithmetic
    # backward itself ran on the scaled loss under 16-mixed (what keeps small float16 gradients from
    # flushing to zero), and on the plain loss under bf16-mixed
    factor = INITIAL_LOSS_SCALE if precision == "16-mixed" else 1.0
    assert _max_rel_error([g / factor for g in raw], seen) < 1e-6


def _fit(precision: str = "32", jit_compile: bool = False, epochs: int = 4, seen_dtypes: set | None = None):
    x, y = _data()
    model, _ = _model(precision, lr=0.5, jit_compile=jit_compile, seen_dtypes=seen_dtypes)
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.25, shuffle=False, verbose=0)
    return model, history


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_training_with_sgd_follows_fp32(precision):
    seen: set = set()
    model, history = _fit(precision, seen_dtypes=seen)
    reference_model, reference = _fit("32")
    loss = history.history["loss"]
    assert all(np.isfinite(loss)) and loss[-1] < 0.6 * loss[0]
    assert isinstance(loss[0], float)
    # 24 SGD steps: the rounding of the reduced dtype accumulates, a gradient scaled by 65536 would diverge
    rtol = HISTORY_RTOL[precision]
    np.testing.assert_allclose(loss, reference.history["loss"], rtol=rtol)
    np.testing.assert_allclose(history.history["val_loss"], reference.history["val_loss"], rtol=rtol)
    for p, q in zip(model.module.parameters(), reference_model.module.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=0,
                                   atol=WEIGHT_ATOL[precision])
    assert history.history["val_accuracy"][-1] > 0.7
    assert seen == {AUTOCAST_DTYPE[precision]}  # ran under autocast
    assert model.module[0].weight.dtype == torch.float32  # parameters stay fp32
    prediction = model.predict(_data()[0][:5])
    assert prediction.dtype == np.float32 and prediction.shape == (5, 3)


def test_unknown_precision_is_refused_at_compile():
    model = dfit.Sequential([nn.Linear(2, 1)])
    with pytest.raises(ValueError, match="precision"):
        model.compile("sgd", "mse", precision="fp8")


@pytest.mark.timeout(600)
def test_jit_compile_matches_eager():
    """Plain SGD: the compiled step must apply the same gradients as the eager one, not merely similar ones."""
    compiled_model, compiled = _fit(jit_compile=True, epochs=2)
    eager_model, eager = _fit(epochs=2)
    for key, values in eager.history.items():
        np.testing.assert_allclose(compiled.history[key], values, rtol=1e-5, atol=1e-7, err_msg=key)
    for p, q in zip(compiled_model.module.parameters(), eager_model.module.parameters()):
        np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert compiled_model.module is not None and not hasattr(compiled_model.module, "_orig_mod")
