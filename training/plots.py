"""Model-card plots: training curves, ROC, confusion matrix, reliability diagram."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np

from training.metrics import roc_curve


def write_plots(folder: Path, data: dict) -> list[Path]:
    """`data` may hold: history (dict of lists), labels, p_pneumonia, threshold, title."""
    written = []
    title = data.get("title", "")
    if data.get("history"):
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        history = data["history"]
        for key in ("loss", "val_loss"):
            if key in history:
                axes[0].plot(history[key], label=key)
        for key in ("auc", "val_auc"):
            if key in history:
                axes[1].plot(history[key], label=key)
        axes[0].set_xlabel("epoch")
        axes[1].set_xlabel("epoch")
        axes[0].legend()
        axes[1].legend()
        fig.suptitle(f"Training curves {title}")
        written.append(_save(fig, folder / "training_curves.png"))
    if data.get("labels") is not None:
        labels = np.asarray(data["labels"])
        p = np.asarray(data["p_pneumonia"])
        threshold = float(data["threshold"])
        fpr, tpr = roc_curve(labels, p)
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], "--", color="grey")
        ax.set_xlabel("1 - specificity")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"ROC {title}")
        written.append(_save(fig, folder / "roc.png"))

        predicted = (p >= threshold).astype(int)
        matrix = np.array(
            [[((labels == t) & (predicted == q)).sum() for q in (0, 1)] for t in (0, 1)]
        )
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14)
        ax.set_xticks([0, 1], ["NORMAL", "PNEUMONIA"])
        ax.set_yticks([0, 1], ["NORMAL", "PNEUMONIA"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"Confusion at threshold {threshold:.3f}")
        written.append(_save(fig, folder / "confusion_matrix.png"))

        predicted_class = (p >= 0.5).astype(int)
        confidence = np.where(predicted_class == 1, p, 1 - p)
        correct = (predicted_class == labels).astype(float)
        edges = np.linspace(0.5, 1.0, 11)
        centres, accuracy = [], []
        for low, high in itertools.pairwise(edges):
            mask = (confidence >= low) & (confidence <= high)
            if mask.any():
                centres.append(confidence[mask].mean())
                accuracy.append(correct[mask].mean())
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.plot([0.5, 1], [0.5, 1], "--", color="grey")
        ax.plot(centres, accuracy, "o-")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"Reliability {title}")
        written.append(_save(fig, folder / "reliability.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
