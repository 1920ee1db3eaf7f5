"""The built-in callbacks on one process: Keras 3's decisions on the same logs, files, state round trips."""
from __future__ import annotations

import os
import types

import numpy as np
import pytest
import torch
from torch import nn

import dfit
from dfit.callbacks import (CSVLogger, EarlyStopping, LearningRateScheduler, ModelCheckpoint, ReduceLROnPlateau,
                            TensorBoard, TerminateOnNaN, TorchScheduler)

os.environ.setdefault("KERAS_BACKEND", "torch")


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras")


# -- helpers -----------------------------------------------------------------------------------------------
class FakeKerasModel:
    """What Keras' callbacks touch on a model: stop_training, weights, an optimizer with learning_rate."""

    def __init__(self):
        self.stop_training = False
        self.epoch = 0
        self.optimizer = types.SimpleNamespace(learning_rate=0.1)
        self.saved: list[str] = []

    def get_weights(self):
        return [np.array([self.epoch])]

    def set_weights(self, weights):
        self.restored = int(weights[0][0])

    def save(self, path, overwrite=True):
        self.saved.append(path)

    save_weights = save


def dfit_model_on(module: nn.Module, lr: float = 0.1) -> dfit.Model:
    model = dfit.Model(module)
    model.compile(optimizer=lambda p: torch.optim.SGD(p, lr=lr), loss="mse")
    return model


def drive(cb, model, logs_per_epoch, on_batch=None):
    """Run the hooks of one training as fit calls them; returns the epoch at which stop_training was set."""
    cb.set_model(model)
    cb.set_params({"epochs": len(logs_per_epoch), "steps": 2, "verbose": 0})
    cb.on_train_begin({})
    stopped = None
    for epoch, logs in enumerate(logs_per_epoch):
        cb.on_epoch_begin(epoch, {})
        for batch in range(2 if on_batch else 0):
            on_batch(cb, batch, logs)
        if isinstance(model, FakeKerasModel):
            model.epoch = epoch
        else:
            with torch.no_grad():
                model.module.weight.fill_(epoch)
        cb.on_epoch_end(epoch, dict(logs))
        if model.stop_training:
            stopped = epoch
            break
    cb.on_train_end({})
    return stopped


def linear_dfit_model():
    module = nn.Linear(1, 1, bias=False, dtype=torch.float64)
    return dfit_model_on(module)


VAL_LOSSES = [1.0, 0.8, 0.81, 0.79, 0.795, 0.9, 0.7, 0.71, 0.72, 0.73, 0.74, 0.75]
EARLY_STOPPING_CASES = [
    dict(patience=0), dict(patience=2), dict(patience=2, min_delta=0.02), dict(patience=1, baseline=0.75),
    dict(patience=2, start_from_epoch=3), dict(patience=3, restore_best_weights=True),
    dict(patience=2, restore_best_weights=True, baseline=0.5), dict(monitor="val_acc", patience=1),
    dict(monitor="val_loss", mode="max", patience=1),
]


@pytest.mark.parametrize("kwargs", EARLY_STOPPING_CASES, ids=lambda k: ",".join(f"{a}={v}" for a, v in k.items()))
def test_early_stopping_decides_like_keras(keras, kwargs):
    monitor = kwargs.get("monitor", "val_loss")
    logs = [{monitor: v} for v in VAL_LOSSES]
    # Keras reads an accuracy metric's direction off the compiled metric object ("up"); our fake has none
    keras_kwargs = dict(kwargs, mode="max") if monitor == "val_acc" else kwargs
    ours, theirs = EarlyStopping(**kwargs), keras.callbacks.EarlyStopping(**keras_kwargs)
    ours_model, keras_model = linear_dfit_model(), FakeKerasModel()
    got = drive(ours, ours_model, logs)
    want = drive(theirs, keras_model, logs)
    assert got == want
    assert (ours.stopped_epoch, ours.best_epoch, ours.best, ours.wait) == (
        theirs.stopped_epoch, theirs.best_epoch, theirs.best, theirs.wait)
    if kwargs.get("restore_best_weights"):
        assert ours_model.module.weight.item() == keras_model.restored == theirs.best_epoch


def test_early_stopping_restores_best_weights_even_without_stopping():
    model = linear_dfit_model()
    cb = EarlyStopping(monitor="loss", patience=100, restore_best_weights=True)
    assert drive(cb, model, [{"loss": v} for v in [3.0, 1.0, 2.0, 4.0]]) is None
    assert model.module.weight.item() == 1.0  # epoch 1 was best; the last epoch left 3.0


@pytest.mark.parametrize("kwargs", [dict(patience=1), dict(patience=2, cooldown=2, factor=0.5),
                                    dict(patience=1, min_lr=0.004, factor=0.2), dict(patience=0, min_delta=0.05)])
def test_reduce_lr_on_plateau_follows_keras(keras, kwargs):
    logs = [{"val_loss": v} for v in VAL_LOSSES]
    ours, theirs = ReduceLROnPlateau(**kwargs), keras.callbacks.ReduceLROnPlateau(**kwargs)
    model, keras_model = linear_dfit_model(), FakeKerasModel()
    model.optimizer.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.2})
    ours.set_model(model)
    theirs.set_model(keras_model)
    ours.on_train_begin({})
    theirs.on_train_begin({})
    for epoch, log in enumerate(logs):
        ours_logs, keras_logs = dict(log), dict(log)
        ours.on_epoch_end(epoch, ours_logs)
        theirs.on_epoch_end(epoch, keras_logs)
        assert ours_logs == pytest.approx(keras_logs)  # learning_rate logged as Keras does
        assert model.optimizer.param_groups[0]["lr"] == pytest.approx(keras_model.optimizer.learning_rate)
        lr2 = model.optimizer.param_groups[1]["lr"]  # every group is reduced by the same rule
        assert lr2 == pytest.approx(max(0.2 * keras_model.optimizer.learning_rate / 0.1, kwargs.get("min_lr", 0))
                                    if lr2 > kwargs.get("min_lr", 0) else kwargs.get("min_lr", 0))
    assert (ours.wait, ours.cooldown_counter, ours.best) == (theirs.wait, theirs.cooldown_counter, theirs.best)
    assert model.optimizer.param_groups[0]["lr"] < 0.1


def test_reduce_lr_on_plateau_rejects_factor_one():
    with pytest.raises(ValueError, match="factor >= 1.0"):
        ReduceLROnPlateau(factor=1.0)


def test_mode_auto_is_decided_from_the_metric_name():
    for monitor, better in [("val_loss", 0.5), ("val_accuracy", 2.0), ("acc", 2.0), ("val_auc", 2.0),
                            ("output_1_binary_accuracy", 2.0), ("val_mean_squared_error", 0.5),
                            ("val_multiclass_f1_score", 2.0)]:
        cb = EarlyStopping(monitor=monitor, patience=0)
        drive(cb, linear_dfit_model(), [{monitor: 1.0}, {monitor: better}])
        assert cb.best == better, monitor
    with pytest.raises(ValueError, match="monitor=val_widgets.*mode='max'"):
        drive(EarlyStopping(monitor="val_widgets"), linear_dfit_model(), [{"val_widgets": 1.0}])


# -- ModelCheckpoint -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [dict(), dict(save_best_only=True), dict(save_best_only=True, mode="max"),
                                    dict(save_best_only=True, initial_value_threshold=0.85),
                                    dict(save_weights_only=True)])
def test_checkpoint_names_and_best_only_like_keras(keras, tmp_path, kwargs):
    template = str(tmp_path / "w.{epoch:02d}-{val_loss:.2f}")
    logs = [{"loss": 1.0, "val_loss": v} for v in VAL_LOSSES[:6]]
    ours = ModelCheckpoint(template + ".pt", **kwargs)
    model = linear_dfit_model()
    drive(ours, model, logs)
    theirs = keras.callbacks.ModelCheckpoint(template + (".weights.h5" if kwargs.get("save_weights_only")
                                                         else ".keras"), **kwargs)
    keras_model = FakeKerasModel()
    drive(theirs, keras_model, logs)
    want = [os.path.basename(p).split(".keras")[0].split(".weights.h5")[0] + ".pt" for p in keras_model.saved]
    assert sorted(os.listdir(tmp_path)) == sorted(set(want))
    for name in set(want):
        payload = torch.load(tmp_path / name, weights_only=True)
        state = payload if kwargs.get("save_weights_only") else payload["state_dict"]
        assert set(state) == {"weight"}
    if kwargs.get("save_best_only"):
        assert ours.best == theirs.best


def test_checkpoint_save_freq_in_steps_names_like_keras(keras, tmp_path):
    template = "w.e{epoch}-b{batch}"
    ours = ModelCheckpoint(str(tmp_path / (template + ".pt")), save_freq=3)
    theirs = keras.callbacks.ModelCheckpoint(template + ".keras", save_freq=3)
    keras_model = FakeKerasModel()
    logs = [{"loss": 1.0}] * 4
    drive(theirs, keras_model, logs, on_batch=lambda cb, b, _: cb.on_train_batch_end(b, {"loss": 1.0}))
    model = linear_dfit_model()
    drive(ours, model, logs, on_batch=lambda cb, b, _: cb.on_train_batch_end(b, {"loss": 1.0}))
    assert sorted(os.listdir(tmp_path)) == sorted(p.replace(".keras", ".pt") for p in keras_model.saved)
    assert len(keras_model.saved) == 2  # 8 steps, every 3rd


def test_checkpoint_template_with_a_missing_key_says_which():
    with pytest.raises(KeyError, match="Failed to format this callback filepath.*val_acc"):
        drive(ModelCheckpoint("w.{val_acc:.2f}.pt"), linear_dfit_model(), [{"val_loss": 1.0}])


def test_checkpoint_rejects_a_bad_save_freq():
    with pytest.raises(ValueError, match="Unrecognized save_freq"):
        ModelCheckpoint("w.pt", save_freq="batch")


def regression_data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2))
    return x, x @ np.array([[1.5], [-2.0]]) + 0.3


def small_model(lr=0.05, seed=0):
    torch.manual_seed(seed)
    return dfit_model_on(nn.Linear(2, 1, dtype=torch.float64), lr=lr)


def test_checkpoint_in_fit_writes_full_models_that_load(tmp_path):
    x, y = regression_data()
    model = small_model()
    path = str(tmp_path / "ck" / "m.{epoch:02d}-{val_loss:.3f}.pt")
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0, validation_split=0.25, shuffle=False,
                        callbacks=[ModelCheckpoint(path)])
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == [f"m.{e + 1:02d}-{v:.3f}.pt" for e, v in enumerate(history.history["val_loss"])]
    loaded = dfit.load_model(str(tmp_path / "ck" / names[-1]), module=nn.Linear(2, 1, dtype=torch.float64))
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), model.get_weights()))


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    x, y = regression_data()
    model = small_model()
    path = tmp_path / "w.pt"
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[ModelCheckpoint(str(path),
                                                                                  save_weights_only=True)])
    before = {k: v.clone() for k, v in torch.load(path, weights_only=True).items()}
    real_save = torch.save

    def half_then_crash(obj, fh, *a, **k):
        real_save(obj, fh, *a, **k)
        fh.truncate(fh.tell() // 2)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(dfit.serialization.torch, "save", half_then_crash)
    with pytest.raises(OSError, match="simulated"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0,
                  callbacks=[ModelCheckpoint(str(path), save_weights_only=True)])
    assert os.listdir(tmp_path) == ["w.pt"]  # no temporary file left
    after = torch.load(path, weights_only=True)
    assert all(torch.equal(before[k], after[k]) for k in before)
    model.load_weights(str(path))


# -- learning rate -----------------------------------------------------------------------------------------
def test_learning_rate_scheduler_sets_every_group_and_logs_it():
    x, y = regression_data()
    model = small_model(lr=0.1)
    seen = []
    cb = LearningRateScheduler(lambda epoch, lr: lr * 0.5 if epoch > 0 else lr)
    spy = dfit.callbacks.LambdaCallback(on_epoch_begin=lambda e, l: seen.append(
        model.optimizer.param_groups[0]["lr"]))
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[cb, spy])
    assert seen == [0.1, 0.05, 0.025]
    assert history.history["learning_rate"] == [0.1, 0.05, 0.025]
    one_arg = LearningRateScheduler(lambda epoch: 0.01 * (epoch + 1))
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[one_arg])
    assert model.optimizer.param_groups[0]["lr"] == 0.02
    with pytest.raises(ValueError, match="should be a float"):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[LearningRateScheduler(lambda e, lr: "x")])


def test_torch_scheduler_per_epoch_per_step_and_on_plateau():
    x, y = regression_data()
    model = small_model(lr=0.1)
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0,
                        callbacks=[TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))])
    assert history.history["learning_rate"] == [0.05, 0.025, 0.0125]
    model = small_model(lr=0.1)
    per_step = TorchScheduler(lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)), "step")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[per_step])  # 8 steps
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 9)
    model = small_model(lr=0.1)
    plateau = TorchScheduler(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5),
                             monitor="lr_probe")
    probe = dfit.callbacks.LambdaCallback(on_epoch_end=lambda e, logs: logs.update(lr_probe=1.0))
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[probe, plateau])
    assert model.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)  # no improvement after epoch 0
    with pytest.raises(ValueError, match="interval='epoch'"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[TorchScheduler(
            lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt), interval="step")])
    with pytest.raises(ValueError, match="another optimizer"):
        other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
        model.fit(x, y, epochs=1, verbose=0, callbacks=[TorchScheduler(torch.optim.lr_scheduler.StepLR(other, 1))])


# -- CSVLogger -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_val", [True, False])
def test_csv_logger_writes_what_keras_writes(keras, tmp_path, with_val):
    logs = [{"loss": 1.25, "mae": 0.5, **({"val_loss": 2.0 - e, "val_mae": 0.25} if with_val else {})}
            for e in range(3)]
    ours, theirs = CSVLogger(str(tmp_path / "ours.csv"), separator=";"), keras.callbacks.CSVLogger(
        str(tmp_path / "keras.csv"), separator=";")
    drive(ours, linear_dfit_model(), logs)
    drive(theirs, FakeKerasModel(), logs)
    assert (tmp_path / "ours.csv").read_text() == (tmp_path / "keras.csv").read_text()
    ours_append = CSVLogger(str(tmp_path / "ours.csv"), separator=";", append=True)
    theirs_append = keras.callbacks.CSVLogger(str(tmp_path / "keras.csv"), separator=";", append=True)
    drive(ours_append, linear_dfit_model(), logs[:2])
    drive(theirs_append, FakeKerasModel(), logs[:2])
    assert (tmp_path / "ours.csv").read_text() == (tmp_path / "keras.csv").read_text()
    assert len((tmp_path / "ours.csv").read_text().splitlines()) == 6  # one header, 3 + 2 rows


def test_csv_logger_in_fit_rows_and_columns(tmp_path):
    import csv

    x, y = regression_data()
    model = small_model()
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0, validation_split=0.25,
                        callbacks=[CSVLogger(str(tmp_path / "log.csv"))])
    with open(tmp_path / "log.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["epoch", "loss", "val_loss"]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [float(r["val_loss"]) for r in rows] == history.history["val_loss"]
    assert os.listdir(tmp_path) == ["log.csv"]


# -- TensorBoard ---------------------------------------------------------------------------------------------
def read_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_writes_keras_layout(tmp_path):
    x, y = regression_data()
    model = small_model(lr=0.1)
    history = model.fit(x, y, batch_size=4, epochs=2, verbose=0, validation_split=0.25,
                        callbacks=[TensorBoard(str(tmp_path), update_freq=2),
                                   LearningRateScheduler(lambda e, lr: 0.1 / (e + 1))])
    assert sorted(os.listdir(tmp_path)) == ["train", "validation"]
    train, val = read_scalars(tmp_path / "train"), read_scalars(tmp_path / "validation")
    assert [v for _, v in train["epoch_loss"]] == pytest.approx(history.history["loss"])
    assert [s for s, _ in train["epoch_loss"]] == [0, 1]
    assert [v for _, v in train["epoch_learning_rate"]] == pytest.approx([0.1, 0.05])
    assert [v for _, v in val["epoch_loss"]] == pytest.approx(history.history["val_loss"])
    assert [s for s, _ in val["evaluation_loss_vs_iterations"]] == [3, 6]  # 3 steps per epoch
    assert [s for s, _ in train["batch_loss"]] == [2, 4, 6]
    assert "epoch_val_loss" not in train and "batch_loss" not in val


def test_tensorboard_epoch_only_counts_steps_without_batch_hooks(tmp_path):
    x, y = regression_data()
    cb = TensorBoard(str(tmp_path), histogram_freq=1)
    assert "on_train_batch_end" not in vars(cb)
    small_model().fit(x, y, batch_size=4, epochs=2, verbose=0, validation_split=0.25, callbacks=[cb])
    val = read_scalars(tmp_path / "validation")
    assert [s for s, _ in val["evaluation_loss_vs_iterations"]] == [3, 6]
    assert "batch_loss" not in read_scalars(tmp_path / "train")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "train"), size_guidance={"histograms": 0})  # 0: keep every event
    acc.Reload()
    assert set(acc.Tags()["histograms"]) == {"weight", "bias"}
    assert [e.step for e in acc.Histograms("weight")] == [0, 1]


def test_tensorboard_rejects_what_it_cannot_write():
    with pytest.raises(ValueError, match="update_freq"):
        TensorBoard(update_freq=0)
    with pytest.raises(ValueError, match="Profiling"):
        TensorBoard(profile_batch=2)
    with pytest.raises(NotImplementedError, match="write_images"):
        TensorBoard(write_images=True)


# -- TerminateOnNaN ------------------------------------------------------------------------------------------
def test_terminate_on_nan_stops_at_the_batch():
    x, y = regression_data()
    x[9] = 1e200  # batch 2 of epoch 0 (batch_size 4, no shuffle): its squared error overflows to inf
    # (NaN in the data itself is refused before training: see test_bad_input)
    model = small_model()
    steps = []
    count = dfit.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: steps.append(b))
    history = model.fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                        callbacks=[count, TerminateOnNaN()])
    assert steps == [0, 1, 2] and history.epoch == [0]
    with pytest.raises(RuntimeError, match="NaN or Inf loss encountered at batch 2"):
        small_model().fit(x, y, batch_size=4, epochs=3, verbose=0, shuffle=False,
                          callbacks=[TerminateOnNaN(raise_error=True)])


# -- state ---------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_continues_counters(tmp_path):
    logs = [{"val_loss": v} for v in VAL_LOSSES]
    whole = EarlyStopping(patience=3, restore_best_weights=True)
    model = linear_dfit_model()
    stopped = drive(whole, model, logs)
    assert stopped is not None

    first = EarlyStopping(patience=3, restore_best_weights=True)
    drive(first, linear_dfit_model(), logs[:4])
    state = first.state_dict()
    torch.save(state, tmp_path / "state.pt")
    resumed = EarlyStopping(patience=3, restore_best_weights=True)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    model2 = linear_dfit_model()
    resumed.set_model(model2)
    resumed.on_train_begin({})  # a resumed fit starts here: the counters continue
    for epoch in range(4, len(logs)):
        with torch.no_grad():
            model2.module.weight.fill_(epoch)
        resumed.on_epoch_end(epoch, dict(logs[epoch]))
        if model2.stop_training:
            break
    resumed.on_train_end({})
    assert epoch == stopped
    assert (resumed.wait, resumed.best, resumed.best_epoch) == (whole.wait, whole.best, whole.best_epoch)
    assert model2.module.weight.item() == model.module.weight.item()

    plateau = ReduceLROnPlateau(patience=2)
    plateau.set_model(linear_dfit_model())
    plateau.on_train_begin({})
    plateau.on_epoch_end(0, {"val_loss": 1.0})
    plateau.on_epoch_end(1, {"val_loss": 1.0})
    again = ReduceLROnPlateau(patience=2)
    again.load_state_dict(plateau.state_dict())
    again.set_model(plateau.model)
    again.on_train_begin({})
    assert (again.wait, again.best) == (1, 1.0)

    ck = ModelCheckpoint(str(tmp_path / "w.pt"), save_best_only=True)
    ck.load_state_dict({"best": 0.5})
    drive(ck, linear_dfit_model(), [{"val_loss": 0.6}])
    assert not os.path.exists(tmp_path / "w.pt")  # 0.6 does not beat the restored best

    sched = TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    x, y = regression_data()
    model = small_model(lr=0.1)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[sched])
    again = TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    again.load_state_dict(sched.state_dict())
    model.fit(x, y, batch_size=4, epochs=3, initial_epoch=2, verbose=0, callbacks=[again])
    assert again.scheduler.last_epoch == 3 and model.optimizer.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_callbacks_without_batch_logs_add_no_batch_hooks(tmp_path):
    from dfit.callbacks.base import CallbackList

    cbs = [EarlyStopping(), ModelCheckpoint(str(tmp_path / "w.pt")), CSVLogger(str(tmp_path / "l.csv")),
           ReduceLROnPlateau(), LearningRateScheduler(lambda e, lr: lr), TensorBoard(str(tmp_path)),
           TorchScheduler(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))]
    callback_list = CallbackList(cbs, linear_dfit_model(), {})
    assert not callback_list.wants_batches("train") and not callback_list.stops_at_batch()
    assert CallbackList([TerminateOnNaN()], None, {}).stops_at_batch()
