"""Every metric of the taming study, computed for one seed (no seed dimension).

Inputs are CPU torch tensors of any floating dtype; everything is computed in float64 and scalars come back
as python floats. Tensor results are float64 unless stated otherwise.

Conventions used throughout:
- `decoder: [latent, hidden]`: row k is the decoder direction d_k of latent k. A PyTorch
  `nn.Linear(latent, hidden)` stores its weight as `[hidden, latent]`, so pass `linear.weight.T`.
- `latents: [sample, latent]`, `features: [sample, feature]`, `hidden: [sample, hidden]`.

Definitions follow docs/science.md §1.4 (taming study metrics) and §3 (explained variance); the published
forms that docs/science.md §1.3/§1.4 call defective are kept under explicit names, for comparison only.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch

TAMING_METRIC_NAMES: tuple[str, ...] = (
    "macs",
    "macs_published_form",
    "calibrated_macs",
    "interference",
    "interference_seed",
    "l0_sparsity",
    "dead_latents",
    "dead_neurons",
    "sparsity_w4",
    "sae_mse",
    "sae_fvu",
    "neuron_polysemantic",
    "neuron_polysemantic_fraction",
    "neuron_participation_ratio",
    "latent_polysemantic",
    "latent_polysemantic_fraction",
    "latent_participation_ratio",
    "feature_mmcs",
    "feature_mcc",
)

HEADLINE_METRICS: tuple[str, ...] = (
    "macs",
    "interference",
    "neuron_polysemantic",
    "latent_polysemantic",
    "feature_mcc",
    "sae_fvu",
)

# The values each metric can take, (low, high), inf where a side is open. Summaries clip confidence
# intervals to these (pipeline.stats.describe(bounds=...)): a t-interval is symmetric, so near a bound it
# spills into impossible values (a negative fraction of dead latents); clipping cannot lower its coverage,
# because the true mean lies inside the range. One entry per name of pipeline.evaluation.METRIC_NAMES
# (tests/test_metric_ranges.py checks the two agree; this module cannot import that one, which imports it).
_UNBOUNDED_ABOVE = math.inf
METRIC_RANGES: dict[str, tuple[float, float]] = {
    # Network task loss: a mean of squares.
    "train_mse": (0.0, _UNBOUNDED_ABOVE),
    "val_mse": (0.0, _UNBOUNDED_ABOVE),
    # Means of |cos| between distinct directions (the published form is that times (N−1)/N).
    "macs": (0.0, 1.0),
    "macs_published_form": (0.0, 1.0),
    # A normal CDF value: a probability.
    "calibrated_macs": (0.0, 1.0),
    # Sums of cos² times products of importances (all ≥ 0); the ceiling grows with the latent count.
    "interference": (0.0, _UNBOUNDED_ABOVE),
    "interference_seed": (0.0, _UNBOUNDED_ABOVE),
    # Fractions of latents.
    "l0_sparsity": (0.0, 1.0),
    "dead_latents": (0.0, 1.0),
    # Mean fourth power of the weights.
    "dead_neurons": (0.0, 1.0),
    "sparsity_w4": (0.0, _UNBOUNDED_ABOVE),
    # Reconstruction error; FVU exceeds 1 when the SAE does worse than predicting the mean.
    "sae_mse": (0.0, _UNBOUNDED_ABOVE),
    "sae_fvu": (0.0, _UNBOUNDED_ABOVE),
    # Counts of units (the ceiling is the layer's width, which is a setting), fractions of responsive units,
    # and participation ratios, which are at least 1 (one feature) for a non-negative attribution row.
    "neuron_polysemantic": (0.0, _UNBOUNDED_ABOVE),
    "neuron_polysemantic_fraction": (0.0, 1.0),
    "neuron_participation_ratio": (1.0, _UNBOUNDED_ABOVE),
    "latent_polysemantic": (0.0, _UNBOUNDED_ABOVE),
    "latent_polysemantic_fraction": (0.0, 1.0),
    "latent_participation_ratio": (1.0, _UNBOUNDED_ABOVE),
    # MMCS takes the largest *signed* cosine, so a feature whose best latent points away from it is negative;
    # MCC averages |cos| over the matching.
    "feature_mmcs": (-1.0, 1.0),
    "feature_mcc": (0.0, 1.0),
}


def metric_bounds(name: str) -> tuple[float, float]:
    """(low, high) of a taming metric, from METRIC_RANGES; KeyError naming the metric when it has none.

    Strict on purpose: a metric added without a range should fail where its summary is computed, not be
    summarized with an unclipped interval.
    """
    try:
        return METRIC_RANGES[name]
    except KeyError:
        raise KeyError(f"metric {name!r} has no documented range in pipeline.metrics.METRIC_RANGES") from None


# A column whose standard deviation is below this fraction of its largest magnitude is treated as constant.
# Exact zero is not enough: the float mean of n copies of c is not always c, which leaves ~1e-17 residues
# whose "correlation" with anything is arbitrary.
_CONSTANT_RELATIVE_TOLERANCE = 1e-10


def _matrix(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` as a detached float64 CPU matrix; ValueError unless it is 2-D."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be 2-D; got shape {tuple(tensor.shape)}")
    return tensor.detach().to(device="cpu", dtype=torch.float64)


def _same_samples(**matrices: torch.Tensor) -> None:
    counts = {name: matrix.shape[0] for name, matrix in matrices.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"sample counts differ: {counts}")


# ---------------------------------------------------------------------------------------------------------
# Decoder overlap (MACS) and its null distributions


def unit_directions(decoder: torch.Tensor) -> torch.Tensor:
    """Decoder directions scaled to unit length: u_k = d_k / ‖d_k‖.

    decoder: [latent, hidden] -> [latent, hidden] (float64). Rows of zeros stay zero, so a latent without a
    direction has cosine 0 with every other latent instead of NaN. Source: docs/science.md §1.4 (notation).
    """
    directions = _matrix("decoder", decoder)
    lengths = directions.norm(dim=1, keepdim=True)
    return torch.where(lengths > 0, directions / lengths.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def cosine_matrix(decoder: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities C_kl = cos(d_k, d_l) of the decoder rows.

    decoder: [latent, hidden] -> [latent, latent] (float64). Zero rows give 0 (also on the diagonal).
    Source: docs/science.md §1.4.
    """
    unit = unit_directions(decoder)
    return unit @ unit.T


def _macs_of_unit_rows(unit: torch.Tensor) -> torch.Tensor:
    """MACS of unit rows `[..., latent, hidden]`, batched over leading dimensions."""
    latents = unit.shape[-2]
    absolute = (unit @ unit.transpose(-1, -2)).abs()
    off_diagonal = absolute.sum(dim=(-1, -2)) - absolute.diagonal(dim1=-2, dim2=-1).sum(-1)
    return off_diagonal / (latents * (latents - 1))


def _check_pairs(decoder: torch.Tensor) -> None:
    if decoder.shape[0] < 2:
        raise ValueError(f"MACS needs at least two latents; decoder has shape {tuple(decoder.shape)}")


def macs(decoder: torch.Tensor) -> float:
    """Mean absolute cosine similarity between distinct decoder directions.

        macs = 1/(N(N−1)) · Σ_{k≠l} |cos(d_k, d_l)|

    decoder: [latent, hidden], N = latent ≥ 2. 0 for orthogonal rows, 1 when all rows are parallel.
    Zero rows count as zero overlap. Source: docs/science.md §1.4 (`macs`).
    """
    unit = unit_directions(decoder)
    _check_pairs(unit)
    return float(_macs_of_unit_rows(unit))


def macs_published_form(decoder: torch.Tensor) -> float:
    """MACS as the published taming code computed it: the mean over all N² entries of |C| with a zeroed diagonal.

        macs_published = 1/N² · Σ_{k≠l} |cos(d_k, d_l)| = macs · (N−1)/N

    decoder: [latent, hidden]. Biased low by the factor (N−1)/N; kept only to compare with published
    numbers. Source: docs/science.md §1.4 (published forms), §1.5.
    """
    unit = unit_directions(decoder)
    _check_pairs(unit)
    latents = unit.shape[0]
    return float(_macs_of_unit_rows(unit)) * (latents - 1) / latents


@functools.lru_cache(maxsize=256)
def random_direction_null(latents: int, hidden: int, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """Null distribution of MACS for `latents` i.i.d. uniformly random unit vectors in R^hidden.

    Returns (mu0, sigma0): the mean and the sample standard deviation (ddof = 1) of macs over `draws`
    independent sets. Each direction is a standard Gaussian vector normalised to unit length, which is
    uniform on the sphere. Draws come from a `torch.Generator` seeded with `seed`, so the result depends
    only on the arguments (and is cached). For reference, two random unit vectors in R^d have
    E|cos| = Γ(d/2) / (√π · Γ((d+1)/2)) ≈ √(2/(πd)), 0.235 for d = 12, which mu0 estimates.
    Source: docs/science.md §1.4 (`calibrated_macs`, sound null).
    """
    if latents < 2 or hidden < 1 or draws < 2:
        raise ValueError(f"need latents >= 2, hidden >= 1, draws >= 2; got {latents}, {hidden}, {draws}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(draws, latents, hidden, generator=generator, dtype=torch.float64)
    unit = gaussian / gaussian.norm(dim=-1, keepdim=True)
    values = _macs_of_unit_rows(unit)
    return float(values.mean()), float(values.std(correction=1))


def calibrated_macs(decoder: torch.Tensor, draws: int = 200, seed: int = 0) -> float:
    """MACS expressed as a probability against the random-direction null.

        calibrated_macs = Φ(z),  z = (macs − mu0) / sigma0,  (mu0, sigma0) = random_direction_null(N, d)

    decoder: [latent, hidden]. Φ is the standard normal CDF. 0.5: overlap at chance level for random
    directions; near 1: more overlap than chance; near 0: less (e.g. orthogonal rows with N ≤ d). For a
    decoder drawn like the null the value is roughly uniform on [0, 1]. Source: docs/science.md §1.4
    (`calibrated_macs` with a non-degenerate null; the published permutation null is degenerate, see
    `published_permutation_null`).
    """
    unit = unit_directions(decoder)
    _check_pairs(unit)
    mu0, sigma0 = random_direction_null(unit.shape[0], unit.shape[1], draws, seed)
    observed = float(_macs_of_unit_rows(unit))
    if sigma0 == 0.0:
        # Only when hidden = 1: every random pair has |cos| = 1, so the null is a point mass.
        return 0.5 if observed == mu0 else float(observed > mu0)
    # Φ(z) = erfc(−z/√2)/2, the standard normal CDF, without importing scipy.stats (0.3 s) for it.
    return 0.5 * math.erfc(-(observed - mu0) / sigma0 / math.sqrt(2.0))


def published_permutation_null(decoder: torch.Tensor, draws: int = 200, seed: int = 0) -> tuple[float, float]:
    """The published code's MACS null: (mean, std) of macs over random permutations of the decoder.

    Each draw permutes the latents (rows) and the hidden coordinates (columns) of `decoder: [latent, hidden]`.
    Both leave every pairwise cosine unchanged, so the spread is rounding noise (≈ 0) and a z-score against it
    is meaningless. Kept to document the defect, never for calibration. Source: docs/science.md §1.4.
    """
    matrix = _matrix("decoder", decoder)
    _check_pairs(matrix)
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(draws):
        rows = torch.randperm(matrix.shape[0], generator=generator)
        columns = torch.randperm(matrix.shape[1], generator=generator)
        values.append(macs(matrix[rows][:, columns]))
    spread = torch.tensor(values, dtype=torch.float64)
    return float(spread.mean()), float(spread.std(correction=1))


# ---------------------------------------------------------------------------------------------------------
# Correlations, latent-to-feature assignment and interference


def absolute_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Absolute Pearson correlation |corr(a_j, b_i)| between every column of `a` and every column of `b`.

    a: [sample, p], b: [sample, q] -> [p, q] (float64, values in [0, 1]). A column with zero variance
    (constant over the samples, up to rounding) correlates 0 with everything, so the result has no NaN.
    Source: docs/science.md §1.4 (latent-to-feature assignment and attribution by |corr|).
    """
    first, second = _matrix("a", a), _matrix("b", b)
    _same_samples(a=first, b=second)
    if first.shape[0] < 2:
        raise ValueError("correlation needs at least two samples")

    def standardized(matrix: torch.Tensor) -> torch.Tensor:
        centered = matrix - matrix.mean(dim=0, keepdim=True)
        spread = centered.norm(dim=0)
        constant = spread <= _CONSTANT_RELATIVE_TOLERANCE * matrix.abs().amax(dim=0) * math.sqrt(
            matrix.shape[0]
        )
        return torch.where(constant, 0.0, centered / torch.where(constant, 1.0, spread))

    return (standardized(first).T @ standardized(second)).abs().clamp(max=1.0)


def latent_feature_assignment(latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The feature each latent tracks best: f_k = argmax_i |corr(z_k, x_i)|.

    latents: [sample, latent], features: [sample, feature] -> LongTensor [latent]. A latent whose
    correlations are all 0 (constant over the samples, i.e. dead, or facing only constant features) gets −1:
    it tracks no feature. Ties go to the lowest feature index. Source: docs/science.md §1.4 (`interference`).
    """
    correlation = absolute_correlation(latents, features)
    best_value, best_feature = correlation.max(dim=1)
    return torch.where(best_value > 0, best_feature, torch.full_like(best_feature, -1))


def _pairwise_weighted_sum(squared_cosines: torch.Tensor, weights: torch.Tensor) -> float:
    """Σ_{k<l} S_kl · w_k · w_l."""
    upper = torch.triu(torch.ones_like(squared_cosines, dtype=torch.bool), diagonal=1)
    return float((squared_cosines * torch.outer(weights, weights))[upper].sum())


def _importance_vector(importances: torch.Tensor) -> torch.Tensor:
    if not isinstance(importances, torch.Tensor) or importances.ndim != 1:
        raise ValueError("importances must be a 1-D tensor [feature]")
    return importances.detach().to(device="cpu", dtype=torch.float64)


def interference(
    decoder: torch.Tensor, latents: torch.Tensor, features: torch.Tensor, importances: torch.Tensor
) -> float:
    """Importance-weighted overlap of decoder directions, each latent weighted by the feature it tracks.

        interference = Σ_{k<l} cos²(d_k, d_l) · I(f_k) · I(f_l),  f_k from `latent_feature_assignment`

    decoder: [latent, hidden], latents: [sample, latent], features: [sample, feature],
    importances: [feature]. A latent with f_k = −1 contributes 0: it tracks no feature, so no feature's
    importance is at stake when its direction overlaps another, and a latent that never varies adds the
    same vector to every reconstruction (a bias), so its overlap interferes with nothing.
    Source: docs/science.md §1.4 (`interference`).
    """
    weights_by_feature = _importance_vector(importances)
    assignment = latent_feature_assignment(latents, features)
    if weights_by_feature.shape[0] != features.shape[1]:
        raise ValueError(
            f"importances has {weights_by_feature.shape[0]} entries for {features.shape[1]} features"
        )
    if assignment.shape[0] != decoder.shape[0]:
        raise ValueError(f"latents has {assignment.shape[0]} latents but decoder has {decoder.shape[0]} rows")
    weights = torch.where(assignment >= 0, weights_by_feature[assignment.clamp_min(0)], 0.0)
    return _pairwise_weighted_sum(cosine_matrix(decoder).square(), weights)


def interference_seed(decoder: torch.Tensor, importances: torch.Tensor) -> float:
    """Interference as the published code computed it: latent k weighted by I[k mod F].

        interference_seed = Σ_{k<l} cos²(d_k, d_l) · I[k mod F] · I[l mod F]

    decoder: [latent, hidden], importances: [feature] (F entries). The weighting depends on the arbitrary
    order of the latents, so the value changes under a relabelling that changes nothing else; kept only to
    compare with published numbers. Source: docs/science.md §1.4 (published forms).
    """
    weights_by_feature = _importance_vector(importances)
    latent_count = decoder.shape[0]
    weights = weights_by_feature[torch.arange(latent_count) % weights_by_feature.shape[0]]
    return _pairwise_weighted_sum(cosine_matrix(decoder).square(), weights)


# ---------------------------------------------------------------------------------------------------------
# Sparsity and reconstruction


def l0_sparsity(latents: torch.Tensor) -> float:
    """Mean over inputs of the fraction of latents that are active (z > 0).

    latents: [sample, latent]. Negative LeakyReLU outputs count as inactive. Evaluate on the same
    standardized inputs the SAE was trained on. Source: docs/science.md §1.4 (`l0_sparsity`).
    """
    return float((_matrix("latents", latents) > 0).double().mean())


def dead_latents(latents: torch.Tensor) -> float:
    """Fraction of latents never active (z > 0) on any of the given inputs.

    latents: [sample, latent]. Source: docs/science.md §1.4 (`dead_latents`).
    """
    return float((~(_matrix("latents", latents) > 0).any(dim=0)).double().mean())


def dead_neurons(hidden: torch.Tensor) -> float:
    """Fraction of the network's last-hidden-layer units whose activation never varies over the inputs
    (a ReLU unit that is never active, or any constant unit): units the SAE has nothing to learn from.

    hidden: [sample, hidden], raw activations.
    """
    matrix = _matrix("hidden", hidden)
    return float((matrix.amax(dim=0) == matrix.amin(dim=0)).double().mean())


# Metrics of the SAE's directions and of how its latents match the features: undefined (NaN) when every unit
# of the last hidden layer is dead, because the SAE then trained on a constant and its directions are its
# initialization drifted by the penalty, not a decomposition of anything (strong regularization collapses
# networks this way: designs/lambda.toml at λ ≥ 1e-3 under L1).
SAE_GEOMETRY_METRICS = (
    "macs",
    "macs_published_form",
    "calibrated_macs",
    "interference",
    "interference_seed",
    "feature_mmcs",
    "feature_mcc",
)


def sparsity_w4(weights: Sequence[torch.Tensor]) -> float:
    """Fourth power of the weights per entry: Σ_matrices Σ W⁴ / (total number of entries).

    weights: the network's weight matrices (biases excluded), any shapes. Source: docs/science.md §1.4
    (`sparsity_w4`).
    """
    if len(weights) == 0:
        raise ValueError("sparsity_w4 needs at least one weight matrix")
    matrices = [weight.detach().to(device="cpu", dtype=torch.float64) for weight in weights]
    entries = sum(matrix.numel() for matrix in matrices)
    return float(sum(matrix.pow(4).sum() for matrix in matrices)) / entries


def reconstruction_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared reconstruction error over all entries: mean((x − x̂)²).

    x, x_hat: [sample, hidden]. Source: docs/science.md §1.4 (`sae_mse`).
    """
    target, estimate = _matrix("x", x), _matrix("x_hat", x_hat)
    if target.shape != estimate.shape:
        raise ValueError(f"x has shape {tuple(target.shape)} but x_hat has {tuple(estimate.shape)}")
    return float((target - estimate).square().mean())


def fraction_of_variance_unexplained(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """FVU = E‖x − x̂‖² / (E‖x‖² − ‖E x‖²), expectations over samples of the whole set.

    x, x_hat: [sample, hidden]. Both sums are accumulated over every sample before dividing (never a mean of
    per-batch or per-dimension ratios). Predicting the mean gives exactly 1, a perfect reconstruction 0;
    explained variance is 1 − FVU. The denominator is computed as E‖x − E x‖², which equals it exactly but
    avoids cancellation when the mean is large. NaN when x has no variance.
    Source: docs/science.md §3, §1.4.
    """
    target, estimate = _matrix("x", x), _matrix("x_hat", x_hat)
    if target.shape != estimate.shape:
        raise ValueError(f"x has shape {tuple(target.shape)} but x_hat has {tuple(estimate.shape)}")
    residual = (target - estimate).square().sum(dim=1).mean()
    total = (target - target.mean(dim=0, keepdim=True)).square().sum(dim=1).mean()
    if total == 0:
        return math.nan
    return float(residual / total)


# ---------------------------------------------------------------------------------------------------------
# Ground-truth polysemanticity of neurons and latents


def attribution_matrix(units: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Attribution of each unit to each input feature: A_ki = |corr(unit_k, feature_i)|.

    units: [sample, unit] (hidden neurons or SAE latents), features: [sample, feature] -> [unit, feature].
    Correlation is invariant to per-unit affine rescaling, so raw and standardized activations give the same
    matrix. Source: docs/science.md §1.4 (neuron attribution, |corr| option).
    """
    return absolute_correlation(units, features)


def participation_ratio(attribution: torch.Tensor) -> torch.Tensor:
    """Participation ratio of each unit's attribution row: PR_k = (Σ_i A_ki)² / Σ_i A_ki².

    attribution: [unit, feature] (non-negative) -> [unit] (float64). 1 when one feature carries all the
    attribution, F when F features share it equally. Rows of zeros give NaN; exclude them from means.
    Source: docs/science.md §1.4.
    """
    matrix = _matrix("attribution", attribution)
    numerator = matrix.sum(dim=1).square()
    denominator = matrix.square().sum(dim=1)
    return torch.where(
        denominator > 0, numerator / denominator.clamp_min(torch.finfo(torch.float64).tiny), math.nan
    )


def _group_of_feature(groups: Sequence[Sequence[int]], feature_count: int) -> torch.Tensor:
    """Group index of every feature; features in no group get a singleton group of their own."""
    labels = torch.full((feature_count,), -1, dtype=torch.long)
    for group_index, group in enumerate(groups):
        for feature in group:
            if not 0 <= feature < feature_count:
                raise ValueError(f"group {group_index} names feature {feature}; there are {feature_count}")
            if labels[feature] >= 0:
                raise ValueError(f"feature {feature} appears in more than one group")
            labels[feature] = group_index
    ungrouped = labels < 0
    labels[ungrouped] = len(groups) + torch.arange(int(ungrouped.sum()))
    return labels


def responsive_units(attribution: torch.Tensor, min_attribution: float = 0.1) -> torch.Tensor:
    """Units whose strongest attribution reaches `min_attribution`: max_i A_ki ≥ min_attribution.

    attribution: [unit, feature] -> BoolTensor [unit].
    """
    return _matrix("attribution", attribution).amax(dim=1) >= min_attribution


def polysemantic_units(
    attribution: torch.Tensor,
    groups: Sequence[Sequence[int]],
    relative_threshold: float = 0.25,
    min_attribution: float = 0.1,
) -> torch.Tensor:
    """Units whose substantial attributions span features of at least two different groups.

    attribution: [unit, feature], groups: lists of feature indices (a feature in no group is its own group)
    -> BoolTensor [unit]. With m_k = max_i A_ki:
    - responsive: m_k ≥ min_attribution. With A = |corr|, 0.1 means the unit linearly explains ≥ 1 % of
      some feature's variance; below that a unit is treated as silent, not as polysemantic.
    - polysemantic: responsive, and the features with A_ki ≥ max(relative_threshold · m_k, min_attribution)
      belong to ≥ 2 groups. A quarter of the unit's strongest attribution is a substantial share
      (the threshold of docs/science.md §1.4); the absolute floor keeps a weakly responsive unit's
      sampling noise (|corr| ≈ 1/√samples ≈ 0.03 for 1000 samples) from counting as a second feature.
    Features of one group are correlated by construction (a shared component), so a unit tracking one
    feature also correlates with its group mates; only sharing across unrelated groups counts.
    Source: docs/science.md §1.4 (neuron attribution, threshold choice) and its opening vocabulary
    (polysemantic = several unrelated features).
    """
    matrix = _matrix("attribution", attribution)
    labels = _group_of_feature(groups, matrix.shape[1])
    row_max = matrix.amax(dim=1, keepdim=True)
    strong = (matrix >= relative_threshold * row_max) & (matrix >= min_attribution)
    groups_hit = sum(strong[:, labels == label].any(dim=1).long() for label in labels.unique())
    return responsive_units(matrix, min_attribution) & (groups_hit >= 2)


def polysemanticity_summary(
    units: torch.Tensor,
    features: torch.Tensor,
    groups: Sequence[Sequence[int]],
    prefix: str,
    *,
    relative_threshold: float = 0.25,
    min_attribution: float = 0.1,
) -> dict[str, float]:
    """Count, fraction and mean participation ratio of polysemantic units under |corr| attribution.

    units: [sample, unit], features: [sample, feature]. Returns
    - `{prefix}_polysemantic`: number of polysemantic units (float),
    - `{prefix}_polysemantic_fraction`: that number / number of responsive units (0 when none respond),
    - `{prefix}_participation_ratio`: mean PR over responsive units (NaN when none respond).
    Thresholds as in `polysemantic_units`. Source: docs/science.md §1.4.
    """
    attribution = attribution_matrix(units, features)
    responsive = responsive_units(attribution, min_attribution)
    polysemantic = polysemantic_units(attribution, groups, relative_threshold, min_attribution)
    responsive_count = int(responsive.sum())
    count = float(polysemantic.sum())
    ratios = participation_ratio(attribution)[responsive]
    return {
        f"{prefix}_polysemantic": count,
        f"{prefix}_polysemantic_fraction": count / responsive_count if responsive_count else 0.0,
        f"{prefix}_participation_ratio": float(ratios.mean()) if responsive_count else math.nan,
    }


# ---------------------------------------------------------------------------------------------------------
# Feature recovery


def feature_directions(hidden: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Direction g_i of each feature in the hidden layer: least-squares coefficients of hidden on features.

    Solves hidden ≈ [features, 1] · B for B: [feature + 1, hidden] with `torch.linalg.lstsq`; the intercept
    row absorbs the mean so the directions are not biased by the features' non-zero means.
    hidden: [sample, hidden], features: [sample, feature] -> [feature, hidden] (row i = g_i).
    Source: docs/science.md §1.4 (feature recovery).
    """
    target, design = _matrix("hidden", hidden), _matrix("features", features)
    _same_samples(hidden=target, features=design)
    with_intercept = torch.cat([design, torch.ones(design.shape[0], 1, dtype=torch.float64)], dim=1)
    # gelsd (SVD) returns the minimum-norm solution, so a feature that never varies gets direction 0.
    solution = torch.linalg.lstsq(with_intercept, target, driver="gelsd").solution
    return solution[: design.shape[1]]


def feature_recovery(decoder: torch.Tensor, hidden: torch.Tensor, features: torch.Tensor) -> dict[str, float]:
    """How well the decoder directions recover the features' hidden directions.

        feature_mmcs = mean_i max_k cos(g_i, d_k)            (signed; Sharkey et al.)
        feature_mcc  = mean over matched pairs of |cos(g_i, d_π(i))|, π the one-to-one matching of features
                       to latents maximising Σ |cos| (Hungarian, `scipy.optimize.linear_sum_assignment`)

    decoder: [latent, hidden] in the same space as `hidden: [sample, hidden]`; features: [sample, feature].
    The matching may be rectangular; the mean runs over its min(feature, latent) pairs.
    Source: docs/science.md §1.4 (feature recovery).
    """
    directions = unit_directions(feature_directions(hidden, features))
    decoder_unit = unit_directions(decoder)
    if decoder_unit.shape[1] != directions.shape[1]:
        raise ValueError(
            f"decoder has hidden size {decoder_unit.shape[1]}, activations {directions.shape[1]}"
        )
    cosines = directions @ decoder_unit.T
    absolute = cosines.abs().numpy()
    from scipy.optimize import linear_sum_assignment  # here: importing scipy.optimize takes 0.4 s

    rows, columns = linear_sum_assignment(absolute, maximize=True)
    return {
        "feature_mmcs": float(cosines.amax(dim=1).mean()),
        "feature_mcc": float(np.mean(absolute[rows, columns])),
    }


# ---------------------------------------------------------------------------------------------------------
# Everything at once


def taming_metrics(
    *,
    decoder: torch.Tensor,
    latents: torch.Tensor,
    reconstruction: torch.Tensor,
    standardized_hidden: torch.Tensor,
    hidden: torch.Tensor,
    features: torch.Tensor,
    groups: Sequence[Sequence[int]],
    importances: torch.Tensor,
    network_weights: Sequence[torch.Tensor],
    null_draws: int = 200,
) -> dict[str, float]:
    """All taming-study metrics of one seed, keyed and ordered as `TAMING_METRIC_NAMES`.

    decoder: [latent, hidden], the SAE's decoder directions in the standardized hidden space;
    latents: [sample, latent], the SAE codes of standardized_hidden: [sample, hidden];
    reconstruction: [sample, hidden], the SAE's reconstruction of standardized_hidden;
    hidden: [sample, hidden], the raw last-hidden activations (neuron attribution);
    features: [sample, feature], the network's inputs; groups: the feature groups;
    importances: [feature]; network_weights: the network's weight matrices (no biases).
    Feature directions for recovery come from standardized_hidden, the space the decoder lives in.
    Source: docs/science.md §1.4.
    """
    results = {
        "macs": macs(decoder),
        "macs_published_form": macs_published_form(decoder),
        "calibrated_macs": calibrated_macs(decoder, draws=null_draws),
        "interference": interference(decoder, latents, features, importances),
        "interference_seed": interference_seed(decoder, importances),
        "l0_sparsity": l0_sparsity(latents),
        "dead_latents": dead_latents(latents),
        "dead_neurons": dead_neurons(hidden),
        "sparsity_w4": sparsity_w4(network_weights),
        "sae_mse": reconstruction_mse(standardized_hidden, reconstruction),
        "sae_fvu": fraction_of_variance_unexplained(standardized_hidden, reconstruction),
        **polysemanticity_summary(hidden, features, groups, "neuron"),
        **polysemanticity_summary(latents, features, groups, "latent"),
        **feature_recovery(decoder, standardized_hidden, features),
    }
    if results["dead_neurons"] == 1.0:
        results.update({name: math.nan for name in SAE_GEOMETRY_METRICS})
    return {name: results[name] for name in TAMING_METRIC_NAMES}
