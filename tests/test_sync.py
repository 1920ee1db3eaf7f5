"""N ranks equal 1 rank for BatchNorm (global-batch statistics) and for parameters that get no gradient.

float64 and plain SGD (so every gradient shows in the weights); relative differences < 1e-9. The N-rank runs
of each world size happen once (a module-scoped cache) and every test reads its part.
"""
from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from ranks import _plain, run_ranks
from test_invariance import assert_close

pytestmark = pytest.mark.timeout(300)


# -- models and data -------------------------------------------------------------------------------------
def make_bn_module(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "conv":
        module = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                               nn.Linear(3 * 4 * 4, 3))
    elif kind == "conv3d-no-affine":
        module = nn.Sequential(nn.Conv3d(1, 2, 2), nn.BatchNorm3d(2, affine=False), nn.ReLU(), nn.Flatten(),
                               nn.Linear(2 * 2 * 2 * 2, 3))
    else:
        bn = {"mlp": dict(), "mlp-cumulative": dict(momentum=None, affine=False),
              "mlp-no-running-stats": dict(track_running_stats=False)}[kind]
        module = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, **bn), nn.ReLU(), nn.Linear(8, 3))
    return module.double()


def make_x(kind: str, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = {"conv": (n, 2, 4, 4), "conv3d-no-affine": (n, 1, 3, 3, 3)}.get(kind, (n, 5))
    return rng.normal(loc=1.5, size=shape)


def compiled(module: nn.Module, **options):
    import dfit

    model = dfit.Model(module)
    model.compile(optimizer=torch.optim.SGD(module.parameters(), lr=0.1), loss=nn.CrossEntropyLoss(),
                  metrics=["accuracy"], **options)
    return model


# n=46, validation_split=0.25: 34 training rows, so batch 8 ends with a global batch of 2 rows (on 3 ranks
# one rank has none, on 2 ranks each has one row: per-rank statistics could not even be computed).
N, BATCH = 46, 8


def train_bn(kind: str, batch_size: int = BATCH, epochs: int = 2, **options):
    rng = np.random.default_rng(1)
    x, y = make_x(kind, N), rng.integers(0, 3, size=N)
    model = compiled(make_bn_module(kind), **options)
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs, validation_split=0.25, seed=5, verbose=0)
    state = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
    evaluation = model.evaluate(x, y, batch_size=7, verbose=0, return_dict=True)
    predictions = model.predict(x, batch_size=6)
    return history.history, state, evaluation, predictions


def one_step_gradients(kind: str, find_unused_parameters: bool | None = False):
    """Parameter gradients of one training step on one global batch of 11 rows (uneven over 2 ranks):
    averaged by DDP (False) or, in auto mode's first step, by dfit (None)."""
    rng = np.random.default_rng(2)
    x, y = make_x(kind, 11, seed=3), rng.integers(0, 3, size=11)
    model = compiled(make_bn_module(kind), find_unused_parameters=find_unused_parameters)
    model.train_on_batch(x, y)
    return {name: p.grad.detach().clone() for name, p in model.module.named_parameters()}


BN_KINDS = ["mlp", "mlp-cumulative", "mlp-no-running-stats", "conv", "conv3d-no-affine"]


# -- the function itself: forward, running statistics and gradients against torch on the whole batch ----
FUNCTION_CASES = {"1d": (nn.BatchNorm1d, (9, 4)), "1d-length": (nn.BatchNorm1d, (9, 4, 3)),
                  "2d": (nn.BatchNorm2d, (9, 3, 2, 2)), "3d": (nn.BatchNorm3d, (9, 2, 2, 2, 2)),
                  "3d-zero-rows": (nn.BatchNorm3d, (2, 2, 2, 1, 2))}


def _function_case(name: str, rows: slice | None):
    """A BatchNorm layer (synchronised when ``rows`` is a slice), a fixed input and the loss weights."""
    from dfit import batchnorm

    cls, shape = FUNCTION_CASES[name]
    torch.manual_seed(7)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    weights = torch.randn(shape, dtype=torch.float64)
    layer = cls(shape[1], momentum=0.3).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-1, 1)
        layer.running_mean.fill_(2.0)
    if rows is not None:
        batchnorm.set_synchronized(layer, True)
        x, weights = x[rows], weights[rows]
    return layer, x.clone().requires_grad_(), weights


def function_results(names: list[str]):
    """Each rank: its rows' outputs and input gradients, the layer's parameter gradients summed over ranks
    (the gradient of the SUM of the ranks' losses) and the running statistics after two steps."""
    from dfit import distributed as dist
    from dfit.data.sharding import part_bounds

    dist.init()
    world, rank = dist.world_size(), dist.rank()
    out = {}
    for name in names:
        n = FUNCTION_CASES[name][1][0]
        rows = slice(*part_bounds(n, world, rank)) if world > 1 else slice(None)
        layer, x, w = _function_case(name, rows if world > 1 else None)
        for _ in range(2):
            y = layer(x)
        (y * w).sum().backward()
        grads = {k: dist.all_reduce_sum(p.grad) for k, p in layer.named_parameters()}
        out[name] = {"y": y.detach(), "dx": x.grad, "grads": grads, "running_mean": layer.running_mean.clone(),
                     "running_var": layer.running_var.clone(), "rows": (rows.start, rows.stop)}
    return out


def test_global_batch_norm_equals_torch_on_the_whole_batch():
    names = sorted(FUNCTION_CASES)
    many = run_ranks(function_results, 3, names)
    one = _plain(function_results(names))
    for name in names:
        full = one[name]
        assert any(r[name]["rows"][0] == r[name]["rows"][1] for r in many) == (name == "3d-zero-rows")
        for rank, result in enumerate(many):
            got = result[name]
            start, stop = got["rows"]
            assert_close(got["y"], full["y"][start:stop], f"{name} rank {rank} output")
            assert_close(got["dx"], full["dx"][start:stop], f"{name} rank {rank} input gradient")
            for key in ("running_mean", "running_var"):
                assert_close(got[key], full[key], f"{name} rank {rank} {key}")
            for key in full["grads"]:
                assert_close(got["grads"][key], full["grads"][key], f"{name} rank {rank} grad {key}")


# -- fit / evaluate / predict on 1, 2 and 3 ranks -----------------------------------------------------------
def run_all(world: int):
    results = {kind: train_bn(kind) for kind in BN_KINDS}
    results["gradients"] = {(kind, setting): one_step_gradients(kind, setting)
                            for kind in ("mlp", "conv") for setting in (False, None)}
    if world == 2:
        results["per-rank"] = train_bn("mlp", batch_size=10, sync_batchnorm=False)
        results["unused"] = unused_cases()
    return results


_RESULTS: dict[int, list] = {}


def ranks_results(world: int) -> list:
    if world not in _RESULTS:
        _RESULTS[world] = run_ranks(run_all, world, world, timeout=240)
    return _RESULTS[world]


def compare_runs(one, many, tag: str):
    history, state, evaluation, predictions = one
    for rank, (h, s, ev, p) in enumerate(many):
        where = f"{tag} rank {rank}"
        assert list(h) == list(history)
        for key in history:
            assert_close(h[key], history[key], f"{where} history[{key!r}]")
        assert list(s) == list(state)
        for key in state:
            assert_close(s[key], state[key], f"{where} state {key}")
        for key in evaluation:
            assert_close(ev[key], evaluation[key], f"{where} evaluate[{key!r}]")
        assert_close(p, predictions, f"{where} predict")


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("kind", BN_KINDS)
def test_batchnorm_fit_equals_one_rank(world, kind):
    one = _plain(train_bn(kind))
    assert one[0]["loss"][0] != one[0]["loss"][1] and "val_loss" in one[0]
    compare_runs(one, [r[kind] for r in ranks_results(world)], f"{kind} world {world}")


def test_running_statistics_are_trained():
    """Guards the invariance test: the buffers moved and the layer sees a mean far from 0."""
    _, state, _, _ = train_bn("mlp")
    assert int(state["1.num_batches_tracked"]) == 2 * 5
    assert not torch.allclose(state["1.running_mean"], torch.zeros(8, dtype=torch.float64))
    assert not torch.allclose(state["1.running_var"], torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("setting", [False, None])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_one_step_gradients_equal_one_rank(kind, setting):
    one = _plain(one_step_gradients(kind))
    for rank, result in enumerate(ranks_results(2)):
        got = result["gradients"][(kind, setting)]
        assert list(got) == list(one)
        # The Linear bias in front of BatchNorm has a gradient of 0 in exact arithmetic (rounding noise of
        # 1e-17 in practice), so the tolerance is relative to the largest gradient of the model.
        largest = max(np.abs(g).max() for g in one.values())
        assert largest > 1e-3
        for name in one:
            worst = np.abs(got[name] - one[name]).max()
            assert worst <= 1e-9 * largest, f"rank {rank} gradient {name}: difference {worst:.3e}"


def test_per_rank_statistics_change_the_result():
    """sync_batchnorm=False: each rank normalises by its own rows, so 2 ranks differ from 1 rank."""
    one = _plain(train_bn("mlp", batch_size=10, sync_batchnorm=False))
    synced_one = _plain(train_bn("mlp", batch_size=10))
    assert_close(one[0]["loss"], synced_one[0]["loss"], "1 rank does not depend on sync_batchnorm")
    for result in ranks_results(2):
        history = result["per-rank"][0]
        assert abs(history["loss"][0] - one[0]["loss"][0]) > 1e-4


# -- the layer swap keeps names, keys, configs and saving ----------------------------------------------
def test_synchronised_layers_keep_keys_config_and_pickle_as_torch_classes(tmp_path):
    import dfit
    from dfit import batchnorm

    model = dfit.Sequential([nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)])
    keys, config = list(model.module.state_dict()), model.get_config()
    assert batchnorm.set_synchronized(model.module, True) == ["batchnorm1d", "batchnorm2d"]
    layer = model.get_layer("batchnorm1d")
    assert type(layer) is not nn.BatchNorm1d and isinstance(layer, nn.BatchNorm1d)
    assert type(layer).__name__ == "BatchNorm1d"
    assert list(model.module.state_dict()) == keys and model.get_config() == config
    assert type(copy.deepcopy(layer)) is nn.BatchNorm1d
    assert type(pickle.loads(pickle.dumps(model.module))[1]) is nn.BatchNorm1d
    model.compile(optimizer="sgd", loss="mse")
    model.save(str(tmp_path / "m.pt"))
    loaded = dfit.load_model(str(tmp_path / "m.pt"))
    assert type(loaded.get_layer("batchnorm1d")) is nn.BatchNorm1d
    assert list(loaded.module.state_dict()) == keys
    # On one process the synchronised layer is torch's layer.
    x = torch.randn(6, 5)
    plain = copy.deepcopy(model.module[:2])
    assert torch.equal(model.module[:2](x), plain(x))
    assert torch.equal(model.module[1].running_mean, plain[1].running_mean)
    batchnorm.set_synchronized(model.module, False)
    assert type(model.get_layer("batchnorm1d")) is nn.BatchNorm1d


def test_one_process_leaves_batchnorm_classes_alone():
    x, y = make_x("mlp", 20), np.arange(20) % 3
    model = compiled(make_bn_module("mlp"))
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert type(model.module[1]) is nn.BatchNorm1d
    assert model._engine.synced_batchnorms == [] and model._engine.find_unused_parameters is False


@pytest.mark.parametrize("option, value", [("sync_batchnorm", 1), ("sync_batchnorm", None),
                                           ("find_unused_parameters", "auto")])
def test_compile_rejects_bad_options(option, value):
    with pytest.raises(TypeError, match=option):
        compiled(make_bn_module("mlp"), **{option: value})


# -- parameters that get no gradient ----------------------------------------------------------------------
class TwoHeads(nn.Module):
    """Outputs "a" and "b"; fits get targets for "a" only, and one branch is never called."""

    def __init__(self):
        super().__init__()
        self.body, self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 2), nn.Linear(6, 3)
        self.unused_branch = nn.Linear(6, 6)  # trainable, never called

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"a": self.a(h), "b": self.b(h)}


class ExtraOnFirstCall(nn.Module):
    """``extra`` adds to the output on the first call only: every parameter is used on the first step."""

    def __init__(self):
        super().__init__()
        self.main, self.extra, self.calls = nn.Linear(4, 2), nn.Linear(4, 2), 0

    def forward(self, x):
        self.calls += 1
        return self.main(x) + self.extra(x) if self.calls == 1 else self.main(x)


def train_two_heads(find_unused_parameters=None, epochs=2):
    import dfit

    rng = np.random.default_rng(4)
    x, ya = rng.normal(size=(23, 4)), rng.normal(size=(23, 2))
    torch.manual_seed(0)
    module = TwoHeads().double()
    model = dfit.Model(module)
    model.compile(optimizer=torch.optim.SGD(module.parameters(), lr=0.1), loss={"a": "mse"},
                  find_unused_parameters=find_unused_parameters)
    history = model.fit(x, {"a": ya}, batch_size=5, epochs=epochs, validation_split=0.2, seed=3, verbose=0)
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return history.history, state, model._engine.find_unused_parameters


def _error_of(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the test reads it
        return f"{type(error).__name__}: {error}"
    return None


def unused_cases():
    results = {setting: train_two_heads(setting) for setting in (None, True)}
    results["all-used"] = all_used_decision()
    results["forced-false"] = _error_of(train_two_heads, False)
    results["used-then-not"] = _error_of(_fit_used_on_first_step_only)
    return results


def _fit_used_on_first_step_only():
    import dfit

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 4)), rng.normal(size=(20, 2))
    torch.manual_seed(0)
    model = dfit.Model(ExtraOnFirstCall().double())
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=5, epochs=1, verbose=0)


def all_used_decision():
    import dfit

    rng = np.random.default_rng(4)
    torch.manual_seed(0)
    model = dfit.Sequential([nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)])
    model.compile(optimizer="sgd", loss="mse")
    model.fit(rng.normal(size=(9, 4)), rng.normal(size=(9, 2)), batch_size=4, epochs=1, verbose=0)
    return model._engine.find_unused_parameters


@pytest.mark.parametrize("setting", [None, True])
def test_unused_parameters_train_as_on_one_process(setting):
    history, state, decided = train_two_heads(setting)
    assert decided is False  # one process never needs DDP's search
    assert history["loss"][0] != history["loss"][1]
    for rank, result in enumerate(ranks_results(2)):
        h, s, decided_n = result["unused"][setting]
        assert decided_n is True
        for key in history:
            assert_close(h[key], history[key], f"rank {rank} history[{key!r}]")
        for key in state:
            assert_close(s[key], _plain(state[key]), f"rank {rank} weight {key}")
    torch.manual_seed(0)
    initial = TwoHeads().double().state_dict()
    assert torch.equal(state["unused_branch.weight"], initial["unused_branch.weight"])  # never used: untouched
    assert torch.equal(state["b.weight"], initial["b.weight"])  # no target for "b": no gradient either
    assert not torch.equal(state["a.weight"], initial["a.weight"])


def test_auto_mode_keeps_ddp_cheap_when_every_parameter_is_used():
    assert all(result["unused"]["all-used"] is False for result in ranks_results(2))


def test_forced_false_raises_a_clear_error_on_every_rank():
    for result in ranks_results(2):
        message = result["unused"]["forced-false"]
        assert message is not None
        with pytest.raises(RuntimeError, match=r"compiled with find_unused_parameters=False.*b\.weight, b\.bias"
                                               r".*unused_branch\.weight.*compile\(\.\.\., find_unused_parameters"
                                               r"=True\)"):
            raise RuntimeError(message)
        assert "Expected to have finished reduction" not in message


def test_parameters_unused_after_the_first_step_raise_a_clear_error():
    for result in ranks_results(2):
        message = result["unused"]["used-then-not"]
        with pytest.raises(RuntimeError, match=r"checks only the first training step.*extra\.weight, "
                                               r"extra\.bias.*find_unused_parameters=True"):
            raise RuntimeError(message)
        assert "Expected to have finished reduction" not in message
