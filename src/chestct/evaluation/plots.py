"""Every picture chestct draws, from data its callers prepare.

The stages' pictures are written as PNG files through a temporary name (evaluate: confusion,
ROC, reliability, shift, image galleries; train: the learning curves; validate: example
montages, size and acquisition cues by class); the monitor's drift bars come back as PNG bytes
for its HTML page. The research notebooks' figures are returned as
bare matplotlib Figures (no pyplot: no global backend or figure registry is touched) for the
notebook to show. matplotlib is imported only when something is drawn.

Drawing only: what to show (which images, which rows, the matrices and tables) is computed by
the caller, so that this module imports no model, imaging or metric code and a stage that draws
does not rerun when those change.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from chestct.fsutil import staged_file
from chestct.labels import CLASSES

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# A panel of a research grid: grey pixels, a title and an optional (x, y, w, h) box to draw.
Panel = tuple[np.ndarray, str, "tuple[int, int, int, int] | None"]


# --------------------------------------------------------------------------- stages (PNG files)


def _pyplot() -> Any:
    """pyplot on the Agg backend (no display), imported only when a stage draws."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, target: Path, dpi: int = 100) -> None:
    """Write `fig` as a PNG through a temporary name, then close it."""
    with staged_file(target) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    _pyplot().close(fig)


def plot_confusion(matrix: np.ndarray, target: Path) -> None:
    """Counts of the test split, actual (rows) against predicted (columns), in CLASSES order."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(CLASSES)), CLASSES, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    for (i, j), n in np.ndenumerate(matrix):
        colour = "white" if n > matrix.max() / 2 else "black"
        ax.text(j, i, str(n), ha="center", va="center", color=colour)
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    _save(fig, target)


def plot_roc(roc: pd.DataFrame, auc: dict[str, float | None], target: Path) -> None:
    """One ROC curve per class (one vs rest) with its AUC."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for name in CLASSES:
        if name in roc:
            ax.plot(roc["fpr"], roc[name], label=f"{name} (AUC {auc[name]:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, one class vs rest (test split)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, target)


def plot_reliability(table: pd.DataFrame, ece: tuple[float, float], target: Path) -> None:
    """Accuracy and mean confidence per bin, before and after temperature scaling."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, suffix, title, value in zip(
        axes, ("", "_calibrated"), ("before", "after temperature scaling"), ece, strict=True
    ):
        shown = table[table[f"count{suffix}"] > 0]
        ax.bar(
            shown["bin_mid"],
            shown[f"accuracy{suffix}"],
            width=1 / len(table),
            alpha=0.7,
            edgecolor="black",
            label="accuracy",
        )
        ax.plot(
            shown["bin_mid"],
            shown[f"confidence{suffix}"],
            "o",
            color="red",
            ms=4,
            label="mean confidence",
        )
        ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("top-class probability")
        ax.set_title(f"{title}: ECE {value:.3f}")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, target)


def plot_shift(table: pd.DataFrame, target: Path) -> None:
    """Macro-F1 per condition, clean first; the dashed line is the clean figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    colours = ["#4c72b0"] + ["#dd8452"] * (len(table) - 1)
    ax.bar(table["perturbation"], table["macro_f1"], color=colours, edgecolor="black")
    ax.axhline(float(table["macro_f1"].iloc[0]), ls="--", color="grey", lw=0.8)
    for i, value in enumerate(table["macro_f1"]):
        ax.text(i, value + 0.01, f"{value:.2f}", ha="center", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("macro-F1 (test split)")
    ax.set_title("Shift stress: macro-F1 under acquisition perturbations")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    _save(fig, target)


def plot_novelty(values: dict[str, np.ndarray], threshold: float, target: Path) -> None:
    """Histograms of each set's nearest-train thumbnail correlation, with the near-copy
    threshold (base.near_copy_similarity) marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    bins = np.linspace(-0.2, 1.0, 61)
    for name, sims in values.items():
        sims = np.asarray(sims, float)
        sims = sims[np.isfinite(sims)]
        if len(sims):
            ax.hist(sims, bins=bins, histtype="step", density=True, label=f"{name} ({len(sims)})")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label="near-copy")
    ax.set_xlabel("correlation with the nearest train slice")
    ax.set_ylabel("density")
    ax.set_title("Near-copies of train (train: without itself)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save(fig, target)


def plot_gallery(
    tiles: list[tuple[np.ndarray, str]], target: Path, title: str, columns: int = 4
) -> None:
    """A grid of images (grey or RGB uint8) with a caption each; a note when there are none."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(tiles) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(
            image.squeeze(),
            cmap="gray" if image.ndim == 2 or image.shape[-1] == 1 else None,
            vmin=0,
            vmax=255,
        )
        ax.set_title(caption, fontsize=7)
    if not tiles:
        axes[0, 0].text(0, 0.5, "nothing to show", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, target)


def plot_history(history: pd.DataFrame, target: Path) -> None:
    """Loss, accuracy, macro-F1 and learning rate per epoch, train against valid (one pair of
    lines per ensemble member when the history has several)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.5))
    members = history.groupby("member") if "member" in history else [(0, history)]
    several = "member" in history and history["member"].nunique() > 1
    for k, rows in members:
        epochs = rows["epoch"]
        suffix = f" (member {k})" if several else ""
        for ax, metric in zip(axes, ("loss", "accuracy", "macro_f1"), strict=False):
            ax.plot(epochs, rows[metric], label=f"train{suffix}")
            ax.plot(epochs, rows[f"val_{metric}"], label=f"valid{suffix}")
            ax.set_title(metric)
        axes[3].plot(epochs, rows["learning_rate"])
    axes[3].set_yscale("log")
    axes[3].set_title("learning rate")
    second = history.loc[history["phase"] == 2, "epoch"]
    for ax in axes:
        ax.set_xlabel("epoch")
        if len(second):
            ax.axvline(second.iloc[0] - 0.5, color="grey", linestyle=":", label="fine-tune")
    axes[0].legend()
    fig.tight_layout()
    _save(fig, target)


def plot_examples(
    groups: Sequence[Sequence[tuple[str, str]]], root: Path, title: str, target: Path
) -> None:
    """A montage of example files, one row per group of (path under `root`, caption)."""
    import cv2

    plt = _pyplot()
    cols = max(len(g) for g in groups)
    fig, axes = plt.subplots(
        len(groups), cols, figsize=(2.0 * cols, 2.3 * len(groups)), squeeze=False
    )
    for r, group in enumerate(groups):
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(group):
                path, caption = group[c]
                img = cv2.imread(str(root / path), cv2.IMREAD_GRAYSCALE)
                if img is not None:
                    ax.imshow(img, cmap="gray", vmin=0, vmax=255)
                ax.set_title(caption, fontsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    _save(fig, target, dpi=90)


def plot_size_by_class(meta: pd.DataFrame, target: Path) -> None:
    """Width against height of every image, coloured by class (`label`, `width`, `height`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label in CLASSES:
        part = meta[meta["label"] == label]
        ax.scatter(part["width"], part["height"], s=8, alpha=0.6, label=label)
    ax.set_xlabel("width (px)")
    ax.set_ylabel("height (px)")
    ax.set_title("Image size by class: a shortcut a model can learn")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, target, dpi=90)


def plot_cues_by_class(meta: pd.DataFrame, features: Sequence[str], target: Path) -> None:
    """One box plot per acquisition feature, a box per class present in `meta`."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(features), figsize=(3.0 * len(features), 3.6))
    present = [c for c in CLASSES if (meta["label"] == c).any()]
    for ax, feature in zip(axes, features, strict=True):
        ax.boxplot(
            [meta.loc[meta["label"] == c, feature].astype(float) for c in present],
            showfliers=False,
        )
        ax.set_xticks(range(1, len(present) + 1), [c[:10] for c in present], fontsize=6)
        ax.set_title(feature, fontsize=8)
    fig.suptitle("Acquisition cues by class: what a model can learn instead of anatomy")
    fig.tight_layout()
    _save(fig, target, dpi=90)


# --------------------------------------------------------------------------- monitor (PNG bytes)


def shares_png(
    labels: Sequence[str], ref: Sequence[float], win: Sequence[float], title: str
) -> bytes:
    """Reference vs window fractions per bin as grouped bars, as PNG bytes (the monitor's
    self-contained HTML page inlines them)."""
    plt = _pyplot()
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    ax.bar(x - 0.2, ref, width=0.4, label="reference", color="#7a9cc6")
    ax.bar(x + 0.2, win, width=0.4, label="window", color="#c6714f")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("share")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- notebooks (Figures)


def _figure(width: float, height: float) -> Figure:
    # A bare Figure, not pyplot: no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def class_grid(rows: Sequence[tuple[str, Sequence[Panel]]], side: float = 1.8) -> Figure:
    """One row per (label, panels) of `side`-inch panels: grey image, title, and its box drawn
    when one is given; the label is written beside its row."""
    from matplotlib.patches import Rectangle

    columns = max([len(panels) for _, panels in rows] + [1])
    fig = _figure(side * columns, side * len(rows))
    axes = fig.subplots(len(rows), columns, squeeze=False)
    for row, (label, panels) in zip(axes, rows, strict=True):
        for i, ax in enumerate(row):
            ax.set_axis_off()
            if i < len(panels):
                grey, title, box = panels[i]
                ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
                if box is not None:
                    x, y, w, h = box
                    ax.add_patch(Rectangle((x, y), w, h, fill=False, color="orange", lw=1))
                ax.set_title(title, fontsize=7)
        row[0].text(
            -0.08,
            0.5,
            label.replace("_", " "),
            transform=row[0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=8,
        )
    return fig


def cue_boxes(table: pd.DataFrame, columns: Sequence[str]) -> Figure:
    """Box plots of each of (up to nine) `columns` per class: where classes separate, a model
    can learn the acquisition instead of the anatomy."""
    present = [c for c in CLASSES if (table["label"] == c).any()]
    fig = _figure(2.6 * 3, 2.4 * 3)
    axes = fig.subplots(3, 3).reshape(-1)
    for ax, column in zip(axes, columns, strict=True):
        ax.boxplot([table.loc[table["label"] == c, column] for c in present], showfliers=False)
        ax.set_xticks(range(1, len(present) + 1), [c.split("_")[0][:8] for c in present])
        ax.tick_params(labelsize=7)
        ax.set_title(column, fontsize=9)
    fig.suptitle("Acquisition cues per class", fontsize=10)
    return fig


def confusion_pair(counts: pd.DataFrame, shares: pd.DataFrame) -> Figure:
    """Counts and row-normalised confusion matrices (actual x predicted) side by side."""
    fig = _figure(11, 4.5)
    axes = fig.subplots(1, 2)
    for ax, (table, normalise) in zip(axes, ((counts, False), (shares, True)), strict=True):
        ax.imshow(table.to_numpy(), cmap="Blues", vmin=0)
        ticks = range(len(CLASSES))
        names = [c.replace("_", " ") for c in CLASSES]
        ax.set_xticks(ticks, names, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(ticks, names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title("share of the actual class" if normalise else "images")
        top = table.to_numpy().max() or 1
        for (i, j), v in np.ndenumerate(table.to_numpy()):
            text = f"{v:.2f}" if normalise else str(int(v))
            color = "white" if v > top / 2 else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    return fig


def reliability_curve(table: pd.DataFrame, ece: float) -> Figure:
    """Accuracy against mean confidence per bin, with the diagonal of perfect calibration."""
    fig = _figure(4.5, 4.5)
    ax = fig.subplots()
    used = table[table["count"] > 0]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    ax.plot(used["mean_confidence"], used["accuracy"], marker="o", label="promoted model")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def error_grid(tiles: Sequence[tuple[np.ndarray, str]], columns: int = 6) -> Figure:
    """Wrong predictions as a grid of (grey image, caption); a note when there are none."""
    n = max(len(tiles), 1)
    rows = (n + columns - 1) // columns
    fig = _figure(2 * columns, 2.3 * rows)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    if not tiles:
        axes[0][0].text(0, 0.5, "no wrong prediction", fontsize=10)
    for ax, (grey, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(grey, cmap="gray", vmin=0, vmax=255)
        ax.set_title(caption, fontsize=7)
    return fig
