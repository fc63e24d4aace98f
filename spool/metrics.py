"""Video-level evaluation and the plots of a training run.

A video's prediction is the mean of its clips' logits (the multi-view protocol of DINOv2
and V-JEPA video evaluation); accuracy, per-class accuracy and the confusion matrix are
computed over videos with scikit-learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import confusion_matrix, top_k_accuracy_score


def video_logits(clip_logits: np.ndarray, video_index: np.ndarray, clip_labels: np.ndarray):
    """Average clip logits per video: -> (videos (V,), logits (V, C), labels (V,))."""
    videos, inverse = np.unique(video_index, return_inverse=True)
    sums = np.zeros((len(videos), clip_logits.shape[1]), dtype=np.float64)
    np.add.at(sums, inverse, clip_logits.astype(np.float64))
    counts = np.bincount(inverse, minlength=len(videos))[:, None]
    labels = np.zeros(len(videos), dtype=np.int64)
    labels[inverse] = clip_labels
    return videos, sums / counts, labels


def classification_metrics(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """top1, top5 (None with fewer than 5 classes), top_k with k = min(5, num_classes),
    per-class accuracy (None for classes absent from ``labels``) and the confusion matrix
    (rows = true class, columns = predicted)."""
    classes = np.arange(num_classes)
    pred = logits.argmax(axis=1)
    k = min(5, num_classes)
    if num_classes > 2:
        topk = float(top_k_accuracy_score(labels, logits, k=k, labels=classes))
    else:  # sklearn's binary top-k takes scores of the positive class; with k = C it is 1 anyway
        topk = 1.0
    cm = confusion_matrix(labels, pred, labels=classes)
    support = cm.sum(axis=1)
    per_class = [float(cm[c, c] / support[c]) if support[c] else None for c in classes]
    return {
        "top1": float((pred == labels).mean()) if len(labels) else 0.0,
        "top5": topk if num_classes >= 5 else None,
        "top_k": {"k": k, "accuracy": topk},
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "num_videos": int(len(labels)),
    }


def plot_curves(history: list[dict], path: str | Path) -> None:
    """Loss and accuracy per epoch, as a PNG (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    ax2.plot(epochs, [h["train_acc"] for h in history], marker="o", label="train clip acc")
    ax2.plot(epochs, [h["eval_top1"] for h in history], marker="o", label="eval video top-1")
    if history and history[0].get("eval_top5") is not None:
        ax2.plot(epochs, [h["eval_top5"] for h in history], marker="o", label="eval video top-5")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("accuracy")
    ax2.set_ylim(0, 1)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_confusion(cm: np.ndarray | list, class_names: list[str], path: str | Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    n = len(class_names)
    size = min(4 + 0.35 * n, 30)
    fig = Figure(figsize=(size, size))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="Blues")
    fig.colorbar(im, ax=ax, fraction=0.046)
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=90)
        ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
