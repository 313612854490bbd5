"""The bug-compatible published SAE and the published-code → ours ladder, against independent references."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
import torch
from torch import nn

from pipeline.config import AblationConfig, DataConfig, NetworkConfig, SAEConfig
from pipeline.data import generator_for
from pipeline.published import LADDER_RUNGS, ladder_summary, published_ladder
from pipeline.sae import architecture
from pipeline.train import train_pass, train_saes_on_hidden

# The default widths (hidden 12, 16 latents): the fused engine compiles once per (inputs, outputs) width
# pair, 30-75 s each on a cold cache, so a test with widths of its own adds a compile to every CI run.
HIDDEN, LATENTS, SAMPLES, STEPS = 12, 16, 40, 12


def _published_reference(
    decoder_rows: torch.Tensor, bias: torch.Tensor, inputs: torch.Tensor, config: SAEConfig
):
    """The published SAE as its code builds it: two nn.Linear layers, the encoder weight a view of the
    decoder's transpose, one torch.optim.Adam over both, loss mean (x̂ − x)² + λ·Σ|z|; returns the weight."""
    encoder = nn.Linear(HIDDEN, LATENTS)
    decoder = nn.Linear(LATENTS, HIDDEN, bias=False)
    with torch.no_grad():
        decoder.weight.copy_(decoder_rows.t())  # nn.Linear keeps [out, in] = [hidden, latent]
        encoder.bias.copy_(bias)
    encoder.weight.data = decoder.weight.data.t()  # the defect: one storage, two parameters
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=config.lr)
    for _ in range(STEPS):
        latents = nn.functional.leaky_relu(encoder(inputs), config.leaky_slope)
        loss = ((decoder(latents) - inputs) ** 2).mean() + config.l1_coefficient * latents.abs().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert encoder.weight.data_ptr() == decoder.weight.data_ptr()  # still one storage
    return decoder.weight.detach().t()  # back to [latent, hidden] rows


def _sae_run(config: SAEConfig, inputs: torch.Tensor, seed: int):
    ablation = AblationConfig(sae=config, curve_every=1000)
    _, parameters, _ = train_saes_on_hidden([ablation], [seed], inputs.unsqueeze(0))
    return {name: value[0] for name, value in parameters.items()}


def test_tied_sae_matches_the_published_view_and_adam():
    seed = 3
    config = SAEConfig(
        architecture="published_tied",
        train_on="raw",
        d_sae=LATENTS,
        epochs=STEPS,
        lr=1e-2,
        l1_coefficient=1e-3,
    )
    inputs = (
        torch.randn(SAMPLES, HIDDEN, generator=torch.Generator().manual_seed(0)) * 2 + 1
    )  # raw, not standardized
    initial = architecture("published_tied").initial_parameters(
        HIDDEN, LATENTS, config, generator_for(seed, "sae")
    )
    expected = _published_reference(initial["decoder"], initial["encoder_bias"], inputs, config)

    trained = _sae_run(config, inputs, seed)
    assert torch.allclose(trained["decoder"], expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(trained["encoder"], trained["decoder"].t())
    # The fix makes a difference the comparison can see: untied training ends elsewhere.
    untied = _sae_run(dataclasses.replace(config, architecture="leaky_relu"), inputs, seed)
    assert (untied["decoder"] - expected).abs().max() > 1e-3


def test_raw_training_differs_from_standardized_training():
    inputs = torch.randn(SAMPLES, HIDDEN, generator=torch.Generator().manual_seed(1)) * 3 + 2
    config = SAEConfig(d_sae=LATENTS, epochs=STEPS, lr=1e-2)
    raw = _sae_run(dataclasses.replace(config, train_on="raw"), inputs, 0)
    standardized = _sae_run(config, inputs, 0)
    assert (raw["decoder"] - standardized["decoder"]).abs().max() > 1e-3
    # On inputs that are already standardized (per unit, train-split mean 0 and SD 1), the two agree.
    already = (inputs - inputs.mean(0)) / inputs.std(0)
    assert torch.allclose(
        _sae_run(dataclasses.replace(config, train_on="raw"), already, 0)["decoder"],
        _sae_run(config, already, 0)["decoder"],
        atol=1e-5,
    )


def test_new_field_keeps_old_config_hashes():
    config = AblationConfig()
    # The hash as it was computed before `sae.train_on` (and the later SAE and network settings, all marked
    # hash_omit_default) existed: sha256 of the canonical JSON without them.
    as_dict = json.loads(json.dumps(dataclasses.asdict(config)))
    for section, cls in (("sae", SAEConfig), ("network", NetworkConfig)):
        for item in dataclasses.fields(cls):
            if item.metadata.get("hash_omit_default"):
                del as_dict[section][item.name]
    old = hashlib.sha256(json.dumps(as_dict, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]
    assert config.hash() == old
    changed = dataclasses.replace(config, sae=dataclasses.replace(config.sae, train_on="raw"))
    assert changed.hash() != old
    assert AblationConfig.from_dict(changed.to_dict()).hash() == changed.hash()


def test_bad_training_input_is_refused_with_the_field_name():
    with pytest.raises(ValueError, match="sae.train_on must be one of standardized, raw"):
        SAEConfig(train_on="whitened")


def test_ladder_trains_four_saes_on_the_same_networks():
    config = AblationConfig(
        data=DataConfig(samples=96),
        network=NetworkConfig(epochs=30, hidden_layers=2),
        sae=SAEConfig(epochs=20),
    )
    seeds = [0, 1]
    results = train_pass([config] * 2, seeds)
    per_seed = published_ladder([(config, result.seed, result.network) for result in results])
    assert list(per_seed["rung"].unique()) == [rung for rung, _, _ in LADDER_RUNGS]
    assert len(per_seed) == 4 * len(seeds)
    ours = per_seed[per_seed["rung"] == LADDER_RUNGS[-1][0]].set_index("seed")
    # The last rung is this project's own SAE: it reproduces the pass's own SAE metrics on the same networks.
    from pipeline.data import make_dataset
    from pipeline.evaluation import evaluate_seed

    for result in results:
        metrics = evaluate_seed(config, result.network, result.sae, make_dataset(config.data, result.seed))
        assert ours.loc[result.seed, "macs"] == pytest.approx(metrics["macs"], rel=1e-5)
    summary = ladder_summary(per_seed)
    assert list(summary["rung"]) == [rung for rung, _, _ in LADDER_RUNGS]
    assert summary["macs_published_form change from published code"].iloc[0] == 0
