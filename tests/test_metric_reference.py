"""The decoder-overlap metrics of `pipeline.metrics` against numpy re-implementations written here.

Every expected value is computed from the definitions in docs/science.md §1.4 with numpy alone (no call into
`pipeline.metrics` other than the function under test), written as directly as the formula reads: masks
over k ≠ l, explicit double loops over k < l. A wrong divisor, a sum over all pairs instead of k < l, or a
weighting by latent order instead of by tracked feature then fails at rtol 1e-10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import metrics
from pipeline.config import DataConfig
from pipeline.data import importances as data_importances

RELATIVE_TOLERANCE = 1e-10
FEATURES = 8
# The published importances I_i = 0.9^i (docs/science.md §1.1), in float64 so the reference is exact.
PUBLISHED_IMPORTANCES = 0.9 ** np.arange(FEATURES, dtype=np.float64)
# (latents, hidden): the published SAE (16 × 12), more latents than features with a partial wraparound of
# k mod 8 (21), fewer latents than features (5), the smallest case (2), and latents ≤ hidden (6 × 40).
DECODER_SHAPES = [(16, 12), (21, 12), (5, 7), (2, 3), (6, 40), (33, 4)]


def random_decoder(latents: int, hidden: int, seed: int) -> np.ndarray:
    """Gaussian decoder rows `[latent, hidden]` with lengths far from 1, so normalisation matters."""
    generator = np.random.default_rng(seed)
    return generator.standard_normal((latents, hidden)) * generator.uniform(0.1, 5.0, size=(latents, 1))


def numpy_cosines(decoder: np.ndarray) -> np.ndarray:
    """cos(d_k, d_l) for every pair of rows; a zero row has cosine 0 with everything (metrics docstring)."""
    lengths = np.linalg.norm(decoder, axis=1)
    safe_lengths = np.where(lengths > 0, lengths, 1.0)
    unit = np.where(lengths[:, None] > 0, decoder / safe_lengths[:, None], 0.0)
    return unit @ unit.T


def numpy_macs(decoder: np.ndarray) -> float:
    """mean over k ≠ l of |cos(d_k, d_l)| (docs/science.md §1.4, `macs`)."""
    latents = decoder.shape[0]
    off_diagonal = ~np.eye(latents, dtype=bool)
    return float(np.abs(numpy_cosines(decoder))[off_diagonal].mean())


def numpy_macs_published_form(decoder: np.ndarray) -> float:
    """The published code's form: |cos| with the diagonal set to zero, averaged over all N² entries."""
    absolute = np.abs(numpy_cosines(decoder))
    np.fill_diagonal(absolute, 0.0)
    return float(absolute.mean())


def numpy_pairwise_interference(decoder: np.ndarray, latent_weights: np.ndarray) -> float:
    """Σ_{k<l} cos²(d_k, d_l)·w_k·w_l as the plain double loop (docs/science.md §1.4)."""
    cosines = numpy_cosines(decoder)
    latents = decoder.shape[0]
    return sum(
        cosines[k, other] ** 2 * latent_weights[k] * latent_weights[other]
        for k in range(latents)
        for other in range(k + 1, latents)
    )


@pytest.mark.parametrize(("latents", "hidden"), DECODER_SHAPES)
def test_macs_matches_numpy_mean_over_distinct_pairs(latents, hidden):
    decoder = random_decoder(latents, hidden, seed=latents * 100 + hidden)
    expected = numpy_macs(decoder)
    assert metrics.macs(torch.from_numpy(decoder)) == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


@pytest.mark.parametrize(("latents", "hidden"), DECODER_SHAPES)
def test_macs_published_form_matches_numpy_mean_over_all_entries(latents, hidden):
    decoder = random_decoder(latents, hidden, seed=latents * 100 + hidden + 1)
    published = numpy_macs_published_form(decoder)
    assert metrics.macs_published_form(torch.from_numpy(decoder)) == pytest.approx(
        published, rel=RELATIVE_TOLERANCE
    )
    # The relation docs/science.md §1.4 states, checked on the numpy values only: published = ours·(N−1)/N.
    assert published == pytest.approx(numpy_macs(decoder) * (latents - 1) / latents, rel=RELATIVE_TOLERANCE)


def test_macs_forms_count_a_zero_row_as_zero_overlap():
    # A latent without a direction: the docstrings promise cosine 0 rather than NaN, and it still counts
    # in the number of pairs (the divisor), which is what the numpy reference does.
    decoder = random_decoder(7, 5, seed=9)
    decoder[3] = 0.0
    tensor = torch.from_numpy(decoder)
    assert metrics.macs(tensor) == pytest.approx(numpy_macs(decoder), rel=RELATIVE_TOLERANCE)
    assert metrics.macs_published_form(tensor) == pytest.approx(
        numpy_macs_published_form(decoder), rel=RELATIVE_TOLERANCE
    )


@pytest.mark.parametrize(("latents", "hidden"), DECODER_SHAPES)
def test_interference_seed_matches_numpy_double_loop_with_index_mod_importances(latents, hidden):
    decoder = random_decoder(latents, hidden, seed=latents * 100 + hidden + 2)
    latent_weights = np.array([PUBLISHED_IMPORTANCES[k % FEATURES] for k in range(latents)])
    expected = numpy_pairwise_interference(decoder, latent_weights)
    observed = metrics.interference_seed(torch.from_numpy(decoder), torch.from_numpy(PUBLISHED_IMPORTANCES))
    assert observed == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


def test_default_data_importances_are_the_published_powers_of_nine_tenths():
    # The pipeline feeds `Dataset.importances` (float32) into both interference forms.
    np.testing.assert_allclose(data_importances(DataConfig()).numpy(), PUBLISHED_IMPORTANCES, rtol=1e-6)


def hand_built_activations(assignment: list[int], samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features `[sample, feature]` and latents `[sample, latent]` in which latent k is a scaled copy of
    feature assignment[k] (sign flipped for odd k, since the assignment goes by |corr|) plus 1 % noise, or a
    constant column when assignment[k] = −1 (a dead latent, which tracks no feature)."""
    generator = np.random.default_rng(seed)
    features = np.maximum(generator.standard_normal((samples, FEATURES)), 0.0)
    columns = []
    for k, feature in enumerate(assignment):
        if feature < 0:
            columns.append(np.full(samples, 0.25))
            continue
        sign = -1.0 if k % 2 else 1.0
        copy = sign * (k + 1) * features[:, feature]
        columns.append(copy + 0.01 * copy.std() * generator.standard_normal(samples))
    return features, np.stack(columns, axis=1)


# Hand-built feature assignments: repeated features, features out of latent order (so I[k mod F] would give
# different weights), and dead latents (−1).
ASSIGNMENTS = [
    [7, 0, 3, 3, 6, -1, 1, 5, 2, 4, 0, -1, 7, 2, 6, 1],
    [2, 2, 2, 5, 0],
    [-1, 4, 6],
]


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=lambda assignment: f"{len(assignment)}_latents")
def test_interference_weights_each_latent_by_the_feature_it_tracks(assignment):
    latents = len(assignment)
    features, activations = hand_built_activations(assignment, samples=400, seed=latents)
    decoder = random_decoder(latents, 12, seed=latents + 50)
    # Precondition: the pipeline recovers the assignment the activations were built with.
    recovered = metrics.latent_feature_assignment(torch.from_numpy(activations), torch.from_numpy(features))
    assert recovered.tolist() == assignment
    latent_weights = np.array(
        [PUBLISHED_IMPORTANCES[feature] if feature >= 0 else 0.0 for feature in assignment]
    )
    expected = numpy_pairwise_interference(decoder, latent_weights)
    observed = metrics.interference(
        torch.from_numpy(decoder),
        torch.from_numpy(activations),
        torch.from_numpy(features),
        torch.from_numpy(PUBLISHED_IMPORTANCES),
    )
    assert observed == pytest.approx(expected, rel=RELATIVE_TOLERANCE)
    # The index-mod weighting gives a different number on the same decoder: the test above can tell them apart.
    index_mod = numpy_pairwise_interference(
        decoder, np.array([PUBLISHED_IMPORTANCES[k % FEATURES] for k in range(latents)])
    )
    assert abs(index_mod - expected) > 1e-3 * expected
