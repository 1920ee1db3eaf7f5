"""A Keras user's script ports unchanged: the Keras guide "Training & evaluation with the built-in methods",
snippet by snippet, in dfit's terms (torch modules for Keras layers), on 1 and 2 ranks.

Each expected value comes from the Keras definition written out here with plain torch (float64), never from
dfit itself: a custom loss must train on exactly the objective its author wrote, in Keras' argument order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ranks import run_ranks

pytestmark = pytest.mark.timeout(240)

N, D, BATCH, EPOCHS, LR = 21, 3, 8, 2, 0.3   # 21 rows: the last global batch has 5 rows


def data(seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, D))
    y = rng.uniform(0.0, 1.0, size=(N, 1))        # soft 0..1 targets: fine for MSE and for BCE
    return x, y


def initial_linear() -> nn.Linear:
    torch.manual_seed(3)
    return nn.Linear(D, 1).double()


# -- the Keras definitions, written out (y_true first, as Keras) --------------------------------------------
def keras_mse(y_true, y_pred):
    return ((y_true - y_pred) ** 2).mean(-1)


def keras_custom_mse(y_true, y_pred, factor=0.1):
    """The guide's CustomMSE: MSE plus a regulariser that pulls predictions to 0.5."""
    return keras_mse(y_true, y_pred) + factor * ((0.5 - y_pred) ** 2).mean(-1)


def bce_logits(y_true, logits):
    return (torch.clamp(logits, min=0) - logits * y_true + torch.log1p(torch.exp(-logits.abs()))).mean(-1)


def reference_fit(per_sample, x, y, batch_size=BATCH, epochs=EPOCHS, lr=LR, module=None):
    """Plain SGD over global batches in order; Keras' epoch loss = batch-size weighted mean of batch losses.
    ``lr`` is a number or a function of the optimizer step."""
    module = module or initial_linear()
    xs, ys = torch.tensor(x), torch.tensor(y)
    history, step = [], 0
    for _ in range(epochs):
        total = 0.0
        for start in range(0, len(xs), batch_size):
            xb, yb = xs[start:start + batch_size], ys[start:start + batch_size]
            loss = per_sample(yb, module(xb)).mean()
            module.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in module.parameters():
                    p -= (lr(step) if callable(lr) else lr) * p.grad
            step += 1
            total += loss.item() * len(xb)
        history.append(total / len(xs))
    return history, [p.detach().numpy().copy() for p in module.parameters()]


# -- one run per loss kind, on every rank --------------------------------------------------------------------
def _loss_kinds():
    import dfit

    class CustomMSE(dfit.losses.Loss):
        """The guide's loss class, verbatim in dfit's terms."""

        def __init__(self, regularization_factor=0.1, name="custom_mse"):
            super().__init__(name=name)
            self.regularization_factor = regularization_factor

        def call(self, y_true, y_pred):
            mse = torch.mean(torch.square(y_true - y_pred), dim=-1)
            reg = torch.mean(torch.square(0.5 - y_pred), dim=-1)
            return mse + reg * self.regularization_factor

    def custom_mean_squared_error(y_true, y_pred):  # the guide's custom loss function, plus its regulariser
        return torch.mean(torch.square(y_true - y_pred), dim=-1) + 0.1 * torch.mean(torch.square(0.5 - y_pred), -1)

    def torch_order_bce(input, target, reduction="none"):  # noqa: A002 - torch's own argument names
        return F.binary_cross_entropy_with_logits(input, target, reduction=reduction)

    return {
        "keras name": "mse",
        "Loss subclass": CustomMSE(),
        "plain function": custom_mean_squared_error,
        "dfit loss class": dfit.losses.BinaryCrossentropy(from_logits=True),
        "torch module": nn.BCEWithLogitsLoss(),
        "torch functional": F.binary_cross_entropy_with_logits,
        "from_torch": dfit.losses.from_torch(torch_order_bce),
    }


EXPECTED_KIND = {
    "keras name": keras_mse,
    "Loss subclass": keras_custom_mse,
    "plain function": keras_custom_mse,
    "dfit loss class": bce_logits,
    "torch module": bce_logits,
    "torch functional": bce_logits,
    "from_torch": bce_logits,
}


def train_each_kind():
    import dfit

    x, y = data()
    out = {}
    for kind, loss in _loss_kinds().items():
        model = dfit.Model(initial_linear())
        model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=LR), loss=loss)
        history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
        out[kind] = (history.history["loss"], [p.detach().numpy().copy() for p in model.module.parameters()])
    return out


@pytest.fixture(scope="module")
def kinds_by_world():
    return {1: train_each_kind(), 2: run_ranks(train_each_kind, 2)[0]}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("kind", sorted(EXPECTED_KIND))
def test_every_loss_kind_trains_on_the_objective_its_author_wrote(kinds_by_world, kind, world):
    x, y = data()
    want_history, want_weights = reference_fit(EXPECTED_KIND[kind], x, y)
    history, weights = kinds_by_world[world][kind]
    np.testing.assert_allclose(history, want_history, rtol=1e-10)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def test_the_argument_order_matters_in_these_checks():
    """The reference of an asymmetric loss in the wrong order differs: the kind tests above can fail."""
    x, y = data()
    right, _ = reference_fit(keras_custom_mse, x, y)
    swapped, _ = reference_fit(lambda t, p: keras_custom_mse(p, t), x, y)
    assert abs(right[-1] - swapped[-1]) > 1e-3


def test_a_loss_class_passed_uninstantiated_is_a_clear_error():
    import dfit

    model = dfit.Model(initial_linear())
    with pytest.raises(TypeError, match=r"loss=BinaryCrossentropy is a class; pass an instance"):
        model.compile(optimizer="sgd", loss=dfit.losses.BinaryCrossentropy)


def test_loss_object_called_standalone_reduces_like_keras():
    import dfit

    y_true = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    y_pred = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    mse = dfit.losses.MeanSquaredError()
    assert mse(y_true, y_pred).item() == pytest.approx(0.5)      # Keras' documented example
    assert mse(y_true, y_pred, sample_weight=torch.tensor([0.7, 0.3], dtype=torch.float64)).item() \
        == pytest.approx(0.25)
    assert dfit.losses.MeanSquaredError(reduction="sum")(y_true, y_pred).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        dfit.losses.MeanSquaredError(reduction="bogus")


# -- callbacks: Keras 2's on_batch_end ---------------------------------------------------------------------
def loss_history_run():
    import dfit

    class LossHistory(dfit.callbacks.Callback):  # the guide's callback
        def on_train_begin(self, logs):
            self.per_batch_losses = []

        def on_batch_end(self, batch, logs):
            self.per_batch_losses.append(logs.get("loss"))

    x, y = data()
    model = dfit.Model(initial_linear())
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.0), loss="mse")
    cb = LossHistory()
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, callbacks=[cb])
    return cb.per_batch_losses


def test_keras2_on_batch_end_is_called_for_every_training_batch():
    losses = loss_history_run()
    x, y = data()
    pred = initial_linear()(torch.tensor(x)).detach().numpy()
    per_sample = ((y - pred) ** 2).mean(-1)
    sizes = [8, 8, 5]
    running = [per_sample[:sum(sizes[:k + 1])].mean() for k in range(3)]   # Keras: the epoch's running mean
    np.testing.assert_allclose(losses, running * EPOCHS, rtol=1e-10)
    assert len(run_ranks(loss_history_run, 2)[1]) == 3 * EPOCHS     # every rank calls it at every step


# -- models that compute their own loss, and outputs without a loss -------------------------------------------
class SelfScoring(nn.Module):
    """The common PyTorch / Hugging Face pattern: forward(x, labels) returns its mean loss (here in a dict)."""

    def __init__(self, style: str):
        super().__init__()
        self.lin, self.style = initial_linear(), style

    def forward(self, x, labels):
        pred = self.lin(x)
        loss = ((labels - pred) ** 2).mean()
        if self.style == "scalar":
            return loss
        if self.style == "dict":
            return {"loss": loss, "logits": pred}
        return type("Output", (), {"loss": loss, "logits": pred})()


def self_scoring_runs():
    import dfit

    x, y = data()
    out = {}
    for style in ("scalar", "dict", "object"):
        model = dfit.Model(SelfScoring(style))
        model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=LR), loss=None)
        # 21 rows in batches of 10: the last global batch has 1 row, so on 2 ranks one rank gets none
        history = model.fit({"x": x, "labels": y}, batch_size=10, epochs=EPOCHS, shuffle=False, verbose=0)
        out[style] = (history.history["loss"], [p.detach().numpy().copy() for p in model.module.parameters()])
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_a_model_that_computes_its_own_loss_trains_on_the_global_mean(world):
    x, y = data()
    want_history, want_weights = reference_fit(keras_mse, x, y, batch_size=10)
    runs = self_scoring_runs() if world == 1 else run_ranks(self_scoring_runs, 2)[0]
    for style, (history, weights) in runs.items():
        np.testing.assert_allclose(history, want_history, rtol=1e-10, err_msg=style)
        for got, want in zip(weights, want_weights):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13, err_msg=style)


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = initial_linear()
        torch.manual_seed(5)
        self.b = nn.Linear(D, 1).double()

    def forward(self, x):
        return [self.a(x), self.b(x)]


def none_loss_run():
    import dfit

    x, y = data()
    model = dfit.Model(TwoHeads())
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=LR), loss=[None, "mse"])
    history = model.fit(x, [y, y], batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    params = {k: v.detach().numpy().copy() for k, v in model.module.state_dict().items()}
    return history.history, params


@pytest.mark.parametrize("world", [1, 2])
def test_loss_none_for_one_output_trains_only_the_other(world):
    """Keras: loss=[None, "mse"] trains output 2 alone and logs only "loss". On 2 ranks, output 1's parameters
    get no gradient at all (DDP must be told)."""
    history, params = none_loss_run() if world == 1 else run_ranks(none_loss_run, 2)[0]
    x, y = data()
    torch.manual_seed(5)
    want_history, (want_weight, want_bias) = reference_fit(keras_mse, x, y, module=nn.Linear(D, 1).double())
    assert list(history) == ["loss"]
    np.testing.assert_allclose(history["loss"], want_history, rtol=1e-10)
    np.testing.assert_allclose(params["b.weight"], want_weight, rtol=1e-10)    # output 2 trained as alone
    np.testing.assert_array_equal(params["a.weight"], initial_linear().weight.detach().numpy())   # untouched


# -- a data-dependent decision: hinge's "are these labels 0/1?" ----------------------------------------------
def hinge_run():
    import dfit

    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, D))
    # batches of 6: rows 0-5 are 0/1 labels, rows 6-11 mix -1/0/1 (row 11 is -1 only: a rank's slice of that
    # batch can be all 0/1 while the global batch is not), the rest 0/1 again
    y = rng.integers(0, 2, size=(24, 1)).astype(np.float64)
    y[11] = -1.0
    model = dfit.Model(initial_linear())
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.1), loss="hinge")
    history = model.fit(x, y, batch_size=6, epochs=2, shuffle=False, verbose=0)
    return history.history["loss"], model.module.weight.detach().numpy().copy()


def test_hinge_decides_label_style_over_the_global_batch_on_1_2_3_ranks():
    def keras_hinge_batch(y_true, y_pred):
        binary = bool(((y_true == 0) | (y_true == 1)).all())   # Keras decides per batch
        y_true = 2 * y_true - 1 if binary else y_true
        return torch.clamp(1 - y_true * y_pred, min=0).mean(-1)

    rng = np.random.default_rng(4)
    x = rng.normal(size=(24, D))
    y = rng.integers(0, 2, size=(24, 1)).astype(np.float64)
    y[11] = -1.0
    want, _ = reference_fit(keras_hinge_batch, x, y, batch_size=6, epochs=2, lr=0.1)
    one = hinge_run()
    np.testing.assert_allclose(one[0], want, rtol=1e-10)
    for world in (2, 3):
        got = run_ranks(hinge_run, world)[0]
        np.testing.assert_allclose(got[0], one[0], rtol=1e-9)
        np.testing.assert_allclose(got[1], one[1], rtol=1e-9)


# -- the guide's first snippet: Keras optimizer, loss and metric OBJECTS ----------------------------------------
def first_snippet_run():
    import dfit

    rng = np.random.default_rng(7)
    x = rng.normal(size=(N, D))
    y = rng.integers(0, 3, size=N)
    torch.manual_seed(11)
    module = nn.Sequential(nn.Linear(D, 3), nn.Softmax(dim=-1)).double()
    model = dfit.Model(module)
    model.compile(
        optimizer=dfit.optimizers.RMSprop(learning_rate=1e-3),
        loss=dfit.losses.SparseCategoricalCrossentropy(),
        metrics=[dfit.metrics.SparseCategoricalAccuracy()],
    )
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return history.history, [p.detach().numpy().copy() for p in module.parameters()], model.metrics_names


def keras_rmsprop_reference():
    """Keras' RMSprop written out: v = rho v + (1 - rho) g^2; w -= lr g / sqrt(v + eps)."""
    rng = np.random.default_rng(7)
    x, y = torch.tensor(rng.normal(size=(N, D))), torch.tensor(rng.integers(0, 3, size=N))
    torch.manual_seed(11)
    module = nn.Sequential(nn.Linear(D, 3), nn.Softmax(dim=-1)).double()
    velocity = [torch.zeros_like(p) for p in module.parameters()]
    losses, accuracies = [], []
    for _ in range(EPOCHS):
        total, correct = 0.0, 0.0
        for start in range(0, N, BATCH):
            xb, yb = x[start:start + BATCH], y[start:start + BATCH]
            probs = module(xb)
            clipped = (probs / probs.sum(-1, keepdim=True)).clamp(1e-7, 1 - 1e-7)   # Keras' probabilities path
            loss = -torch.log(clipped.gather(1, yb[:, None])).mean()
            correct += float((probs.argmax(-1) == yb).sum())
            module.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p, v in zip(module.parameters(), velocity):
                    v.mul_(0.9).add_(0.1 * p.grad ** 2)
                    p -= 1e-3 * p.grad / torch.sqrt(v + 1e-7)
            total += loss.item() * len(xb)
        losses.append(total / N)
        accuracies.append(correct / N)
    return losses, accuracies, [p.detach().numpy().copy() for p in module.parameters()]


@pytest.mark.parametrize("world", [1, 2])
def test_the_guides_first_snippet_with_keras_objects(world):
    history, weights, names = first_snippet_run() if world == 1 else run_ranks(first_snippet_run, 2)[0]
    want_loss, want_acc, want_weights = keras_rmsprop_reference()
    assert names == ["loss", "sparse_categorical_accuracy"]
    np.testing.assert_allclose(history["loss"], want_loss, rtol=1e-10)
    np.testing.assert_allclose(history["sparse_categorical_accuracy"], want_acc, rtol=1e-12)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13)


def schedule_run():
    import dfit

    x, y = data()
    model = dfit.Model(initial_linear())
    schedule = dfit.optimizers.schedules.ExponentialDecay(0.3, decay_steps=2, decay_rate=0.5)
    model.compile(optimizer=dfit.optimizers.SGD(learning_rate=schedule), loss="mse")
    history = model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0)
    return history.history["loss"], [p.detach().numpy().copy() for p in model.module.parameters()]


@pytest.mark.parametrize("world", [1, 2])
def test_a_learning_rate_schedule_steps_per_optimizer_step(world):
    """ExponentialDecay(0.3, decay_steps=2, decay_rate=0.5): lr at step k = 0.3 * 0.5 ** (k / 2)."""
    losses, weights = schedule_run() if world == 1 else run_ranks(schedule_run, 2)[0]
    x, y = data()
    want, want_weights = reference_fit(keras_mse, x, y, lr=lambda step: 0.3 * 0.5 ** (step / 2))
    np.testing.assert_allclose(losses, want, rtol=1e-10)
    for got, ref in zip(weights, want_weights):
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-13)
