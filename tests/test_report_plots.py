"""Tests of pipeline.plots.report: figure structure, plotted values against pandas computed here, saving."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection
from matplotlib.figure import Figure

from pipeline.plots.report import interaction_grid, interaction_plot, main_effects_plot, seed_strip_plot

FACTORS = {
    "init": ("random", "orthogonal"),
    "noise": ("bipolar", "positive_kurtosis"),
    "reg": ("l1", "l2"),
    "act": ("relu", "gelu"),
}


@pytest.fixture
def factorial_table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for cell in itertools.product(*FACTORS.values()):
        a = 1.0 if cell[0] == "orthogonal" else -1.0
        b = 1.0 if cell[1] == "positive_kurtosis" else -1.0
        for seed in range(3):
            rows.append(
                {
                    **dict(zip(FACTORS, cell, strict=True)),
                    "config": "·".join(cell),
                    "seed": seed,
                    "macs": 0.3 - 0.02 * a + 0.01 * a * b + rng.normal(0, 0.005),
                }
            )
    return pd.DataFrame(rows)


def _saves(figure: Figure, path) -> None:
    figure.savefig(path)
    assert path.stat().st_size > 1000


def test_seed_strip_plot_structure_and_save(factorial_table, tmp_path):
    baseline = "random·bipolar·l1·relu"
    table = factorial_table.copy()
    table.loc[0, "macs"] = np.nan  # a failed seed of the baseline
    figure = seed_strip_plot(table, "config", "macs", baseline=baseline)
    assert isinstance(figure, Figure)
    assert len(figure.axes) == 1
    ax = figure.axes[0]
    labels = [label.get_text() for label in ax.get_xticklabels()]
    assert len(labels) == 16
    assert labels[0] == f"{baseline}\n(n=2)"  # baseline first, failed seed not counted
    assert ax.get_xticklabels()[0].get_fontweight() == "bold"
    assert ax.get_xticklabels()[0].get_rotation() == pytest.approx(30)  # long labels are rotated
    scatters = [collection for collection in ax.collections if isinstance(collection, PathCollection)]
    assert len(scatters) == 16
    points = np.concatenate([np.asarray(collection.get_offsets())[:, 1] for collection in scatters])
    assert np.sort(points) == pytest.approx(np.sort(table["macs"].dropna().to_numpy()))
    _saves(figure, tmp_path / "strip.png")


def test_seed_strip_plot_jitter_is_deterministic(factorial_table):
    first = seed_strip_plot(factorial_table, "config", "macs").axes[0]
    second = seed_strip_plot(factorial_table, "config", "macs").axes[0]
    for a, b in zip(first.collections, second.collections, strict=True):
        assert np.array_equal(np.asarray(a.get_offsets()), np.asarray(b.get_offsets()))


def test_seed_strip_plot_order_and_validation(factorial_table):
    order = ["orthogonal·bipolar·l1·relu", "random·bipolar·l1·relu"]
    ax = seed_strip_plot(factorial_table, "config", "macs", order=order).axes[0]
    assert [label.get_text().split("\n")[0] for label in ax.get_xticklabels()] == order
    with pytest.raises(ValueError, match="not in"):
        seed_strip_plot(factorial_table, "config", "macs", order=["missing"])
    with pytest.raises(ValueError, match="baseline"):
        seed_strip_plot(factorial_table, "config", "macs", baseline="missing")
    with pytest.raises(ValueError, match="missing column"):
        seed_strip_plot(factorial_table, "config", "l0")


def test_short_labels_stay_horizontal():
    table = pd.DataFrame({"config": ["a", "a", "b", "b"], "macs": [0.1, 0.2, 0.3, 0.4]})
    ax = seed_strip_plot(table, "config", "macs", baseline="a").axes[0]
    assert ax.get_xticklabels()[0].get_rotation() == 0


def test_main_effects_plot_one_panel_per_factor(factorial_table, tmp_path):
    figure = main_effects_plot(factorial_table, FACTORS, "macs")
    assert len(figure.axes) == 4
    for ax, (factor, levels) in zip(figure.axes, FACTORS.items(), strict=True):
        assert ax.get_title() == factor
        assert [label.get_text() for label in ax.get_xticklabels()] == list(levels)
        expected = factorial_table.groupby(factor)["macs"].mean().loc[list(levels)].to_numpy()
        joined = next(line for line in ax.get_lines() if line.get_label() == "level means")
        assert np.asarray(joined.get_ydata()) == pytest.approx(expected)
    _saves(figure, tmp_path / "main_effects.png")


def test_interaction_plot_one_line_per_level(factorial_table, tmp_path):
    figure = interaction_plot(factorial_table, "init", "noise", FACTORS, "macs")
    assert len(figure.axes) == 1
    ax = figure.axes[0]
    lines = [line for line in ax.get_lines() if line.get_label() in FACTORS["noise"]]
    assert [line.get_label() for line in lines] == list(FACTORS["noise"])
    means = factorial_table.groupby(["noise", "init"])["macs"].mean()
    for line, level in zip(lines, FACTORS["noise"], strict=True):
        expected = [means[(level, init_level)] for init_level in FACTORS["init"]]
        assert np.asarray(line.get_ydata()) == pytest.approx(expected)
    _saves(figure, tmp_path / "interaction.png")
    with pytest.raises(ValueError, match="two different"):
        interaction_plot(factorial_table, "init", "init", FACTORS, "macs")
    with pytest.raises(ValueError, match="no entry"):
        interaction_plot(factorial_table, "init", "noise", {"init": FACTORS["init"]}, "macs")


@pytest.mark.parametrize("k, panels", [(2, 1), (3, 3), (4, 6)])
def test_interaction_grid_one_axis_per_pair(factorial_table, tmp_path, k, panels):
    factors = dict(list(FACTORS.items())[:k])
    figure = interaction_grid(factorial_table, factors, "macs")
    assert len(figure.axes) == panels
    expected_titles = [f"{a} × {b}" for a, b in itertools.combinations(factors, 2)]
    assert [ax.get_title() for ax in figure.axes] == expected_titles
    _saves(figure, tmp_path / f"grid_{k}.png")


def test_interaction_grid_needs_two_factors(factorial_table):
    with pytest.raises(ValueError, match="at least two"):
        interaction_grid(factorial_table, {"init": FACTORS["init"]}, "macs")


def test_effects_forest_plot_colours_each_effect_by_its_reading():
    from matplotlib.colors import to_rgba

    from pipeline.plots.report import effects_forest_plot

    table = pd.DataFrame(
        {
            "subject": ["orthogonal vs random", "gelu vs relu", "orthogonal vs random", "gelu vs relu"],
            "metric": ["macs", "macs", "feature_mcc", "feature_mcc"],
            "estimate": [-0.02, 0.01, -0.03, 0.001],
            "ci_low": [-0.03, -0.01, -0.05, -0.01],
            "ci_high": [-0.01, 0.03, -0.01, 0.01],
            "p_holm": [0.001, 0.5, 0.01, 0.9],
        }
    )
    figure = effects_forest_plot(table)
    axes = figure.axes
    assert [axis.get_title() for axis in axes] == ["macs (← better)", "feature_mcc (better →)"]
    assert [label.get_text() for label in axes[0].get_yticklabels()] == [
        "orthogonal vs random",
        "gelu vs relu",
    ]
    assert axes[0].get_ylim()[0] > axes[0].get_ylim()[1]  # first subject on top
    # Markers: lower macs is better (green), lower feature_mcc is worse (red), unclear ones grey.
    markers = [[line for line in axis.get_lines() if line.get_marker() == "o"] for axis in axes]
    colours = [[to_rgba(line.get_color()) for line in lines] for lines in markers]
    assert colours[0] == [to_rgba("tab:green"), to_rgba("0.5")]
    assert colours[1] == [to_rgba("tab:red"), to_rgba("0.5")]
    assert [line.get_xdata()[0] for line in markers[0]] == [-0.02, 0.01]
