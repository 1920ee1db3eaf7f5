"""evaluate / predict / *_on_batch, deprecated aliases, summary, config, layers and optimizers."""
from __future__ import annotations

import json
import os
import warnings

os.environ.setdefault("KERAS_BACKEND", "torch")  # the optimizer tests compare with Keras itself

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dfit
from dfit.callbacks import Callback
from core_helpers import F64, Recorder, fixed_linear, frozen_model, mse_rows, row_ids

pytestmark = pytest.mark.timeout(60)
RNG = np.random.default_rng(7)


def _data(n=10):
    return RNG.normal(size=(n, 1)), RNG.normal(size=(n, 1))


# -- evaluate -------------------------------------------------------------------------------------------------
def test_evaluate_returns_a_scalar_without_metrics():
    x, y = _data()
    model = frozen_model(Recorder(w=0.5, b=0.25))
    result = model.evaluate(x, y, verbose=0, batch_size=3)
    assert isinstance(result, float)
    assert result == pytest.approx(mse_rows(0.5 * x + 0.25, y).mean(), rel=1e-12)


def test_evaluate_returns_loss_then_metrics_or_a_dict():
    x, y = _data()
    w = RNG.uniform(0, 2, size=10)
    model = frozen_model(Recorder(w=0.5, b=0.25), metrics=["mae", "mse"])
    pred = 0.5 * x + 0.25
    loss, mae, mse = model.evaluate(x, y, verbose=0, sample_weight=w)
    assert loss == pytest.approx((w * mse_rows(pred, y)).sum() / 10, rel=1e-12)
    assert mae == pytest.approx(np.abs(pred - y).mean(), rel=1e-12)  # plain metrics ignore weights
    assert mse == pytest.approx(mse_rows(pred, y).mean(), rel=1e-12)
    result = model.evaluate(x, y, verbose=0, sample_weight=w, return_dict=True)
    assert list(result) == ["loss", "mae", "mse"]
    assert result["loss"] == pytest.approx(loss, rel=1e-15)


def test_evaluate_does_not_change_weights_or_training_mode():
    x, y = _data()
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(1, 4, dtype=F64), nn.Dropout(0.5), nn.Linear(4, 1, dtype=F64)])
    model.compile("sgd", "mse")
    before = [w.copy() for w in model.get_weights()]
    a = model.evaluate(x, y, verbose=0)
    b = model.evaluate(x, y, verbose=0)
    assert a == b  # dropout is off in evaluation
    assert model.module.training
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_evaluate_steps_and_callbacks():
    x, y = _data(10)
    seen = []

    class Count(Callback):
        def on_test_batch_end(self, batch, logs=None):
            seen.append((batch, logs["loss"]))

    model = frozen_model(Recorder(w=0.5))
    loss = model.evaluate(x, y, batch_size=4, steps=2, verbose=0, callbacks=[Count()])
    assert loss == pytest.approx(mse_rows(0.5 * x[:8], y[:8]).mean(), rel=1e-12)
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][1] == pytest.approx(mse_rows(0.5 * x[:4], y[:4]).mean(), rel=1e-12)


def test_evaluate_verbose_prints_one_summary_line(capsys):
    x, y = _data()
    model = frozen_model(Recorder(w=0.5), metrics=["mae"])
    loss, mae = model.evaluate(x, y, verbose=2, batch_size=4)
    out = capsys.readouterr().out
    assert out.startswith("3/3 - ") and out.count("\n") == 1 and f"loss: {loss:.4f} - mae: {mae:.4f}" in out
    model.evaluate(x, y, verbose=0)
    assert capsys.readouterr().out == ""


def test_evaluate_before_compile_is_an_error():
    with pytest.raises(RuntimeError, match="compile"):
        dfit.Model(Recorder()).evaluate(*_data(), verbose=0)


def test_compile_without_loss_needs_a_model_that_computes_its_loss():
    model = dfit.Model(Recorder())
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"the model.s own loss must be a scalar tensor .*got \(\d+, 1\)"):
        model.fit(*_data(), epochs=1, verbose=0)


# -- predict --------------------------------------------------------------------------------------------------
def test_predict_returns_numpy_in_input_order_for_any_batch_size():
    x = RNG.normal(size=(11, 1))
    model = frozen_model(Recorder(w=3.0, b=-1.0))
    for bs in (1, 4, 11, 32):
        out = model.predict(x, batch_size=bs)
        assert isinstance(out, np.ndarray) and out.shape == (11, 1)
        np.testing.assert_allclose(out, 3.0 * x - 1.0, rtol=1e-12)


def test_predict_steps_and_callbacks():
    x = row_ids(10)
    batches = []

    class Watch(Callback):
        def on_predict_batch_end(self, batch, logs=None):
            batches.append((batch, logs["outputs"].shape[0]))

    out = frozen_model(Recorder()).predict(x, batch_size=4, steps=2, callbacks=[Watch()])
    np.testing.assert_array_equal(out[:, 0], np.arange(8))
    assert batches == [(0, 4), (1, 4)]


def test_predict_works_without_compile_and_in_eval_mode():
    rec = Recorder(w=2.0)
    model = dfit.Model(rec)
    np.testing.assert_allclose(model.predict(row_ids(3)), 2.0 * row_ids(3))
    assert [t for t, _ in rec.calls] == [False]
    assert rec.training  # restored afterwards


def test_predict_ignores_targets_in_a_tensor_dataset():
    x, y = _data(5)
    out = frozen_model(Recorder(w=2.0)).predict(TensorDataset(torch.tensor(x), torch.tensor(y)))
    np.testing.assert_allclose(out, 2.0 * x, rtol=1e-12)


# -- single batches -------------------------------------------------------------------------------------------
def test_train_on_batch_is_one_sgd_step_on_the_whole_batch():
    x, y = _data(6)
    w = RNG.uniform(0.5, 1.5, size=6)
    module = fixed_linear([[0.3]], [0.1])
    model = dfit.Model(module)
    model.compile(optimizer=lambda p: torch.optim.SGD(p, lr=0.2), loss="mse", metrics=["mae"])
    loss, mae = model.train_on_batch(x, y, sample_weight=w)

    ref = fixed_linear([[0.3]], [0.1])
    xt, yt, wt = (torch.tensor(a) for a in (x, y, w))
    pred0 = ref(xt)
    ref_loss = (wt * ((pred0 - yt) ** 2).mean(-1)).sum() / 6
    ref_loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.2 * p.grad
    assert loss == pytest.approx(ref_loss.item(), rel=1e-12)
    assert mae == pytest.approx((pred0 - yt).abs().mean().item(), rel=1e-12)
    torch.testing.assert_close(module.weight, ref.weight, rtol=1e-12, atol=0)
    torch.testing.assert_close(module.bias, ref.bias, rtol=1e-12, atol=0)


def test_train_on_batch_class_weight_and_return_dict():
    x = RNG.normal(size=(4, 1))
    labels = np.array([[0.0], [1.0], [1.0], [0.0]])
    model = frozen_model(Recorder(w=0.5))
    logs = model.train_on_batch(x, labels, class_weight={1: 3.0}, return_dict=True)
    per = mse_rows(0.5 * x, labels)
    assert logs == {"loss": pytest.approx((np.array([1, 3, 3, 1]) * per).sum() / 4, rel=1e-12)}


def test_test_on_batch_and_predict_on_batch():
    x, y = _data(7)
    rec = Recorder(w=-1.0, b=0.5)
    model = frozen_model(rec, metrics=["mae"])
    loss, mae = model.test_on_batch(x, y)
    pred = -x + 0.5
    assert loss == pytest.approx(mse_rows(pred, y).mean(), rel=1e-12)
    assert mae == pytest.approx(np.abs(pred - y).mean(), rel=1e-12)
    assert model.test_on_batch(x, y, return_dict=True)["loss"] == pytest.approx(loss)
    rec.calls.clear()
    np.testing.assert_allclose(model.predict_on_batch(x), pred, rtol=1e-12)
    assert [len(c) for _, c in rec.calls] == [7]  # one batch, however large


# -- deprecated aliases ---------------------------------------------------------------------------------------
def test_deprecated_aliases_warn_and_delegate():
    x, y = _data(6)
    ds = TensorDataset(torch.tensor(x), torch.tensor(y))
    model = frozen_model(Recorder(w=0.5))
    with pytest.warns(DeprecationWarning, match="fit_generator"):
        history = model.fit_generator(ds, epochs=2, verbose=0)
    assert history.epoch == [0, 1]
    assert history.history["loss"][0] == pytest.approx(mse_rows(0.5 * x, y).mean(), rel=1e-12)
    with pytest.warns(DeprecationWarning, match="evaluate_generator"):
        assert model.evaluate_generator(ds, verbose=0) == pytest.approx(mse_rows(0.5 * x, y).mean(), rel=1e-12)
    with pytest.warns(DeprecationWarning, match="predict_generator"):
        np.testing.assert_allclose(model.predict_generator(TensorDataset(torch.tensor(x))), 0.5 * x)
    with pytest.warns(DeprecationWarning, match="predict_proba"):
        np.testing.assert_allclose(model.predict_proba(x), 0.5 * x)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        model.predict(x)  # the real names do not warn


def test_fit_generator_takes_keras_positional_arguments():
    """Keras 2: fit_generator(generator, steps_per_epoch, epochs=1, verbose=1, ...)."""
    x, y = _data(6)
    rec = Recorder()
    model = frozen_model(rec)
    with pytest.warns(DeprecationWarning):
        history = model.fit_generator(TensorDataset(torch.tensor(x), torch.tensor(y)), 2, 3, 0)
    assert history.epoch == [0, 1, 2]
    assert history.params["steps"] == 2
    with pytest.warns(DeprecationWarning):
        assert model.fit_generator(TensorDataset(torch.tensor(x), torch.tensor(y)), verbose=0).epoch == [0]
    with pytest.warns(DeprecationWarning):  # evaluate_generator(generator, steps, ...)
        loss = model.evaluate_generator(TensorDataset(torch.tensor(x), torch.tensor(y)), 1)
    assert loss == pytest.approx(mse_rows(x, y).mean(), rel=1e-12)  # one batch of 32 holds all 6 rows


# -- summary, config, layers ----------------------------------------------------------------------------------
def _mlp():
    torch.manual_seed(0)
    return dfit.Sequential([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False), nn.Softmax(dim=-1)])


def test_summary_text_lists_layers_shapes_and_parameter_counts(capsys):
    model = _mlp()
    model.summary()
    text = capsys.readouterr().out
    assert text.splitlines()[0] == 'Model: "sequential"'
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "linear (Linear)" in text and "relu (ReLU)" in text and "linear_1 (Linear)" in text
    assert "Total params: 64" in text  # 4*8+8 + 8*3
    assert "Trainable params: 64" in text and "Non-trainable params: 0" in text
    model.compile("sgd", "categorical_crossentropy")
    model.fit(np.zeros((2, 4), np.float32), np.eye(3)[[0, 1]], epochs=1, verbose=0)
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert "(None, 8)" in text and "(None, 3)" in text  # output shapes once data was seen


def test_summary_counts_frozen_parameters():
    model = _mlp()
    for p in model.get_layer("linear").parameters():
        p.requires_grad_(False)
    lines = []
    model.summary(print_fn=lines.append)
    assert "Trainable params: 24" in lines[0] and "Non-trainable params: 40" in lines[0]
    assert model.count_params() == 64


def test_get_layer_by_name_and_index_and_pop_layer():
    model = _mlp()
    assert model.get_layer("linear").out_features == 8
    assert model.get_layer("linear_1").out_features == 3
    assert model.get_layer(index=1) is model.get_layer("relu")
    assert model.get_layer(index=-1) is model.layers[-1]
    with pytest.raises(ValueError, match="No such layer"):
        model.get_layer("dense")
    with pytest.raises(ValueError, match="out of range"):
        model.get_layer(index=4)
    with pytest.raises(ValueError, match="exactly one"):
        model.get_layer()
    last = model.pop_layer()
    assert isinstance(last, nn.Softmax) and len(model.layers) == 3
    model.add(nn.Sigmoid())
    assert [type(layer).__name__ for layer in model.layers] == ["Linear", "ReLU", "Linear", "Sigmoid"]
    assert model.get_layer("sigmoid") is model.layers[-1]
    for _ in range(4):
        model.pop_layer()
    with pytest.raises(ValueError, match="no layers"):
        model.pop_layer()


def test_sequential_add_with_duplicate_name_is_rejected():
    model = dfit.Sequential()
    model.add(nn.Linear(2, 2), name="dense")
    with pytest.raises(ValueError, match="already exists"):
        model.add(nn.Linear(2, 2), name="dense")


def test_get_config_from_config_round_trip():
    model = dfit.Sequential([nn.Linear(4, 8), nn.Tanh(), nn.Dropout(p=0.25), nn.Linear(8, 3, bias=False),
                             nn.LayerNorm(3, eps=1e-3)], name="mlp")
    config = model.get_config()
    json.dumps(config)  # plain data
    assert config["name"] == "mlp"
    assert [e["name"] for e in config["layers"]] == ["linear", "tanh", "dropout", "linear_1", "layernorm"]
    rebuilt = dfit.Sequential.from_config(config)
    assert rebuilt.name == "mlp"
    assert [type(layer) for layer in rebuilt.layers] == [type(layer) for layer in model.layers]
    a, b = rebuilt.get_layer("linear_1"), model.get_layer("linear_1")
    assert (a.in_features, a.out_features, a.bias) == (8, 3, None)
    assert rebuilt.get_layer("dropout").p == 0.25
    assert rebuilt.get_layer("layernorm").eps == 1e-3
    assert rebuilt.get_layer("layernorm").normalized_shape == (3,)
    assert rebuilt.get_config() == config
    assert rebuilt.count_params() == model.count_params()


def test_from_config_with_custom_objects():
    class Scale(nn.Module):
        def __init__(self, factor: float = 2.0):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    model = dfit.Sequential([nn.Linear(2, 2), Scale(3.5)])
    config = model.get_config()
    with pytest.raises(ValueError, match="custom_objects"):
        dfit.Sequential.from_config(config)
    rebuilt = dfit.Sequential.from_config(config, custom_objects={"Scale": Scale})
    assert rebuilt.get_layer("scale").factor == 3.5


def test_get_config_of_a_custom_module_needs_its_get_config():
    with pytest.raises(NotImplementedError, match="get_config"):
        dfit.Model(Recorder()).get_config()


def test_get_and_set_weights():
    model = _mlp()
    weights = model.get_weights()
    assert [w.shape for w in weights] == [(8, 4), (8,), (3, 8)]
    other = _mlp()
    other.set_weights([w + 1 for w in weights])
    for w, v in zip(weights, other.get_weights()):
        np.testing.assert_array_equal(w + 1, v)
    with pytest.raises(ValueError, match="expected 3 arrays"):
        other.set_weights(weights[:2])


# -- compile and optimizers -----------------------------------------------------------------------------------
KERAS_CLASSES = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "rmsprop": "RMSprop", "adagrad": "Adagrad",
                 "adadelta": "Adadelta", "adamax": "Adamax", "nadam": "Nadam"}


def _keras():
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("the Keras reference needs KERAS_BACKEND=torch")
    return keras


@pytest.mark.parametrize("name", sorted(KERAS_CLASSES))
def test_compile_with_each_keras_optimizer_name(name):
    """A Keras name gives Keras' optimizer with Keras' defaults: two fit steps equal Keras' own optimizer."""
    keras = _keras()
    assert dfit.optimizers.names() == sorted(KERAS_CLASSES)
    module = fixed_linear([[0.5]], [0.25], dtype=torch.float32)
    model = dfit.Model(module)
    model.compile(optimizer=name, loss="mse")
    assert type(model.optimizer) is getattr(dfit.optimizers, KERAS_CLASSES[name])
    reference = keras.optimizers.get(name)
    assert type(reference).__name__ == KERAS_CLASSES[name]
    keras_config, ours = reference.get_config(), model.optimizer.get_config()
    shared = set(ours) & set(keras_config) - {"name"}
    assert {"learning_rate", "weight_decay", "clipnorm"} <= shared
    for key in shared:
        expected = keras_config[key]
        assert ours[key] == (expected if expected is None or isinstance(expected, bool)
                             else pytest.approx(expected, rel=1e-7)), key
    x, y = np.array([[1.0], [2.0]], np.float32), np.array([[0.0], [1.0]], np.float32)
    model.fit(x, y, batch_size=2, epochs=2, verbose=0, shuffle=False)
    # Keras' optimizer on the same weights and the same (mean squared error) gradients
    w, b = keras.Variable(np.array([[0.5]], np.float32)), keras.Variable(np.array([0.25], np.float32))
    for _ in range(2):
        wv, bv = keras.ops.convert_to_numpy(w), keras.ops.convert_to_numpy(b)
        residual = x @ wv.T + bv - y
        grads = [(2 * residual * x).mean(0, keepdims=True).astype(np.float32),
                 (2 * residual).mean(0).astype(np.float32)]
        reference.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], [w, b]))
    assert module.weight.item() != 0.5
    np.testing.assert_allclose(module.weight.detach().numpy(), keras.ops.convert_to_numpy(w), rtol=1e-6)
    np.testing.assert_allclose(module.bias.detach().numpy(), keras.ops.convert_to_numpy(b), rtol=1e-6)


def test_default_optimizer_is_rmsprop_and_names_are_case_insensitive():
    keras = _keras()
    model = dfit.Model(nn.Linear(1, 1))
    model.compile(loss="mse")
    assert type(model.optimizer) is dfit.optimizers.RMSprop
    assert isinstance(model.optimizer, torch.optim.Optimizer)
    keras_rms = keras.optimizers.RMSprop().get_config()
    for key in ("learning_rate", "rho", "momentum", "epsilon", "centered"):
        assert getattr(model.optimizer, key) == pytest.approx(keras_rms[key], rel=1e-7), key
    model.compile(optimizer="Adam", loss="mse")
    assert type(model.optimizer) is dfit.optimizers.Adam


def test_optimizer_instances_and_factories():
    module = nn.Linear(1, 1)
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    model = dfit.Model(module)
    model.compile(optimizer=opt, loss="mse")
    assert model.optimizer is opt
    model.compile(optimizer=lambda params: torch.optim.Adam(params, lr=0.25), loss="mse")
    assert isinstance(model.optimizer, torch.optim.Adam) and model.optimizer.param_groups[0]["lr"] == 0.25
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        model.compile(optimizer=lambda params: "adam", loss="mse")


def test_bad_compile_arguments():
    model = dfit.Model(nn.Linear(1, 1))
    with pytest.raises(ValueError, match="Unknown optimizer 'adamm'"):
        model.compile(optimizer="adamm", loss="mse")
    with pytest.raises(TypeError, match="optimizer"):
        model.compile(optimizer=3, loss="mse")
    with pytest.raises(ValueError, match="precision"):
        model.compile(loss="mse", precision="64")
    with pytest.raises(ValueError, match="sample_weight_mode"):
        model.compile(loss="mse", sample_weight_mode="spatial")
    with pytest.raises(TypeError, match="unexpected"):
        model.compile(loss="mse", lossweights=[1.0])
    assert not model.compiled


def test_model_module_is_the_bare_module():
    module = nn.Linear(2, 1)
    model = dfit.Model(module)
    model.compile("sgd", "mse")
    model.fit(np.zeros((3, 2), np.float32), np.zeros((3, 1), np.float32), epochs=1, verbose=0)
    assert model.module is module


def test_config_records_the_layer_dtype():
    model = dfit.Sequential([nn.Linear(2, 3, dtype=F64), nn.ReLU(), nn.LayerNorm(3, dtype=F64)])
    config = model.get_config()
    assert config["layers"][0]["config"]["dtype"] == "float64"
    assert "dtype" not in config["layers"][1]["config"]  # no tensors, nothing to record
    rebuilt = dfit.Sequential.from_config(config)
    assert rebuilt.get_layer("linear").weight.dtype == torch.float64
    assert rebuilt.get_layer("layernorm").weight.dtype == torch.float64
    assert dfit.Sequential.from_config(_mlp().get_config()).get_layer("linear").weight.dtype == torch.float32
    config["layers"][0]["config"]["dtype"] = "float99"
    with pytest.raises(ValueError, match="unknown dtype"):
        dfit.Sequential.from_config(config)
