"""The model-health plot as inline SVG, drawn on the server: no chart library, no script.

Two panels share the x axis (versions in id order): canary accuracy on a fixed 0–100% scale,
perplexity on a scale fitted to its values. The head's path is joined by a line; versions off
it (rolled back) are hollow points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from markupsafe import Markup

WIDTH, PANEL, GAP, LEFT, RIGHT, TOP, BOTTOM = 860, 190, 46, 64, 20, 26, 34
COLOURS = {"canary_accuracy": "#067647", "perplexity": "#2f5bea"}


def _fmt(value: float, field: str) -> str:
    return f"{100 * value:.0f}%" if field == "canary_accuracy" else f"{value:.2f}"


def _range(values: Sequence[float], field: str) -> tuple[float, float]:
    if field == "canary_accuracy":
        return 0.0, 1.0
    low, high = min(values), max(values)
    pad = max((high - low) * 0.15, abs(high) * 0.01, 1e-6)
    return low - pad, high + pad


def _panel(points: list[dict[str, Any]], field: str, title: str, top: float) -> list[str]:
    values = [p[field] for p in points]
    low, high = _range(values, field)
    inner = WIDTH - LEFT - RIGHT
    step = inner / max(len(points) - 1, 1)

    def x(i: int) -> float:
        return LEFT + (i * step if len(points) > 1 else inner / 2)

    def y(v: float) -> float:
        return top + PANEL - (v - low) / (high - low) * PANEL

    colour = COLOURS[field]
    out = [
        f'<text x="{LEFT}" y="{top - 8}" font-weight="600" fill="{colour}">{title}</text>',
        f'<rect x="{LEFT}" y="{top}" width="{inner}" height="{PANEL}" fill="none" '
        'stroke="#d0d5dd"/>',
    ]
    for k in range(5):  # horizontal grid with value labels
        v = low + (high - low) * k / 4
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + inner}" y1="{y(v):.1f}" y2="{y(v):.1f}" '
            'stroke="#eaecf0"/>'
            f'<text x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#667085">{_fmt(v, field)}</text>'
        )
    path = [f"{x(i):.1f},{y(p[field]):.1f}" for i, p in enumerate(points) if p["on_head_path"]]
    if len(path) > 1:
        out.append(
            f'<polyline points="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2"/>'
        )
    for i, p in enumerate(points):
        fill = colour if p["on_head_path"] else "#fff"
        radius = 6 if p["is_head"] else 4
        out.append(
            f'<circle class="point" data-version="{p["version"]}" data-{field.replace("_", "-")}'
            f'="{p[field]}" cx="{x(i):.1f}" cy="{y(p[field]):.1f}" r="{radius}" fill="{fill}" '
            f'stroke="{colour}" stroke-width="2"><title>v{p["version"]}: '
            f"{_fmt(p[field], field)}</title></circle>"
        )
    every = max(1, len(points) // 12)  # at most ~12 version labels
    for i, p in enumerate(points):
        if i % every == 0 or p["is_head"]:
            out.append(
                f'<text x="{x(i):.1f}" y="{top + PANEL + 15}" text-anchor="middle" '
                f'font-size="11" fill="#667085">v{p["version"]}</text>'
            )
    return out


def health_svg(points: list[dict[str, Any]]) -> Markup:
    if not points:
        return Markup('<p class="muted" id="no-health">No version has been measured yet.</p>')
    height = TOP + 2 * PANEL + GAP + BOTTOM
    parts = [
        f'<svg class="plot" id="health-svg" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="system-ui, sans-serif" '
        'font-size="12" role="img" aria-label="canary accuracy and perplexity by version">',
        *_panel(points, "canary_accuracy", "Canary accuracy", TOP),
        *_panel(points, "perplexity", "Perplexity on fixed text", TOP + PANEL + GAP),
        "</svg>",
    ]
    return Markup("".join(parts))
