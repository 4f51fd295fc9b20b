"""Figures of a run with matplotlib: generic panels of step series (any trainer's log), and the SFT training figure.

`panels_figure` takes plain series, so every trainer (SFT here, others later) draws its own metrics the same way:

    panels_figure(path, [Panel("loss", [Line("loss", points, smooth=True)], right=[Line("accuracy", acc)])])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

Points = list[tuple[float, float]]


@dataclass
class Line:
    """One series: (step, value) points; `smooth` adds an exponential moving average over the raw, faded line."""

    label: str
    points: Points
    smooth: bool = False
    markers: bool = False  # sparse series (an eval every N steps) read better as dots joined by a line


@dataclass
class Panel:
    """One plot: lines on the left axis, optional lines on a second (right) axis with their own label."""

    y_label: str
    lines: list[Line]
    right: list[Line] = field(default_factory=list)
    right_label: str | None = None
    right_limits: tuple[float, float] | None = None  # e.g. (0, 1) for an accuracy
    log_y: bool = False


def series(log_history: list[dict], key: str) -> Points:
    """(step, value) of every trainer log entry that has `key`."""
    return [(entry["step"], float(entry[key])) for entry in log_history if key in entry and "step" in entry]


def smoothing_span(n: int) -> int:
    """How many logs the moving average spans: a tenth of the series (a short series is drawn as it is)."""
    return n // 10


def smoothed(values: list[float], span: int) -> list[float]:
    """An exponential moving average over about `span` points, debiased (as TensorBoard's) so that the first
    points are not pulled towards 0."""
    weight = 1 - 2 / (span + 1)
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight ** i))
    return out


def panels_figure(path: Path | None, panels: list[Panel], title: str = "", x_label: str = "step"):
    """Panels stacked over one shared step axis, labelled axes and grids; saved to `path` (PNG) if given.
    Returns the matplotlib Figure (tests read its axes labels)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never a window, works without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 + 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        _draw(ax, panel)
    axes[-1, 0].set_xlabel(x_label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return fig


def _draw(ax, panel: Panel) -> None:
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"])
    handles = [h for line in panel.lines for h in _line(ax, line, next(colors))]
    ax.set_ylabel(panel.y_label)
    if panel.log_y:
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    if panel.right:
        twin = ax.twinx()
        right_colors = iter(["tab:red", "tab:pink", "tab:olive"])
        handles += [h for line in panel.right for h in _line(twin, line, next(right_colors))]
        twin.set_ylabel(panel.right_label or ", ".join(line.label for line in panel.right))
        if panel.right_limits:
            twin.set_ylim(*panel.right_limits)
    if handles:
        ax.legend(handles=handles, loc="best", fontsize="small")


def _line(ax, line: Line, color: str) -> list:
    """Draw one series; returns its legend handles."""
    if not line.points:
        return []
    steps, values = zip(*line.points)
    span = smoothing_span(len(values))
    if line.smooth and span >= 2:
        raw = ax.plot(steps, values, color=color, alpha=0.3, linewidth=1, label=f"{line.label} (each log)")
        return raw + ax.plot(steps, smoothed(list(values), span), color=color, linewidth=2,
                             label=f"{line.label} (moving average, {span} logs)")
    return ax.plot(steps, values, color=color, linewidth=2, marker="o" if line.markers else None, markersize=4,
                   label=line.label)


def training_figure(log_history: list[dict], path: Path | None, title: str = "",
                    metric: tuple[str, Points] | None = None):
    """The SFT run's figure: training loss (raw and smoothed) with the held-out metric during training on a second
    axis, and the learning rate below."""
    loss = Panel("training loss", [Line("loss", series(log_history, "loss"), smooth=True)])
    if metric and metric[1]:
        name, points = metric
        loss.right = [Line(name.removeprefix("eval_"), points, markers=True)]
        loss.right_label = f"held-out {name.removeprefix('eval_')}"
        loss.right_limits = (-0.02, 1.02) if all(0 <= v <= 1 for _, v in points) else None
    rate = Panel("learning rate", [Line("learning rate", series(log_history, "learning_rate"))])
    return panels_figure(path, [loss, rate], title)
