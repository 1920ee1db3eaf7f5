"""Mixed precision and torch.compile: same API, training still converges, logs stay exact floats."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import dfit


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x, y


def _fit(precision: str = "32", jit_compile: bool = False, epochs: int = 4, seen_dtypes: set | None = None):
    x, y = _data()
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)])
    if seen_dtypes is not None:
        model.module[0].register_forward_hook(lambda _m, _i, out: seen_dtypes.add(out.dtype))
    model.compile(optimizer=torch.optim.Adam(model.module.parameters(), lr=1e-2),
                  loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  precision=precision, jit_compile=jit_compile)
    history = model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.25, shuffle=False, verbose=0)
    return model, history


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_close_to_fp32(precision):
    seen: set = set()
    model, history = _fit(precision, seen_dtypes=seen)
    _, reference = _fit("32")
    loss = history.history["loss"]
    assert all(np.isfinite(loss)) and loss[-1] < 0.6 * loss[0]
    assert isinstance(loss[0], float)
    # reduced precision changes the numbers, not the course of training
    np.testing.assert_allclose(loss, reference.history["loss"], rtol=0.1)
    assert history.history["val_accuracy"][-1] > 0.7
    assert abs(history.history["val_accuracy"][-1] - reference.history["val_accuracy"][-1]) <= 0.1
    assert seen == {{"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}[precision]}  # ran under autocast
    assert model.module[0].weight.dtype == torch.float32  # parameters stay fp32
    prediction = model.predict(_data()[0][:5])
    assert prediction.dtype == np.float32 and prediction.shape == (5, 3)


def test_unknown_precision_is_refused_at_compile():
    model = dfit.Sequential([nn.Linear(2, 1)])
    with pytest.raises(ValueError, match="precision"):
        model.compile("sgd", "mse", precision="fp8")


@pytest.mark.timeout(600)
def test_jit_compile_matches_eager():
    compiled_model, compiled = _fit(jit_compile=True, epochs=2)
    _, eager = _fit(epochs=2)
    for key, values in eager.history.items():
        np.testing.assert_allclose(compiled.history[key], values, rtol=1e-4, atol=1e-6, err_msg=key)
    assert compiled_model.module is not None and not hasattr(compiled_model.module, "_orig_mod")
