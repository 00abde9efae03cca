"""What a run reports: metrics.jsonl (one JSON object a line), TensorBoard when it is installed, a loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    """Appends records to run_dir/metrics.jsonl (and TensorBoard events under run_dir/tensorboard).

    A resumed run first drops the records written after its checkpoint's step by the interrupted run, so the file
    reads as one uninterrupted run.
    """

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.is_file():
            self.path.unlink()
        self.file = open(self.path, "a", buffering=1)
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # the tensorboard package is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics_file: str | Path, image_file: str | Path, title: str = "") -> Path | None:
    """Training and validation loss against tokens seen, as a PNG; None when there is nothing to plot yet."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a training machine
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    validation = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not validation:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        axes.plot(*zip(*train), label="train", linewidth=1.2)
    if validation:
        axes.plot(*zip(*validation), "o-", label="validation", linewidth=1.5, markersize=4)
    axes.set_xlabel("tokens seen")
    axes.set_ylabel("loss (nats per token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(image_file)
    plt.close(figure)
    return Path(image_file)
