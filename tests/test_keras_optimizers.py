"""dfit.optimizers' Keras-rule optimizers and schedules, against Keras 3 itself and against hand formulas."""
from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit import optimizers
from dfit.optimizers import schedules
from core_helpers import fixed_linear

pytestmark = pytest.mark.timeout(120)

SHAPES = [(3, 4), (4,), (2, 1)]
STEPS = 5

# (dfit/Keras class name, keyword arguments): every optimizer with its defaults and non-default settings.
CASES = [
    ("SGD", {}),
    ("SGD", {"momentum": 0.9}),
    ("SGD", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"learning_rate": 0.1, "clipnorm": 0.5}),
    ("Adam", {}),
    ("Adam", {"amsgrad": True, "beta_1": 0.8, "beta_2": 0.95}),
    ("Adam", {"learning_rate": 0.01, "weight_decay": 0.1}),
    ("Adam", {"global_clipnorm": 1.0}),
    ("AdamW", {}),
    ("AdamW", {"weight_decay": 0.05, "amsgrad": True, "clipvalue": 0.5}),
    ("RMSprop", {}),
    ("RMSprop", {"momentum": 0.9, "centered": True}),
    ("RMSprop", {"centered": True, "rho": 0.8, "epsilon": 1e-3}),
    ("RMSprop", {"clipvalue": 0.3, "momentum": 0.5}),
    ("Adagrad", {}),
    ("Adagrad", {"initial_accumulator_value": 0.5, "epsilon": 1e-4, "clipnorm": 1.0}),
    ("Adadelta", {}),
    ("Adadelta", {"learning_rate": 1.0, "rho": 0.9, "global_clipnorm": 0.5}),
    ("Adamax", {}),
    ("Adamax", {"beta_1": 0.8, "beta_2": 0.99, "clipvalue": 0.2}),
    ("Nadam", {}),
    ("Nadam", {"beta_1": 0.95, "weight_decay": 0.01, "clipnorm": 0.7}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'defaults'}" for name, kw in CASES]


def _problem(seed: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    weights = [(rng.normal(size=s) * 0.01).astype(dtype) for s in SHAPES]  # small: an update is not lost in w
    grads = [[rng.normal(size=s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return weights, grads


def _run_dfit(name, kwargs, weights, grads):
    params = [nn.Parameter(torch.tensor(w)) for w in weights]
    opt = getattr(optimizers, name)(**kwargs).bind(params)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = torch.tensor(g)
        opt.step()
    return [p.detach().numpy() for p in params], opt


def _run_keras(name, kwargs, weights, grads):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("the Keras comparison needs KERAS_BACKEND=torch")
    variables = [keras.Variable(w) for w in weights]
    opt = getattr(keras.optimizers, name)(**kwargs)
    for step_grads in grads:
        opt.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in step_grads], variables))
    return [keras.ops.convert_to_numpy(v) for v in variables]


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_several_steps_match_keras_in_float32(name, kwargs):
    weights, grads = _problem(seed=len(kwargs) + len(name))
    ours, opt = _run_dfit(name, kwargs, weights, grads)
    theirs = _run_keras(name, kwargs, weights, grads)
    assert opt.iterations == STEPS
    for ours_w, keras_w, w0 in zip(ours, theirs, weights):
        scale = np.abs(keras_w).max()
        assert np.abs(ours_w - keras_w).max() <= 1e-6 * scale
        # the weights moved far more than the tolerance, so a wrong rule could not pass
        assert np.abs(keras_w - w0).max() > 100 * 1e-6 * scale


def _clip(grads, kw):
    if kw.get("clipnorm"):
        return [g * kw["clipnorm"] / max(np.sqrt((g * g).sum()), kw["clipnorm"]) for g in grads]
    if kw.get("global_clipnorm"):
        total = np.sqrt(sum((g * g).sum() for g in grads))
        return [g * kw["global_clipnorm"] / max(total, kw["global_clipnorm"]) for g in grads]
    if kw.get("clipvalue"):
        return [np.clip(g, -kw["clipvalue"], kw["clipvalue"]) for g in grads]
    return grads


def _first_step_by_hand(name, kw, w, g):
    """Keras' first update (t = 1, zero/initial state) written out in numpy float64."""
    get = lambda key, default: kw.get(key, default)  # noqa: E731
    lr = get("learning_rate", 0.01 if name == "SGD" else 0.001)
    wd = get("weight_decay", 0.004 if name == "AdamW" else None)
    if wd:
        w = w * (1 - wd * lr)
    eps = get("epsilon", 1e-7)
    if name == "SGD":
        mom = get("momentum", 0.0)
        if mom == 0:
            return w - lr * g
        m = -lr * g
        return w + mom * m - lr * g if get("nesterov", False) else w + m
    if name in ("Adam", "AdamW"):
        b1, b2 = get("beta_1", 0.9), get("beta_2", 0.999)
        m, v = (1 - b1) * g, (1 - b2) * g * g
        return w - lr * np.sqrt(1 - b2) / (1 - b1) * m / (np.sqrt(v) + eps)
    if name == "RMSprop":
        rho = get("rho", 0.9)
        v = (1 - rho) * g * g
        denom = v + eps - ((1 - rho) * g) ** 2 if get("centered", False) else v + eps
        return w - lr * g / np.sqrt(denom)  # with momentum the first buffer is this same increment
    if name == "Adagrad":
        acc = get("initial_accumulator_value", 0.1) + g * g
        return w - lr * g / np.sqrt(acc + eps)
    if name == "Adadelta":
        rho = get("rho", 0.95)
        grad_acc = (1 - rho) * g * g
        delta = -np.sqrt(0.0 + eps) / np.sqrt(grad_acc + eps) * g
        return w + lr * delta
    if name == "Adamax":
        b1 = get("beta_1", 0.9)
        m, u = (1 - b1) * g, np.abs(g)
        return w - lr * m / ((u + eps) * (1 - b1))
    if name == "Nadam":
        b1, b2 = get("beta_1", 0.9), get("beta_2", 0.999)
        mu1, mu2 = b1 * (1 - 0.5 * 0.96), b1 * (1 - 0.5 * 0.96 ** 2)
        m, v = (1 - b1) * g, (1 - b2) * g * g
        m_hat = mu2 * m / (1 - mu1 * mu2) + (1 - mu1) * g / (1 - mu1)
        return w - lr * m_hat / (np.sqrt(v / (1 - b2)) + eps)
    raise AssertionError(name)


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_first_step_matches_the_formula_in_float64(name, kwargs):
    weights, grads = _problem(seed=3, dtype=np.float64)
    ours, _ = _run_dfit(name, kwargs, weights, grads[:1])
    expected = [_first_step_by_hand(name, kwargs, w, g) for w, g in zip(weights, _clip(grads[0], kwargs))]
    for ours_w, exp_w, w0 in zip(ours, expected, weights):
        assert ours_w.dtype == np.float64
        np.testing.assert_allclose(ours_w, exp_w, rtol=1e-12, atol=1e-15)
        assert np.abs(exp_w - w0).max() > 1e-9


def test_keras_rules_differ_from_torch_rules():
    """The reason for these classes: torch's RMSprop puts epsilon outside the square root."""
    weights, grads = _problem(seed=1, dtype=np.float64)
    ours, _ = _run_dfit("RMSprop", {}, weights, grads[:1])
    params = [nn.Parameter(torch.tensor(w)) for w in weights]
    torch_opt = torch.optim.RMSprop(params, lr=0.001, alpha=0.9, eps=1e-7)
    for p, g in zip(params, grads[0]):
        p.grad = torch.tensor(g)
    torch_opt.step()
    assert max(np.abs(o - p.detach().numpy()).max() for o, p in zip(ours, params)) > 1e-6


# -- API ------------------------------------------------------------------------------------------------------
def test_keras_names_build_the_keras_classes_with_keras_defaults():
    module = nn.Linear(2, 1)
    for name, cls in [("sgd", optimizers.SGD), ("Adam", optimizers.Adam), ("ADAMW", optimizers.AdamW),
                      ("rmsprop", optimizers.RMSprop), ("adagrad", optimizers.Adagrad),
                      ("adadelta", optimizers.Adadelta), ("adamax", optimizers.Adamax), ("nadam", optimizers.Nadam)]:
        opt = optimizers.build(name, module.parameters())
        assert type(opt) is cls and isinstance(opt, torch.optim.Optimizer)
    assert optimizers.build("sgd", module.parameters()).learning_rate == 0.01
    adamw = optimizers.build("adamw", module.parameters())
    assert (adamw.learning_rate, adamw.beta_1, adamw.beta_2, adamw.epsilon, adamw.weight_decay, adamw.amsgrad) == \
        (0.001, 0.9, 0.999, 1e-7, 0.004, False)
    rms = optimizers.build("rmsprop", module.parameters())
    assert (rms.rho, rms.momentum, rms.epsilon, rms.centered) == (0.9, 0.0, 1e-7, False)
    assert optimizers.build("adagrad", module.parameters()).initial_accumulator_value == 0.1
    assert optimizers.build("adadelta", module.parameters()).rho == 0.95


def test_an_object_without_params_is_bound_by_compile_and_kept_on_recompile():
    opt = optimizers.Adam(learning_rate=0.01)
    assert not opt.bound and opt.learning_rate == 0.01 and opt.iterations == 0
    with pytest.raises(RuntimeError, match="no parameters yet"):
        opt.step()
    model = dfit.Model(fixed_linear([[0.5]], [0.0]))
    model.compile(optimizer=opt, loss="mse")
    assert model.optimizer is opt and opt.bound
    model.fit(np.ones((4, 1)), np.zeros((4, 1)), batch_size=2, epochs=1, verbose=0)
    assert opt.iterations == 2 and len(opt.state) == 2
    model.compile(optimizer=opt, loss="mse")
    assert model.optimizer is opt and opt.iterations == 2
    with pytest.raises(ValueError, match="already bound"):
        dfit.Model(nn.Linear(1, 1)).compile(optimizer=opt, loss="mse")
    # the class itself builds one with its defaults
    model.compile(optimizer=optimizers.Nadam, loss="mse")
    assert type(model.optimizer) is optimizers.Nadam and model.optimizer.learning_rate == 0.001


def test_bad_arguments_raise_before_anything_is_built():
    with pytest.raises(ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm`"):
        optimizers.SGD(clipnorm=1.0, clipvalue=1.0)
    with pytest.raises(ValueError, match="momentum"):
        optimizers.SGD(momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        optimizers.AdamW(weight_decay=None)
    with pytest.raises(ValueError, match="learning_rate"):
        optimizers.Adam(learning_rate="fast")
    with pytest.raises(TypeError, match="use_ema"):
        optimizers.Adam(use_ema=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        optimizers.Adam().bind([])


def test_learning_rate_get_set_and_torch_param_groups():
    module = nn.Linear(2, 1)
    opt = optimizers.SGD(learning_rate=0.1).bind(module.parameters())
    opt.learning_rate = 0.2
    assert opt.param_groups[0]["lr"] == 0.2 and opt.learning_rate == 0.2
    opt.param_groups[0]["lr"] = 0.3  # what torch lr_schedulers do
    assert opt.learning_rate == 0.3
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    module.weight.grad = torch.ones_like(module.weight)
    before = module.weight.detach().clone()
    opt.step()
    scheduler.step()
    torch.testing.assert_close(module.weight.detach(), before - 0.3)
    assert opt.learning_rate == pytest.approx(0.15)
    scheduled = optimizers.SGD(learning_rate=schedules.ExponentialDecay(1.0, 1, 0.5))
    with pytest.raises(TypeError, match="schedule"):
        scheduled.learning_rate = 0.1
    scheduled.learning_rate = lambda step: 0.25
    assert scheduled.learning_rate == 0.25
    assert optimizers.Adam(clipnorm=1.0).get_config()["clipnorm"] == 1.0


def test_state_dict_round_trip_continues_iterations_and_the_schedule():
    weights, grads = _problem(seed=5, dtype=np.float64)
    for name, kwargs in [("Nadam", {}), ("Adam", {"amsgrad": True}),
                         ("SGD", {"momentum": 0.9, "learning_rate": schedules.ExponentialDecay(0.1, 2, 0.5)})]:
        straight, _ = _run_dfit(name, kwargs, weights, grads)
        params = [nn.Parameter(torch.tensor(w)) for w in weights]
        opt = getattr(optimizers, name)(**kwargs).bind(params)
        for step_grads in grads[:2]:
            for p, g in zip(params, step_grads):
                p.grad = torch.tensor(g)
            opt.step()
        saved = copy.deepcopy(opt.state_dict())
        assert saved["iterations"] == 2
        resumed = getattr(optimizers, name)(**kwargs).bind(params)
        resumed.load_state_dict(saved)
        assert resumed.iterations == 2 and resumed.learning_rate == opt.learning_rate
        for step_grads in grads[2:]:
            for p, g in zip(params, step_grads):
                p.grad = torch.tensor(g)
            resumed.step()
        for s, p in zip(straight, params):
            np.testing.assert_array_equal(s, p.detach().numpy())


def test_pickle_round_trip_keeps_the_settings():
    import pickle

    opt = optimizers.RMSprop(learning_rate=0.5, centered=True, clipnorm=2.0).bind(nn.Linear(2, 1).parameters())
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.clipnorm == 2.0 and clone.centered and clone.learning_rate == 0.5 and clone.iterations == 0


def test_grad_scaler_unscales_before_the_keras_rule():
    weights, grads = _problem(seed=9)
    expected, _ = _run_dfit("Adam", {"clipnorm": 1.0}, weights, grads[:2])
    params = [nn.Parameter(torch.tensor(w)) for w in weights]
    opt = optimizers.Adam(clipnorm=1.0).bind(params)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for step_grads in grads[:2]:
        opt.zero_grad()
        loss = sum((p * torch.tensor(g)).sum() for p, g in zip(params, step_grads))  # d loss / d p = g
        scaler.scale(loss).backward()
        torch.testing.assert_close(params[0].grad, torch.tensor(step_grads[0]) * 1024.0)
        scaler.unscale_(opt)
        for p, g in zip(params, step_grads):
            torch.testing.assert_close(p.grad, torch.tensor(g))
        scaler.step(opt)
        scaler.update()
    for e, p in zip(expected, params):
        np.testing.assert_allclose(p.detach().numpy(), e, rtol=1e-6, atol=1e-9)
    # an inf gradient skips the step (and does not count it)
    opt.zero_grad()
    scaler.scale((params[0] * float("inf")).sum()).backward()
    before = [p.detach().clone() for p in params]
    scaler.step(opt)
    assert opt.iterations == 2 and all(torch.equal(b, p) for b, p in zip(before, params))


# -- schedules ------------------------------------------------------------------------------------------------
SCHEDULE_STEPS = [0, 1, 3, 5, 9, 10, 14, 25, 37, 100]
SCHEDULES = [
    ("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.5),
     lambda s: 0.1 * 0.5 ** (s / 10)),
    ("ExponentialDecay", dict(initial_learning_rate=0.1, decay_steps=10, decay_rate=0.5, staircase=True),
     lambda s: 0.1 * 0.5 ** (s // 10)),
    ("PiecewiseConstantDecay", dict(boundaries=[5, 14], values=[1.0, 0.5, 0.1]),
     lambda s: 1.0 if s <= 5 else 0.5 if s <= 14 else 0.1),
    ("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=4, decay_rate=0.5),
     lambda s: 0.1 / (1 + 0.5 * s / 4)),
    ("InverseTimeDecay", dict(initial_learning_rate=0.1, decay_steps=4, decay_rate=0.5, staircase=True),
     lambda s: 0.1 / (1 + 0.5 * (s // 4))),
    ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=20, end_learning_rate=0.01, power=2.0),
     lambda s: 0.09 * (1 - min(s, 20) / 20) ** 2 + 0.01),
    ("PolynomialDecay", dict(initial_learning_rate=0.1, decay_steps=20, power=0.5, cycle=True),
     lambda s: (0.1 - 1e-4) * (1 - s / (20 * max(1, math.ceil(s / 20)))) ** 0.5 + 1e-4),
    ("CosineDecay", dict(initial_learning_rate=0.1, decay_steps=30, alpha=0.1),
     lambda s: 0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi * min(s, 30) / 30)) + 0.1)),
    ("CosineDecay", dict(initial_learning_rate=0.0, decay_steps=30, warmup_target=0.2, warmup_steps=10),
     lambda s: 0.2 * s / 10 if s < 10 else 0.2 * 0.5 * (1 + math.cos(math.pi * (min(s, 40) - 10) / 30))),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=10, t_mul=1.0, m_mul=0.5),
     lambda s: 0.1 * 0.5 * 0.5 ** (s // 10) * (1 + math.cos(math.pi * (s % 10) / 10))),
    ("CosineDecayRestarts", dict(initial_learning_rate=0.1, first_decay_steps=10, alpha=0.1),
     # periods of 10, 20, 40, ... steps, starting at steps 0, 10, 30, 70
     lambda s: 0.1 * (0.9 * 0.5 * (1 + math.cos(math.pi * _sgdr_fraction(s))) + 0.1)),
]


def _sgdr_fraction(step):
    start, length = 0, 10
    while step >= start + length:
        start, length = start + length, 2 * length
    return (step - start) / length


@pytest.mark.parametrize("name,kwargs,formula", SCHEDULES, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(SCHEDULES)])
def test_schedules_match_keras_and_the_formula(name, kwargs, formula):
    keras = pytest.importorskip("keras")
    ours = getattr(schedules, name)(**kwargs)
    theirs = getattr(keras.optimizers.schedules, name)(**kwargs)
    assert isinstance(ours, schedules.LearningRateSchedule)
    for step in SCHEDULE_STEPS:
        value = ours(step)
        assert value == pytest.approx(formula(step), rel=1e-12, abs=1e-15), step
        keras_value = float(keras.ops.convert_to_numpy(theirs(step)))
        assert value == pytest.approx(keras_value, rel=1e-6, abs=1e-9), step
    assert type(ours).from_config(ours.get_config())(7) == ours(7)


def test_a_subclassed_schedule_and_bad_schedule_arguments():
    class Halving(schedules.LearningRateSchedule):
        def __call__(self, step):
            return 1.0 / 2 ** step

    opt = optimizers.SGD(learning_rate=Halving()).bind([nn.Parameter(torch.zeros(1))])
    assert opt.learning_rate == 1.0 and opt.param_groups[0]["lr"] == 1.0
    opt.param_groups[0]["params"][0].grad = torch.ones(1)
    opt.step()
    assert opt.learning_rate == 0.5 and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(NotImplementedError, match="must override __call__"):
        schedules.LearningRateSchedule()(0)
    with pytest.raises(ValueError, match="decay_steps"):
        schedules.ExponentialDecay(0.1, 0, 0.5)
    with pytest.raises(ValueError, match="1 less than"):
        schedules.PiecewiseConstantDecay([1, 2], [1.0])


def test_a_schedule_drives_the_learning_rate_per_step_in_fit():
    x, y = np.array([[1.0], [2.0], [-1.0]]), np.array([[0.5], [1.0], [2.0]])
    module = fixed_linear([[0.5]], [0.25])
    model = dfit.Model(module)
    model.compile(optimizer=optimizers.SGD(learning_rate=schedules.ExponentialDecay(0.1, 1, 0.5)), loss="mse")
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0)
    w, b = 0.5, 0.25
    for step in range(3):  # one row per step: d/dw (w x + b - y)^2 = 2 (w x + b - y) x
        lr = 0.1 * 0.5 ** step
        residual = w * x[step, 0] + b - y[step, 0]
        w, b = w - lr * 2 * residual * x[step, 0], b - lr * 2 * residual
    assert module.weight.item() == pytest.approx(w, rel=1e-12)
    assert module.bias.item() == pytest.approx(b, rel=1e-12)
    assert model.optimizer.iterations == 3 and model.optimizer.learning_rate == pytest.approx(0.0125)
