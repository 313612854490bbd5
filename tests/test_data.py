import math

import torch

from pipeline.config import DataConfig
from pipeline.data import correlated_features, generator_for, importances, make_dataset, targets_for


def test_split_sizes_and_determinism():
    config = DataConfig()
    first, again, other = make_dataset(config, 3), make_dataset(config, 3), make_dataset(config, 4)
    assert first.train_inputs.shape == (820, 8) and first.validation_inputs.shape == (204, 8)
    assert torch.equal(first.train_inputs, again.train_inputs)
    assert not torch.equal(first.train_inputs, other.train_inputs)
    assert torch.allclose(first.importances, torch.tensor([0.9**i for i in range(8)]))


def test_streams_are_independent():
    a = torch.rand(5, generator=generator_for(0, "data"))
    b = torch.rand(5, generator=generator_for(0, "noise_bipolar"))
    c = torch.rand(5, generator=generator_for(1, "data"))
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_feature_statistics_follow_the_generative_process():
    config = DataConfig(samples=40000)
    x = correlated_features(config, generator_for(0, "data"))
    assert (x >= 0).all()
    # P(non-zero) = P(group active) · P(kept) · P(feature value > 0) = 0.6 · 0.5 · 0.5.
    assert abs((x > 0).float().mean().item() - 0.15) < 0.01
    correlation = torch.corrcoef(x.t())
    within = [correlation[0, 1], correlation[3, 4], correlation[5, 7]]
    across = [correlation[0, 3], correlation[2, 6], correlation[4, 5]]
    assert min(within) > 0.1
    assert max(abs(value) for value in across) < 0.03


def test_published_targets_by_hand():
    x = torch.tensor([[0.5, 1.0, 2.0, 0.3, 0.7, 1.5, 0.2, 0.4]])
    x0, x1, x2, x3, x4, x5, x6, x7 = x[0].tolist()
    expected = [
        x0 * x1 + 0.5 * x2,
        math.sin(x0 + x2) + x1,
        x0**2 + x1 * x2,
        x3 * x4 + 0.3 * x5,
        math.tanh(x3 + x4),
        x5 * x6 * x7,
        x5 + 0.7 * x7,
        x6**2 + x5 * x7,
    ]
    assert torch.allclose(targets_for(x, DataConfig())[0], torch.tensor(expected))
    dataset = make_dataset(DataConfig(samples=32), 0)
    unweighted = targets_for(dataset.train_inputs, DataConfig())
    assert torch.allclose(dataset.train_targets, unweighted * importances(DataConfig()))


def test_pairwise_targets_for_other_layouts():
    config = DataConfig(group_sizes=(2, 2), targets="pairwise")
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    expected = [1 * 2 + 0.5, 2 * 1 + 1.0, 3 * 4 + 1.5, 4 * 3 + 2.0]
    assert torch.allclose(targets_for(x, config)[0], torch.tensor(expected))
