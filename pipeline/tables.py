"""Plain-text tables for terminals and Markdown reports (no extra dependency)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd


def format_number(value: object, digits: int = 4) -> str:
    """Compact numbers: 4 significant digits, scientific for very small or large magnitudes."""
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 4) -> str:
    """A GitHub-flavoured Markdown table of `frame` (numbers formatted with `format_number`)."""
    columns = list(columns or frame.columns)
    rows = [
        [format_number(value, digits) for value in record]
        for record in frame[columns].itertuples(index=False)
    ]
    widths = [
        max(len(str(column)), *(len(row[i]) for row in rows)) if rows else len(str(column))
        for i, column in enumerate(columns)
    ]
    header = (
        "| "
        + " | ".join(str(column).ljust(width) for column, width in zip(columns, widths, strict=True))
        + " |"
    )
    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|"
    body = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in rows
    ]
    return "\n".join([header, rule, *body])


def mean_plus_minus(mean: float, spread: float, digits: int = 4) -> str:
    """'0.2954 ± 0.0294' (or just the mean when the spread is undefined)."""
    if spread is None or (isinstance(spread, float) and math.isnan(spread)):
        return format_number(mean, digits)
    return f"{format_number(mean, digits)} ± {format_number(spread, digits)}"
