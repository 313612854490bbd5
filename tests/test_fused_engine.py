"""The fused CPU engine (pipeline/fused.py) against the torch engine it replaces on the CPU.

The torch engine (`POLYLAB_ENGINE=torch`) is the reference: it is itself checked against nn.Linear,
autograd and torch.optim.Adam (tests/test_training_reference.py). Both engines draw the same initial
parameters and the same noise (bit for bit), so they differ only by float32 rounding. What rounding does
over a run, measured on the 20 configurations below:

- For as long as no sample sits at a kink, the engines agree to rounding: network parameters to 1.4e-6,
  curve points to 1e-6 relative. An SAE given the same hidden activations agrees to 2.4e-7 (1.2e-6 on
  raw inputs), what a one-ulp change of its input moves it by on either engine; inside a pass it also
  sees the networks' differences, enlarged by standardizing nearly constant units: 7e-5.
- Once a pre-activation within rounding of a ReLU kink (or an L1 sign) goes one way on one engine and
  the other way on the other, Adam, whose step barely depends on the gradient's size, moves the
  parameters it feeds by up to a step (lr = 1e-3) apart. One of the 20 models (random·Student-t·l2·relu,
  seed 0) does so between epochs 155 and 160: 3.3e-4 at epoch 200, its curves 1e-4 relative, its
  metrics 2e-4 relative.

So: a tight comparison over the first 60 epochs for every model, and over 200 epochs a tight one for
most models and a bound of about one Adam step for all. Each tolerance is 3× to 10× the largest gap
measured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from pipeline import fused
from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig
from pipeline.data import make_dataset
from pipeline.evaluation import METRIC_NAMES, evaluate_seed
from pipeline.train import fill_unit_noise, train_pass

pytestmark = pytest.mark.skipif(fused.numba is None, reason="numba is not installed: the fused engine is off")

PARAMETER_TOLERANCE = 1e-5
SAE_SAME_INPUT_TOLERANCE = 4e-6
SAE_IN_PASS_TOLERANCE = 3e-4
CURVE_RELATIVE_TOLERANCE = 1e-5
METRIC_RELATIVE_TOLERANCE = 1e-3
# Over 200 epochs (see above): the share of models that must still agree to the tolerances above, and the
# bounds for every model.
AGREEING_SHARE = 0.75
LONG_RUN_PARAMETER_TOLERANCE = 1e-3
LONG_RUN_SAE_TOLERANCE = 3e-3
LONG_RUN_CURVE_RELATIVE_TOLERANCE = 1e-3
LONG_RUN_METRIC_RELATIVE_TOLERANCE = 3e-3
EPOCHS = 200


def engine_config(
    architecture: str = "leaky_relu", train_on: str = "standardized", epochs: int = EPOCHS, **network
) -> AblationConfig:
    """Published widths, 64 samples (52 train: less than a tile, so the tile's remainder path runs),
    `epochs` epochs of each stage."""
    return AblationConfig(
        data=DataConfig(samples=64),
        network=NetworkConfig(epochs=epochs, **network),
        sae=SAEConfig(epochs=epochs, architecture=architecture, train_on=train_on),
        curve_every=50 if epochs >= 100 else 20,
        metric_null_draws=20,
    )


def every_combination(epochs: int) -> list[AblationConfig]:
    """The 16 cells of init × noise × reg × act, plus the settings the factors leave out: the L2 penalty
    form, Gaussian noise and none, and per-model σ, λ and learning rates."""
    configs = [
        engine_config(epochs=epochs, init=init, noise=noise, reg=reg, act=act)
        for init, noise, reg, act in itertools.product(
            ("random", "orthogonal"), ("bipolar", "positive_kurtosis"), ("l1", "l2"), ("relu", "gelu")
        )
    ]
    return configs + [
        engine_config(epochs=epochs, reg="l2", l2_form="penalty", lambda_reg=1e-3, act="gelu"),
        engine_config(epochs=epochs, noise="gaussian", sigma=0.3, lr=3e-3),
        engine_config(epochs=epochs, noise="none", reg="none", act="gelu"),
        engine_config(epochs=epochs, init="orthogonal", reg="l1", lambda_reg=1e-3, sigma=0.05),
    ]


def train_with(engine: str, monkeypatch, configs, seeds):
    monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
    return train_pass(configs, seeds)


def largest_gaps(fused_seed, torch_seed, config, seed) -> dict[str, float]:
    """The largest gap between the engines' results for one model: absolute for the network's and the
    SAE's parameters, relative for the curve points and the metrics (relative to max(|value|, 0.01) for
    the metrics, as several of them sit near zero)."""
    assert fused_seed.failure is None and torch_seed.failure is None, (fused_seed.failure, torch_seed.failure)
    gaps = {}
    for module in ("network", "sae"):
        fused_state = getattr(fused_seed, module).state_dict()
        torch_state = getattr(torch_seed, module).state_dict()
        assert fused_state.keys() == torch_state.keys()
        gaps[module] = max(
            (fused_state[name] - value).abs().max().item() for name, value in torch_state.items()
        )
    curve_gap = 0.0
    for stage in ("network", "sae"):
        assert fused_seed.curves[stage]["epoch"] == torch_seed.curves[stage]["epoch"]
        for name, values in torch_seed.curves[stage].items():
            if name != "epoch":
                for ours, reference in zip(fused_seed.curves[stage][name], values, strict=True):
                    curve_gap = max(curve_gap, abs(ours - reference) / max(abs(reference), 1e-6))
    gaps["curves"] = curve_gap
    dataset = make_dataset(config.data, seed)
    fused_metrics = evaluate_seed(config, fused_seed.network, fused_seed.sae, dataset)
    torch_metrics = evaluate_seed(config, torch_seed.network, torch_seed.sae, dataset)
    gaps["metrics"] = max(
        abs(fused_metrics[name] - torch_metrics[name]) / max(abs(torch_metrics[name]), 1e-2)
        for name in METRIC_NAMES
    )
    return gaps


TOLERANCES = {
    "network": PARAMETER_TOLERANCE,
    "sae": SAE_IN_PASS_TOLERANCE,
    "curves": CURVE_RELATIVE_TOLERANCE,
    "metrics": METRIC_RELATIVE_TOLERANCE,
}
LONG_RUN_TOLERANCES = {
    "network": LONG_RUN_PARAMETER_TOLERANCE,
    "sae": LONG_RUN_SAE_TOLERANCE,
    "curves": LONG_RUN_CURVE_RELATIVE_TOLERANCE,
    "metrics": LONG_RUN_METRIC_RELATIVE_TOLERANCE,
}


def model_gaps(monkeypatch, configs, seeds) -> list[dict[str, float]]:
    fused_results = train_with("fused", monkeypatch, configs, seeds)
    torch_results = train_with("torch", monkeypatch, configs, seeds)
    return [largest_gaps(*pair) for pair in zip(fused_results, torch_results, configs, seeds, strict=True)]


def within(gaps: dict[str, float], tolerances: dict[str, float]) -> bool:
    return all(gaps[name] <= tolerance for name, tolerance in tolerances.items())


def test_engines_agree_to_rounding_over_60_epochs_on_every_combination(monkeypatch):
    # One pass, seeds 0–2 interleaved, so noise streams are shared and split as in a sweep.
    configs = every_combination(60)
    seeds = [index % 3 for index in range(len(configs))]
    for config, gaps in zip(configs, model_gaps(monkeypatch, configs, seeds), strict=True):
        assert within(gaps, TOLERANCES), (config.name, gaps)


def test_engines_agree_over_200_epochs_on_every_combination(monkeypatch):
    configs = every_combination(EPOCHS)
    seeds = [index % 3 for index in range(len(configs))]
    all_gaps = model_gaps(monkeypatch, configs, seeds)
    for config, gaps in zip(configs, all_gaps, strict=True):
        assert within(gaps, LONG_RUN_TOLERANCES), (config.name, gaps)
    agreeing = sum(within(gaps, TOLERANCES) for gaps in all_gaps)
    assert agreeing >= AGREEING_SHARE * len(configs), all_gaps


@pytest.mark.parametrize(("architecture", "train_on"), [("relu", "standardized"), ("published_tied", "raw")])
def test_engines_agree_on_the_other_fused_sae_architectures(monkeypatch, architecture, train_on):
    configs = [
        engine_config(architecture, train_on),
        engine_config(architecture, train_on, init="orthogonal", noise="positive_kurtosis", act="gelu"),
    ]
    for config, gaps in zip(configs, model_gaps(monkeypatch, configs, [0, 1]), strict=True):
        assert within(gaps, LONG_RUN_TOLERANCES), (config.name, gaps)


@pytest.mark.parametrize(
    ("architecture", "train_on"),
    [("leaky_relu", "standardized"), ("relu", "standardized"), ("published_tied", "raw")],
)
def test_sae_engines_agree_on_the_same_hidden_activations(monkeypatch, architecture, train_on):
    from pipeline.train import train_saes_on_hidden

    configs = [engine_config(architecture, train_on), engine_config(architecture, train_on, act="gelu")]
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "torch")
    networks = train_pass(configs, [0, 1])
    hidden = torch.stack(
        [
            result.network.forward_with_hidden(make_dataset(config.data, seed).train_inputs)[1].detach()
            for result, config, seed in zip(networks, configs, [0, 1], strict=True)
        ]
    )
    curves, parameters = {}, {}
    for engine in ("fused", "torch"):
        monkeypatch.setenv(fused.ENGINE_VARIABLE, engine)
        curves[engine], parameters[engine], _ = train_saes_on_hidden(configs, [0, 1], hidden)
    for name, value in parameters["torch"].items():
        gap = (parameters["fused"][name] - value).abs().max().item()
        assert gap <= SAE_SAME_INPUT_TOLERANCE, (name, gap)
    for name, values in curves["torch"].items():
        assert np.allclose(curves["fused"][name], values, rtol=CURVE_RELATIVE_TOLERANCE, atol=1e-7), name


def test_seed_alone_equals_seed_in_a_batch_and_any_thread_count(monkeypatch):
    # One model is computed by one thread in a fixed order, so its numbers are exactly the same whatever
    # shares its pass and however many threads run it.
    first = engine_config()
    second = engine_config(init="orthogonal", noise="positive_kurtosis", reg="l2", act="gelu", sigma=0.2)
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "fused")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        mixed = train_pass([first, second, first, second], [0, 0, 1, 1])
        torch.set_num_threads(1)
        alone = train_pass([second], [1])[0]
    finally:
        torch.set_num_threads(threads)
    batched = mixed[3]
    for module in ("network", "sae"):
        batched_state, alone_state = (
            getattr(batched, module).state_dict(),
            getattr(alone, module).state_dict(),
        )
        for name, value in alone_state.items():
            assert torch.equal(batched_state[name], value), (module, name)
    assert batched.curves == alone.curves


def test_divergence_fails_the_same_models_with_the_same_reasons(monkeypatch):
    configs = [engine_config(), engine_config(sigma=1e30), engine_config(lr=50.0, reg="none")]
    seeds = [0, 0, 1]
    fused_results = train_with("fused", monkeypatch, configs, seeds)
    torch_results = train_with("torch", monkeypatch, configs, seeds)
    assert [seed.failure for seed in fused_results] == [seed.failure for seed in torch_results]
    assert fused_results[0].finished and fused_results[1].failure.startswith(
        "network loss became inf at epoch 0"
    )
    for name, value in torch_results[0].network.state_dict().items():
        torch.testing.assert_close(
            fused_results[0].network.state_dict()[name], value, atol=PARAMETER_TOLERANCE, rtol=0
        )


def test_engine_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "torch")
    assert not fused.applies(cpu)
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "auto")
    assert fused.applies(cpu) and fused.applies(cpu, "leaky_relu")
    # Architectures the kernel does not fuse, and accelerators, train on the torch engine.
    assert not fused.applies(cpu, "some_other_architecture")
    assert not fused.applies(torch.device("meta"))
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "fast")
    with pytest.raises(ValueError, match="POLYLAB_ENGINE must be one of"):
        fused.chosen_engine()


def test_gelu_and_its_derivative_match_torch():
    # The kernel's GELU takes Φ from the normal tail (Abramowitz & Stegun 7.1.26) and exp from a
    # polynomial, both vectorizable, instead of libm's erf and exp.
    pre = torch.linspace(-12, 12, 24001)
    values = pre.numpy().reshape(1, -1).copy()
    derivative = np.empty_like(values)
    fused._activate(values, derivative, 1, values.shape[1], True)
    # Against the exact value: 4e-7 measured, most of it float32's rounding of x·Φ near |x| = 12.
    exact = pre.double() * 0.5 * (1 + torch.special.erf(pre.double() / math.sqrt(2)))
    assert (torch.from_numpy(values[0]).double() - exact).abs().max().item() < 1e-6
    torch.testing.assert_close(
        torch.from_numpy(values[0]), torch.nn.functional.gelu(pre), atol=2e-6, rtol=1e-6
    )
    expected = torch.ops.aten.gelu_backward(torch.ones_like(pre), pre)
    torch.testing.assert_close(torch.from_numpy(derivative[0]), expected, atol=2e-6, rtol=1e-6)


def test_normal_tail_approximation_error():
    # Φ(−|x|) as the kernel forms it, in float64 with its coefficients (the approximation alone), then
    # evaluated by the kernel in float32: within A&S's 1.5e-7 on erfc (7.5e-8 on Φ), then with rounding.
    grid = np.linspace(0.0, 9.0, 9001)
    t = 1 / (1 + np.float64(fused._TAIL_SCALE) * grid)
    coefficients = [
        np.float64(c)
        for c in (fused._TAIL_A1, fused._TAIL_A2, fused._TAIL_A3, fused._TAIL_A4, fused._TAIL_A5)
    ]
    polynomial = t * (
        coefficients[0]
        + t * (coefficients[1] + t * (coefficients[2] + t * (coefficients[3] + t * coefficients[4])))
    )
    tail = polynomial * np.exp(-grid * grid / 2)
    exact = np.array([0.5 * math.erfc(x / math.sqrt(2)) for x in grid])
    assert np.abs(tail - exact).max() < 8e-8
    pre = np.concatenate([-grid[::-1], grid]).astype(np.float32).reshape(1, -1)
    values, derivative = pre.copy(), np.empty_like(pre)
    fused._activate(values, derivative, 1, pre.shape[1], True)
    cdf = np.where(pre[0] != 0, values[0].astype(np.float64) / np.where(pre[0] != 0, pre[0], 1), 0.5)
    exact_cdf = np.array([0.5 * math.erfc(-x / math.sqrt(2)) for x in pre[0].astype(np.float64)])
    nonzero = np.abs(pre[0]) > 0.5  # away from 0, where x·Φ/x loses digits to the division
    # The float32 exponential (its relative error, up to 4e-6, comes from five squarings) carries into
    # the tail: 5.1e-7 measured, at x ≈ −0.64. torch's own float32 GELU is 1.2e-6 from the exact value.
    assert np.abs(cdf - exact_cdf)[nonzero].max() < 1e-6


def test_fused_student_t_noise_is_the_reference_draws_bit_for_bit():
    # The same uniforms (numpy's own, or the same ones formed from raw PCG64 outputs), the same accepted
    # candidates and numpy's power: the same numbers exactly, and the generators end in the same state.
    for seed in range(3):
        reference_generator, fused_generator = np.random.default_rng(seed), np.random.default_rng(seed)
        for shape in ((7, 12, 53), (1, 3, 5), (10, 12, 820)):
            reference = fill_unit_noise("positive_kurtosis", torch.empty(shape), reference_generator)
            ours = fused.fill_unit_noise("positive_kurtosis", torch.empty(shape), fused_generator)
            assert torch.equal(ours, reference)
        assert reference_generator.random(5).tolist() == fused_generator.random(5).tolist()


def test_uniforms_from_raw_outputs_are_numpys_float32_uniforms():
    for candidates in (1, 2, 77, 4096):
        numpy_side, raw_side = np.random.default_rng(candidates), np.random.default_rng(candidates)
        expected = numpy_side.random((2, candidates), dtype=np.float32)
        assert np.array_equal(fused._uniform_pairs(raw_side, candidates), expected)
        assert numpy_side.integers(0, 2**32, 3).tolist() == raw_side.integers(0, 2**32, 3).tolist()
    # A half word left over from an odd float32 draw: numpy's own call, which uses it first.
    numpy_side, raw_side = np.random.default_rng(5), np.random.default_rng(5)
    numpy_side.random(1, dtype=np.float32)
    raw_side.random(1, dtype=np.float32)
    assert raw_side.bit_generator.state["has_uint32"]
    assert np.array_equal(fused._uniform_pairs(raw_side, 9), numpy_side.random((2, 9), dtype=np.float32))


def test_a_pass_with_an_unfused_sae_architecture_trains_its_sae_on_the_torch_engine(monkeypatch):
    from pipeline import sae as sae_architectures

    class Unfused(sae_architectures.ReLUSAE):
        """The ReLU SAE under another name, which the fused engine does not know."""

    monkeypatch.setitem(sae_architectures.ARCHITECTURES, "unfused_relu", Unfused())
    config = engine_config()
    unfused = dataclasses.replace(config, sae=dataclasses.replace(config.sae, architecture="unfused_relu"))
    reference = dataclasses.replace(config, sae=dataclasses.replace(config.sae, architecture="relu"))
    monkeypatch.setenv(fused.ENGINE_VARIABLE, "auto")
    via_fallback = train_pass([unfused], [0])[0]
    via_kernel = train_pass([reference], [0])[0]
    for name, value in via_kernel.sae.state_dict().items():
        torch.testing.assert_close(
            via_fallback.sae.state_dict()[name], value, atol=PARAMETER_TOLERANCE, rtol=0
        )
