"""The Keras 3 differential fuzz (``keras_oracle``): a fixed set of seeds in CI, more with DFIT_FUZZ_CONFIGS=500.

Each item trains Keras and dfit on one random configuration and compares history, final weights, evaluate and
predict (float32, rtol 1e-5). A configuration dfit refuses on purpose must raise the error its table entry
names; a failure explained by a known difference (keras_oracle.KNOWN_DIFFERENCES) is an xfail, and each such
difference has a witness configuration run under ``xfail(strict=True)``, so its fix shows up as an unexpected
pass.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # before Keras is first imported; the oracle checks it
pytest.importorskip("keras", reason="the Keras oracle needs keras>=3 (the test extra)")

import keras_oracle as oracle  # noqa: E402 - after the importorskip

CONFIGS = oracle.configs()
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.mark.parametrize("config", CONFIGS, ids=[f"seed{c.seed}" for c in CONFIGS])
def test_dfit_trains_like_keras(config: oracle.Config):
    outcome = oracle.run(config)
    refusal = oracle.refusal_of(config)
    if refusal is not None:
        assert outcome.status == "refused", f"{outcome.cause}\n{config.describe()}\n{outcome.detail}"
        return
    known = oracle.explaining(config, outcome)
    if known is not None:
        pytest.xfail(f"known difference: {known.group}: {outcome.cause}")
    assert outcome.status == "pass", f"{outcome.cause}\n{config.describe()}\n{outcome.detail}"


@pytest.mark.parametrize("known", oracle.KNOWN_DIFFERENCES, ids=lambda k: k.group.split(":")[0][:40])
@pytest.mark.xfail(strict=True, reason="a known difference from Keras; an unexpected pass means it is fixed: "
                                        "remove it from keras_oracle.KNOWN_DIFFERENCES")
def test_known_difference_still_shows(known: oracle.KnownDifference):
    outcome = oracle.run(oracle.generate(known.witness))
    assert outcome.status == "pass", f"{outcome.cause}: {outcome.detail[-300:]}"


def test_each_witness_belongs_to_its_group():
    """A stale witness would make its strict xfail fail for another reason and hide the fix."""
    for known in oracle.KNOWN_DIFFERENCES:
        assert known in oracle.known_differences(oracle.generate(known.witness)), known.group


def test_generator_is_seeded():
    assert oracle.generate(7) == oracle.generate(7)
    assert oracle.generate(7) != oracle.generate(8)


def test_ci_seeds_cover_the_configuration_space():
    """The fixed seeds reach every loss, dfit optimizer, output form, weighting, validation kind, and a batch
    size that does not divide the data (so a narrowed generator fails here rather than silently)."""
    configs = oracle.configs(oracle.CI_CONFIGS)
    assert len(configs) >= 60
    assert {name for c in configs for name in c.loss_names()} == set(oracle.LOSSES)
    assert {c.optimizer[1] for c in configs} >= set(oracle.DFIT_OPTIMIZER_NAMES)
    assert {c.form for c in configs} == {"single", "list", "dict"}
    assert {c.validation for c in configs} == {"none", "split", "data", "data_weighted"}
    assert any(c.sample_weight for c in configs) and any(c.class_weight for c in configs)
    assert any(c.loss_weights for c in configs)
    assert any(s[0] == "object" and s[2].get("from_logits") for c in configs for s in c.losses)
    assert any(s[0] == "object" and s[2].get("label_smoothing") for c in configs for s in c.losses)
    assert any(c.n % c.batch_size for c in configs) and {c.epochs for c in configs} == {1, 2, 3}
    assert any(oracle.refusal_of(c) for c in configs)


def _optimizer_features(config: oracle.Config) -> set[str]:
    """The optimizer's class name and its non-default arguments that are set ('schedule:<class>' for a schedule)."""
    if config.optimizer[0] != "object":
        return set()
    out = {oracle.OPTIMIZERS[config.optimizer[1]][0]}
    for key, value in config.optimizer[2].items():
        if isinstance(value, tuple):
            out |= {"schedule", f"schedule:{value[1]}"}
        elif value and key != "learning_rate":
            out.add(key)
    return out


def _metric_objects(config: oracle.Config) -> list[tuple]:
    lists = ([config.metrics[1]] if isinstance(config.metrics, tuple) else config.metrics) + config.weighted_metrics
    return [m for per in lists for m in per if m[0] == "object"]


def test_ci_seeds_cover_optimizer_and_metric_objects():
    """... and optimizer objects of every dfit class with each non-default argument the issue names (momentum,
    nesterov, amsgrad, centered, weight_decay, the three clippings, every schedule class), and metric objects
    of the confusion family (AUC/Precision/Recall), with from_logits and with names that are not the default."""
    configs = oracle.configs(oracle.CI_CONFIGS)
    features = set().union(*map(_optimizer_features, configs))
    classes = {cls for cls, _ in oracle.OPTIMIZERS.values()}
    assert {oracle.OPTIMIZERS[n][0] for n in oracle.DFIT_OPTIMIZER_NAMES} <= features <= classes | {
        "momentum", "nesterov", "amsgrad", "centered", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm",
        "beta_1", "beta_2", "epsilon", "rho", "initial_accumulator_value", "schedule"} | {
        f"schedule:{s}" for s in ("ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay",
                                  "InverseTimeDecay", "CosineDecay", "CosineDecayRestarts")}
    assert {"momentum", "nesterov", "amsgrad", "centered", "weight_decay", "clipnorm", "clipvalue",
            "global_clipnorm", "schedule:ExponentialDecay", "schedule:PiecewiseConstantDecay",
            "schedule:PolynomialDecay", "schedule:InverseTimeDecay", "schedule:CosineDecay",
            "schedule:CosineDecayRestarts"} <= features
    objects = [m for c in configs for m in _metric_objects(c)]
    assert {"AUC", "Precision", "Recall"} <= {m[1] for m in objects}
    assert any(m[2].get("from_logits") for m in objects)
    assert any(m[2]["name"].startswith("my_") for m in objects)
    assert any(len(m[2]) > 1 and not m[2].get("from_logits") for m in objects if m[1] == "AUC")


def _plain_sgd_config() -> oracle.Config:
    config = next(c for c in oracle.configs(200) if not oracle.known_differences(c)
                  and oracle.refusal_of(c) is None and c.optimizer == ("name", "sgd") and c.epochs >= 2)
    return dataclasses.replace(config)


def test_oracle_sees_a_small_weight_difference(monkeypatch):
    """The comparison is not blind: dfit started from weights 1e-4 off Keras' fails."""
    config = _plain_sgd_config()
    assert oracle.run(config).status == "pass"
    copy = oracle.copy_weights

    def off_by_a_little(kmodel, module):
        copy(kmodel, module)
        with oracle.torch.no_grad():
            module.heads[0].bias.add_(1e-4)

    monkeypatch.setattr(oracle, "copy_weights", off_by_a_little)
    outcome = oracle.run(config)
    assert outcome.status == "fail" and "differ" in outcome.cause, outcome


def test_oracle_sees_a_different_loss(monkeypatch):
    """... and dfit trained on another objective (the Keras side keeps the drawn loss) fails."""
    config = _plain_sgd_config()
    real = oracle.compile_args

    def other_loss(lib, cfg):
        args = real(lib, cfg)
        if lib == "dfit":
            args["loss"] = oracle.dfit.losses.MeanSquaredError() if cfg.form == "single" else args["loss"]
        return args

    config = dataclasses.replace(config, form="single", heads=config.heads[:1], losses=[("name", "mae")],
                                 metrics=[[]], weighted_metrics=[[]], loss_weights=None, class_weight=False)
    config.heads[0] = oracle.Head("regression", 2, "linear")
    assert oracle.run(config).status == "pass"
    monkeypatch.setattr(oracle, "compile_args", other_loss)
    outcome = oracle.run(config)
    assert outcome.status == "fail" and "values differ" in outcome.cause, outcome
