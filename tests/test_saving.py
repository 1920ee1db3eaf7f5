"""save / load_model / save_weights / load_weights round trips; loading never unpickles code."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from core_helpers import F64

pytestmark = pytest.mark.timeout(60)
RNG = np.random.default_rng(5)


def _trained_sequential():
    torch.manual_seed(1)
    model = dfit.Sequential([nn.Linear(3, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 2, dtype=F64)], name="net")
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    x, y = RNG.normal(size=(12, 3)), RNG.normal(size=(12, 2))
    model.fit(x, y, epochs=2, batch_size=4, verbose=0, seed=0)
    return model, x, y


def _assert_same_weights(a, b):
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)


def test_save_and_load_model_sequential(tmp_path):
    model, x, y = _trained_sequential()
    path = tmp_path / "model.pt"
    model.save(str(path))
    loaded = dfit.load_model(str(path))
    assert isinstance(loaded, dfit.Sequential) and loaded.name == "net"
    _assert_same_weights(model, loaded)
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))
    # compile settings and optimizer state come back: training continues identically
    assert loaded.compiled and type(loaded.optimizer) is dfit.optimizers.Adam
    assert loaded.optimizer.iterations == model.optimizer.iterations == 6
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
    h1 = model.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=3)
    h2 = loaded.fit(x, y, epochs=1, batch_size=4, verbose=0, seed=3)
    assert h1.history == h2.history
    _assert_same_weights(model, loaded)


def test_load_model_without_compile(tmp_path):
    model, x, _ = _trained_sequential()
    model.save(str(tmp_path / "m.pt"))
    loaded = dfit.load_model(str(tmp_path / "m.pt"), compile=False)
    assert not loaded.compiled and loaded.optimizer is None
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(2, 3, dtype=F64)
        self.b = nn.Linear(3, 1, dtype=F64)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_save_and_load_model_custom_module_needs_the_module(tmp_path):
    torch.manual_seed(2)
    model = dfit.Model(Custom())
    model.compile("sgd", "mse")
    x, y = RNG.normal(size=(6, 2)), RNG.normal(size=(6, 1))
    model.fit(x, y, epochs=1, verbose=0)
    with torch.no_grad():
        model.module.calls.fill_(7)
    path = str(tmp_path / "custom.pt")
    model.save(path)
    with pytest.raises(ValueError, match="module="):
        dfit.load_model(path)
    loaded = dfit.load_model(path, module=Custom())
    _assert_same_weights(model, loaded)
    assert loaded.module.calls.item() == 7
    assert type(loaded.optimizer) is dfit.optimizers.SGD
    np.testing.assert_array_equal(loaded.predict(x), model.predict(x))


def test_save_weights_and_load_weights(tmp_path):
    model, x, _ = _trained_sequential()
    path = str(tmp_path / "w.pt")
    model.save_weights(path)
    fresh = dfit.Sequential([nn.Linear(3, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 2, dtype=F64)])
    assert not np.array_equal(fresh.predict(x), model.predict(x))
    fresh.load_weights(path)
    _assert_same_weights(model, fresh)
    np.testing.assert_array_equal(fresh.predict(x), model.predict(x))
    # the file is a plain state dict, readable by torch without dfit and without unpickling code
    state = torch.load(path, weights_only=True)
    assert set(state) == set(model.module.state_dict())
    # load_weights also reads the weights out of a full model file
    model.save(str(tmp_path / "full.pt"))
    other = dfit.Sequential([nn.Linear(3, 5, dtype=F64), nn.Tanh(), nn.Linear(5, 2, dtype=F64)])
    other.load_weights(str(tmp_path / "full.pt"))
    _assert_same_weights(model, other)


def test_load_weights_into_the_wrong_architecture_fails(tmp_path):
    model, _, _ = _trained_sequential()
    model.save_weights(str(tmp_path / "w.pt"))
    wrong = dfit.Sequential([nn.Linear(3, 4, dtype=F64)])
    with pytest.raises(ValueError, match=r"w\.pt does not fit this model \(Sequential\): unexpected keys: "
                       r"linear_1\.weight, linear_1\.bias; shape mismatches: linear\.weight \(file \(5, 3\), "
                       r"model \(4, 3\)\), linear\.bias"):
        wrong.load_weights(str(tmp_path / "w.pt"))


def test_full_model_file_loads_with_weights_only(tmp_path):
    model, _, _ = _trained_sequential()
    model.save(str(tmp_path / "m.pt"))
    payload = torch.load(str(tmp_path / "m.pt"), weights_only=True)
    assert payload["format"].startswith("dfit.model/")
    assert payload["kind"] == "Sequential"


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_loading_never_unpickles_code(tmp_path):
    path = str(tmp_path / "evil.pt")
    with open(path, "wb") as fh:
        pickle.dump({"state_dict": _Exploit()}, fh)
    model = dfit.Sequential([nn.Linear(1, 1)])
    with pytest.raises(ValueError, match="evil.pt is not a readable checkpoint"):
        model.load_weights(path)
    with pytest.raises(ValueError, match="evil.pt is not a readable checkpoint"):
        dfit.load_model(path)


def test_load_model_of_a_weights_file_is_a_clear_error(tmp_path):
    model, _, _ = _trained_sequential()
    model.save_weights(str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="load_weights"):
        dfit.load_model(str(tmp_path / "w.pt"))


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path):
    model, _, _ = _trained_sequential()
    target = tmp_path / "sub" / "model.pt"
    model.save(str(target))
    model.save(str(target))  # overwrite in place
    assert sorted(os.listdir(tmp_path / "sub")) == ["model.pt"]


def test_save_of_an_uncompiled_model_loads_uncompiled(tmp_path):
    model = dfit.Sequential([nn.Linear(2, 2)])
    model.save(str(tmp_path / "m.pt"))
    loaded = dfit.load_model(str(tmp_path / "m.pt"))
    assert not loaded.compiled
    _assert_same_weights(model, loaded)


def test_multi_output_losses_survive_save_and_load(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(1, 2, dtype=F64)

        def forward(self, x):
            out = self.lin(x)
            return {"a": out[:, :1], "b": out[:, 1:]}

    model = dfit.Model(Two())
    model.compile("sgd", loss={"a": "mse", "b": "mae"}, loss_weights={"a": 1.0, "b": 3.0})
    x = RNG.normal(size=(5, 1))
    y = {"a": RNG.normal(size=(5, 1)), "b": RNG.normal(size=(5, 1))}
    model.save(str(tmp_path / "m.pt"))
    loaded = dfit.load_model(str(tmp_path / "m.pt"), module=Two())
    assert loaded.evaluate(x, y, verbose=0) == model.evaluate(x, y, verbose=0)
