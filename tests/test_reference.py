"""fit against a plain hand-written torch loop (no dfit code in the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

import dfit
from reference_ddp import shuffled_order


def reference_fit(x, y, w, epochs, batch_size, lr, seed, validation_split, shuffle):
    """Keras' fit semantics written out by hand; the shuffle is the documented one, written out plainly in
    ``reference_ddp.shuffled_order(n_train, seed, epoch)`` (no dfit code)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    n = len(x)
    n_train = int(n * (1 - validation_split))
    xt, yt, wt = (torch.from_numpy(a[:n_train]) for a in (x, y, w))
    xv, yv, wv = (torch.from_numpy(a[n_train:]) for a in (x, y, w))
    history = {"loss": [], "accuracy": [], "val_loss": [], "val_accuracy": []}
    for epoch in range(epochs):
        order = np.array(shuffled_order(n_train, seed, epoch)) if shuffle else np.arange(n_train)
        loss_sum = correct = 0.0
        for start in range(0, n_train, batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            out = net(xt[idx])
            per_sample = F.cross_entropy(out, yt[idx], reduction="none")
            loss = (per_sample * wt[idx]).sum() / len(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(idx)
            correct += (out.argmax(1) == yt[idx]).sum().item()
        with torch.no_grad():
            out = net(xv)
            val_loss = (F.cross_entropy(out, yv, reduction="none") * wv).sum().item() / len(xv)
            val_acc = (out.argmax(1) == yv).double().mean().item()
        history["loss"].append(loss_sum / n_train)
        history["accuracy"].append(correct / n_train)
        history["val_loss"].append(val_loss)
        history["val_accuracy"].append(val_acc)
    return history, net.state_dict()


@pytest.mark.parametrize("shuffle", [False, True])
def test_fit_matches_hand_written_loop(shuffle):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(23, 4))
    y = rng.integers(0, 3, size=23)
    w = rng.uniform(0.5, 1.5, size=23)
    expected_history, expected_weights = reference_fit(x, y, w, epochs=4, batch_size=5, lr=0.3, seed=9,
                                                       validation_split=0.2, shuffle=shuffle)
    torch.manual_seed(0)
    model = dfit.Model(nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double())
    model.compile(optimizer=torch.optim.SGD(model.module.parameters(), lr=0.3),
                  loss=dfit.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, sample_weight=w, batch_size=5, epochs=4, validation_split=0.2, shuffle=shuffle,
                        seed=9, verbose=0)
    assert list(history.history) == list(expected_history)
    for key, values in expected_history.items():
        np.testing.assert_allclose(history.history[key], values, rtol=1e-12, err_msg=key)
    for key, value in expected_weights.items():
        np.testing.assert_allclose(model.module.state_dict()[key].numpy(), value.numpy(), rtol=1e-12, err_msg=key)
    assert history.history["loss"][0] > history.history["loss"][-1]  # it really trained
