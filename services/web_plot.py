"""The admin page's plot: acceptance and answer accuracy per adapter version, as inline SVG.

Contract: ``quality_plot_svg(by_adapter)`` takes ``AdapterFeedbackStats`` messages (or anything
with their fields) and returns one ``<svg>`` element, drawn here on the server (no script, no
external asset, no inline CSS, so the page's Content-Security-Policy holds). The x axis has one
tick per adapter version in the order each produced its first generation, ``base`` first; the y
axis is the share 0-100 %. Two series: acceptance (accepted / judged candidates, filled circles)
and answer accuracy (correct / judged answers, hollow squares). A version without judged
candidates (or answers) has no point in that series. Every point is an element with
``class="point <series>"`` and ``data-version="<version>"`` and a tooltip giving the counts. All
text is escaped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from typing import Any

WIDTH, HEIGHT = 720, 300
LEFT, RIGHT, TOP, BOTTOM = 64, 170, 20, 64
SERIES = (
    # (css class, legend label, colour, numerator field, denominator field)
    (
        "acceptance",
        "acceptance (fitting / judged candidates)",
        "#1f5fbf",
        "accepted_candidates",
        "judged_candidates",
    ),
    (
        "accuracy",
        "answer accuracy (correct / judged answers)",
        "#c2410c",
        "answers_correct",
        "answers_judged",
    ),
)
Y_TICKS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class _Point:
    version: str
    x: float
    y: float
    share: float
    numerator: int
    denominator: int


def ordered_versions(by_adapter: Sequence[Any]) -> list[Any]:
    """Versions in the order they first generated; ``base`` first, versions never used last."""

    def key(stats: Any) -> tuple[int, int, str, str]:
        first = stats.first_generation_at
        return (0 if stats.adapter_version == "base" else 1, 0 if first else 1, first, stats.adapter_version)

    return sorted(by_adapter, key=key)


def _x_of(index: int, count: int) -> float:
    inner = WIDTH - LEFT - RIGHT
    if count == 1:
        return LEFT + inner / 2
    return LEFT + inner * index / (count - 1)


def _y_of(share: float) -> float:
    return TOP + (HEIGHT - TOP - BOTTOM) * (1.0 - share)


def _points(versions: Sequence[Any], numerator: str, denominator: str) -> list[_Point]:
    points = []
    for i, stats in enumerate(versions):
        den = int(getattr(stats, denominator))
        if den <= 0:
            continue
        num = int(getattr(stats, numerator))
        share = num / den
        points.append(_Point(stats.adapter_version, _x_of(i, len(versions)), _y_of(share), share, num, den))
    return points


def _axes(versions: Sequence[Any]) -> list[str]:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [
        f'<line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#444"/>',
        f'<line class="axis" x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
    ]
    for tick in Y_TICKS:
        y = _y_of(tick)
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end" font-size="12">{tick * 100:.0f} %</text>'
        )
    for i, stats in enumerate(versions):
        x = _x_of(i, len(versions))
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 5}" stroke="#444"/>')
        parts.append(
            f'<text class="x-label" x="{x:.1f}" y="{bottom + 20}" text-anchor="middle" font-size="12">'
            f"{escape(stats.adapter_version)}</text>"
        )
    parts.append(
        f'<text x="{(LEFT + right) / 2:.1f}" y="{HEIGHT - 12}" text-anchor="middle" font-size="12">'
        "adapter version, in order of its first generation</text>"
    )
    parts.append(
        f'<text x="16" y="{(TOP + bottom) / 2:.1f}" text-anchor="middle" font-size="12" '
        f'transform="rotate(-90 16 {(TOP + bottom) / 2:.1f})">share</text>'
    )
    return parts


def _series(versions: Sequence[Any]) -> list[str]:
    parts = []
    for css, label, colour, numerator, denominator in SERIES:
        points = _points(versions, numerator, denominator)
        if len(points) > 1:
            path = " ".join(f"{p.x:.1f},{p.y:.1f}" for p in points)
            parts.append(
                f'<polyline class="line {css}" points="{path}" fill="none" '
                f'stroke="{colour}" stroke-width="2"/>'
            )
        for p in points:
            tip = f"{p.version}: {label.split(' (')[0]} {p.share * 100:.1f} % ({p.numerator}/{p.denominator})"
            parts.append(
                _marker(
                    css,
                    colour,
                    p.x,
                    p.y,
                    f' data-version="{escape(p.version)}"',
                    f"<title>{escape(tip)}</title>",
                )
            )
    return parts


def _marker(css: str, colour: str, x: float, y: float, attributes: str = "", content: str = "") -> str:
    """A filled circle for acceptance, a hollow square for accuracy: both stay visible where the
    two shares are equal."""
    if css == "acceptance":
        return (
            f'<circle class="point {css}"{attributes} cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}">'
            f"{content}</circle>"
        )
    return (
        f'<rect class="point {css}"{attributes} x="{x - 6:.1f}" y="{y - 6:.1f}" width="12" height="12" '
        f'fill="none" stroke="{colour}" stroke-width="2">{content}</rect>'
    )


def _legend() -> list[str]:
    x = WIDTH - RIGHT + 16
    parts = []
    for i, (css, label, colour, _n, _d) in enumerate(SERIES):
        y = TOP + 10 + i * 40
        name, _, detail = label.partition(" (")
        parts.append(_marker(css, colour, x, y).replace('class="point ', 'class="legend-'))
        parts.append(f'<text x="{x + 12}" y="{y + 4}" font-size="12">{escape(name)}</text>')
        parts.append(f'<text x="{x + 12}" y="{y + 19}" font-size="10" fill="#555">({escape(detail)}</text>')
    return parts


def quality_plot_svg(by_adapter: Sequence[Any]) -> str:
    """The plot as one ``<svg>`` element (a short note in it when there is nothing to plot)."""
    versions = ordered_versions(by_adapter)
    head = (
        f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" '
        'aria-label="Acceptance and answer accuracy per adapter version">'
    )
    if not versions:
        note = (
            f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" font-size="14">'
            "no generations yet</text>"
        )
        return head + note + "</svg>"
    return head + "".join(_axes(versions) + _series(versions) + _legend()) + "</svg>"
