"""What a report concludes: metric directions, per-factor or per-configuration readings, derived caveats.

Pure: tables from `pipeline.stats` in, plain sentences and tidy tables out. Every sentence is derived from
the numbers and the design it is given; nothing here is written for one particular result.

A reading turns a signed estimate into words through the metric's declared direction: for a metric where
lower means less polysemantic, a significant negative effect reads "less polysemantic". "Significant"
is the Holm-adjusted p below `SIGNIFICANCE` (the CI shown beside it is the unadjusted 95 % interval).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from pipeline.tables import format_number

SIGNIFICANCE = 0.05

# Metric families: the two ways the study measures polysemanticity, plus how well the SAE fits.
SAE_GEOMETRY = "SAE geometry"
GROUND_TRUTH = "ground truth"
SAE_FIT = "SAE fit"
TASK = "task"


@dataclass(frozen=True)
class Direction:
    """Which way is good for a metric: `better` is -1 when lower is better, +1 when higher is better."""

    better: int
    family: str
    good: str  # what a change in the better direction means, in words
    bad: str


_LESS = ("less polysemantic", "more polysemantic")
METRIC_DIRECTIONS: dict[str, Direction] = {
    "macs": Direction(-1, SAE_GEOMETRY, *_LESS),
    "macs_published_form": Direction(-1, SAE_GEOMETRY, *_LESS),
    "calibrated_macs": Direction(-1, SAE_GEOMETRY, *_LESS),
    "interference": Direction(-1, SAE_GEOMETRY, *_LESS),
    "interference_seed": Direction(-1, SAE_GEOMETRY, *_LESS),
    "neuron_polysemantic": Direction(-1, GROUND_TRUTH, *_LESS),
    "neuron_polysemantic_fraction": Direction(-1, GROUND_TRUTH, *_LESS),
    "neuron_participation_ratio": Direction(-1, GROUND_TRUTH, *_LESS),
    "latent_polysemantic": Direction(-1, GROUND_TRUTH, *_LESS),
    "latent_polysemantic_fraction": Direction(-1, GROUND_TRUTH, *_LESS),
    "latent_participation_ratio": Direction(-1, GROUND_TRUTH, *_LESS),
    "feature_mcc": Direction(+1, GROUND_TRUTH, "better feature recovery", "worse feature recovery"),
    "feature_mmcs": Direction(+1, GROUND_TRUTH, "better feature recovery", "worse feature recovery"),
    "sae_fvu": Direction(-1, SAE_FIT, "better SAE reconstruction", "worse SAE reconstruction"),
    "sae_mse": Direction(-1, SAE_FIT, "better SAE reconstruction", "worse SAE reconstruction"),
    "l0_sparsity": Direction(-1, SAE_FIT, "sparser SAE codes", "denser SAE codes"),
    "dead_latents": Direction(-1, SAE_FIT, "fewer dead latents", "more dead latents"),
    "dead_neurons": Direction(-1, TASK, "fewer dead hidden units", "more dead hidden units"),
    "sparsity_w4": Direction(+1, TASK, "sparser network weights", "denser network weights"),
    "train_mse": Direction(-1, TASK, "lower task loss", "higher task loss"),
    "val_mse": Direction(-1, TASK, "lower task loss", "higher task loss"),
}
"""Every metric's better direction and family; a metric not listed here is reported without a reading."""

CONCLUSION_COLUMNS = [
    "subject",
    "metric",
    "family",
    "estimate",
    "ci_low",
    "ci_high",
    "p_holm",
    "reading",
]


def reading(metric: str, estimate: float, p_holm: float) -> str:
    """'less polysemantic', 'more polysemantic', ..., or 'no clear effect' (Holm p ≥ SIGNIFICANCE)."""
    direction = METRIC_DIRECTIONS.get(metric)
    if not p_holm < SIGNIFICANCE:  # NaN included: untestable is not an effect
        return "no clear effect"
    if direction is None:
        return "higher" if estimate > 0 else "lower"
    return direction.good if estimate * direction.better > 0 else direction.bad


def sign_of_reading(metric: str, estimate: float, p_holm: float) -> int:
    """+1 when the effect goes the good way, −1 the bad way, 0 when it is not clear."""
    direction = METRIC_DIRECTIONS.get(metric)
    if direction is None or not p_holm < SIGNIFICANCE:
        return 0
    return 1 if estimate * direction.better > 0 else -1


def conclusion_table(rows: pd.DataFrame, subject_column: str) -> pd.DataFrame:
    """One row per (subject, metric) with the reading; `rows` has subject, metric, estimate, CI, p_holm."""
    frame = pd.DataFrame(
        {
            "subject": rows[subject_column].to_numpy(),
            "metric": rows["metric"].to_numpy(),
            "family": [METRIC_DIRECTIONS[m].family if m in METRIC_DIRECTIONS else "" for m in rows["metric"]],
            "estimate": rows["estimate"].to_numpy(dtype=float),
            "ci_low": rows["ci_low"].to_numpy(dtype=float),
            "ci_high": rows["ci_high"].to_numpy(dtype=float),
            "p_holm": rows["p_holm"].to_numpy(dtype=float),
        }
    )
    frame["reading"] = [
        reading(metric, estimate, p)
        for metric, estimate, p in zip(frame["metric"], frame["estimate"], frame["p_holm"], strict=True)
    ]
    return frame[CONCLUSION_COLUMNS]


def family_agreement(subject_rows: pd.DataFrame) -> str:
    """Whether the SAE-geometry and the ground-truth metrics point the same way for one subject."""
    signs: dict[str, set[int]] = {SAE_GEOMETRY: set(), GROUND_TRUTH: set()}
    for row in subject_rows.itertuples():
        if row.family in signs:
            sign = sign_of_reading(row.metric, row.estimate, row.p_holm)
            if sign:
                signs[row.family].add(sign)
    geometry, truth = signs[SAE_GEOMETRY], signs[GROUND_TRUTH]
    words = {1: "less polysemantic", -1: "more polysemantic"}
    if len(geometry) > 1 or len(truth) > 1:
        mixed = [family for family, found in signs.items() if len(found) > 1]
        return f"mixed: the {' and the '.join(mixed)} metrics disagree among themselves"
    if not geometry and not truth:
        return "neither family shows a clear effect"
    if not truth:
        return f"only the SAE-geometry metrics move ({words[next(iter(geometry))]}); the ground truth shows no clear effect"
    if not geometry:
        return f"only the ground-truth metrics move ({words[next(iter(truth))]}); the SAE geometry shows no clear effect"
    if geometry == truth:
        return f"the families agree: {words[next(iter(geometry))]}"
    return (
        f"the families disagree: the SAE geometry says {words[next(iter(geometry))]}, "
        f"the ground truth says {words[next(iter(truth))]}"
    )


def conclusion_lines(table: pd.DataFrame) -> list[str]:
    """One sentence per subject: the metrics grouped by reading, each with its estimate and 95 % CI,
    then whether the SAE-geometry and ground-truth families agree."""
    lines = []
    for subject, rows in table.groupby("subject", sort=False):
        by_reading: dict[str, list[str]] = {}
        for row in rows.itertuples():
            interval = f"[{format_number(row.ci_low)}, {format_number(row.ci_high)}]"
            sign = "+" if row.estimate >= 0 else "−"
            by_reading.setdefault(row.reading, []).append(
                f"{row.metric} {sign}{format_number(abs(row.estimate))} {interval}"
            )
        clear = [
            f"{text} by {', '.join(items)}" for text, items in by_reading.items() if text != "no clear effect"
        ]
        unclear = by_reading.get("no clear effect", [])
        parts = clear + ([f"no clear effect on {', '.join(unclear)}"] if unclear else [])
        lines.append(f"**{subject}**: " + "; ".join(parts) + f". Families: {family_agreement(rows)}.")
    return lines


# --------------------------------------------------------------------------------------------------
# Caveats derived from the design
# --------------------------------------------------------------------------------------------------


def confounded_factors(design: pd.DataFrame, factors: Mapping[str, tuple[str, str]]) -> list[str]:
    """Sentences naming factor levels the design never separates (from the design matrix).

    ``design``: one row per configuration present, one column per factor. Two factors are aliased when
    their ±1 columns are equal or opposite over the design (their main effects cannot be told apart at
    all); a level is confounded when it only ever appears together with one level of another factor (so
    any configuration with it also has the other, e.g. GELU only with L2 in the strategic 8).
    """
    codes = {
        name: (design[name] == high).astype(int) * 2 - 1
        for name, (_, high) in factors.items()
        if name in design
    }
    sentences = []
    for first, second in itertools.combinations(codes, 2):
        a, b = codes[first].to_numpy(), codes[second].to_numpy()
        if len(set(a)) < 2 or len(set(b)) < 2:
            continue
        if (a == b).all() or (a == -b).all():
            sentences.append(
                f"{first} and {second} are aliased: every configuration changes both together, so their "
                "effects cannot be separated."
            )
            continue
        confounded = []
        for (name, column), (other, other_column) in (((first, a), (second, b)), ((second, b), (first, a))):
            for code in (-1, 1):
                partners = set(other_column[column == code])
                if len(partners) == 1:
                    level = factors[name][(code + 1) // 2]
                    other_level = factors[other][(next(iter(partners)) + 1) // 2]
                    confounded.append(f"{name}={level} appears only with {other}={other_level}")
        if confounded:
            sentences.append(
                "; ".join(confounded)
                + f": a difference credited to one of these levels may be due to its partner, so {first} and "
                f"{second} are confounded here; only a design with every {first} × {second} combination "
                "(the full factorial) separates them."
            )
    return sentences


def constant_factors(design: pd.DataFrame, factors: Mapping[str, tuple[str, str]]) -> list[str]:
    """Factors held at one level throughout: the report says nothing about them."""
    return [
        f"{name} is {design[name].iloc[0]} in every configuration: nothing here speaks to it."
        for name in factors
        if name in design and design[name].nunique() == 1
    ]
