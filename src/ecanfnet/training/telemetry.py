"""Training telemetry: what each epoch measures (EpochMeter: loss, learning rate, time, throughput, the share of
gradient units AGC clipped) and where rank 0 records it (Recorder): OUT.training/metrics.csv, curves.png and
TensorBoard event files in OUT.training/tensorboard.

The CSV keeps the columns of earlier versions first; TensorBoard gets the same per-epoch values, one scalar per
column (the tag is the column's name, the step the epoch). Under torchrun the meters of all ranks are reduced:
images and AGC units are summed over the ranks, the training pass lasts as long as the slowest rank's.
"""

from __future__ import annotations

import logging
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from ..backends import installed
from ..errors import TrainingError
from ..fileio import write_atomically, write_csv_atomically
from .state import CURVES_NAME, EVENTS_PREFIX, METRICS_NAME, TENSORBOARD_NAME

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch.utils.tensorboard import SummaryWriter

    from ..distributed import DistContext

log = logging.getLogger("ecanfnet")

RESULT_COLUMNS = ("epoch", "train_loss", "val_loss", "val_top1", "val_top5")  # the columns of earlier versions
TELEMETRY_COLUMNS = ("lr", "epoch_time_s", "train_images_per_s", "agc_clipped_fraction")
COLUMNS = RESULT_COLUMNS + TELEMETRY_COLUMNS
# The only columns that differ between two runs with bitwise the same weights (a resumed and an uninterrupted one).
TIMING_COLUMNS = ("epoch_time_s", "train_images_per_s")
TOP5_MIN_CLASSES = 5  # below that top-5 is always 100 %: curves.png leaves it out
CURVE_LABELS = {"train_loss": "train loss", "val_loss": "val loss", "val_top1": "val top-1", "val_top5": "val top-5",
                "lr": "learning rate"}


@dataclass
class EpochMeter:
    """One epoch's training pass as this process sees it; reduced over the ranks by finish()."""

    agc_units: int                  # gradient units AGC looks at in one optimizer step (0: AGC off)
    started: float = field(default_factory=time.perf_counter)
    loss_sum: float = 0.0           # sum of per-image losses
    images: int = 0
    steps: int = 0                  # optimizer steps
    clipped: int = 0                # units AGC clipped, summed over the steps
    units: int = 0                  # units AGC looked at, summed over the steps
    lr: float = 0.0                 # the learning rate of the last optimizer step
    seconds: float = 0.0            # the training pass's wall time (set by finish)

    def batch(self, loss: float, images: int) -> None:
        """Count a batch of `images` with mean loss `loss`."""
        self.loss_sum += loss * images
        self.images += images

    def step(self, lr: float, clipped: int) -> None:
        """Count an optimizer step at lr in which AGC clipped `clipped` units."""
        self.steps, self.lr = self.steps + 1, lr
        self.clipped += clipped
        self.units += self.agc_units

    def images_per_s(self) -> float:
        """This process's throughput so far."""
        return self.images / max(time.perf_counter() - self.started, 1e-9)

    def finish(self, context: DistContext) -> None:
        """End the pass: its wall time, then (several ranks) images, losses and AGC counts summed, the time maxed."""
        self.seconds = time.perf_counter() - self.started
        if context.world <= 1:
            return
        import torch.distributed as dist

        sums = torch.tensor([self.loss_sum, self.images, self.clipped, self.units], dtype=torch.float64,
                            device=context.device)
        longest = torch.tensor([self.seconds], dtype=torch.float64, device=context.device)
        dist.all_reduce(sums)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        self.loss_sum, self.seconds = float(sums[0]), float(longest[0])
        self.images, self.clipped, self.units = (int(v) for v in sums[1:].tolist())

    @property
    def train_loss(self) -> float:
        """The mean training loss per image (over all ranks after finish)."""
        return self.loss_sum / self.images

    def row(self) -> dict[str, float]:
        """The telemetry columns of the epoch; epoch_time_s runs until now (call it after validation)."""
        return {"lr": self.lr, "epoch_time_s": time.perf_counter() - self.started,
                "train_images_per_s": self.images / max(self.seconds, 1e-9),
                "agc_clipped_fraction": self.clipped / self.units if self.units else 0.0}


class Recorder:
    """Rank 0's record of a run in a folder (OUT.training): metrics.csv, curves.png, TensorBoard events."""

    def __init__(self, folder: Path, num_classes: int, writer: SummaryWriter | None) -> None:
        self.folder, self.num_classes, self.writer = folder, num_classes, writer
        self.draw = installed("matplotlib")
        if not self.draw:
            log.info("no %s drawn: matplotlib is not installed (pip install 'ecanfnet[train]')", CURVES_NAME)

    def record(self, history: Sequence[Mapping[str, Any]]) -> None:
        """After an epoch: its row (history's last) to TensorBoard, then metrics.csv and curves.png rewritten."""
        if self.writer is not None:
            add_row(self.writer, history[-1])
            self.writer.flush()  # on disk before the state is saved: a killed run loses nothing a resume will not redo
        write_csv_atomically(self.folder / METRICS_NAME, history, COLUMNS)
        if self.draw:
            plot_curves(self.folder / CURVES_NAME, history, self.num_classes)

    def close(self) -> None:
        """Close the TensorBoard event file."""
        if self.writer is not None:
            self.writer.close()


@contextmanager
def recorder(folder: Path, history: Sequence[Mapping[str, Any]], num_classes: int) -> Iterator[Recorder]:
    """A Recorder for a run that has finished the epochs in history (none: a new run); closed on leaving."""
    rec = Recorder(folder, num_classes, open_tensorboard(folder / TENSORBOARD_NAME, history))
    try:
        yield rec
    finally:
        rec.close()


def open_tensorboard(logdir: Path, history: Sequence[Mapping[str, Any]]) -> SummaryWriter | None:
    """A SummaryWriter continuing logdir after the epochs in history, or None (one INFO line) without tensorboard.

    Events of epochs past history (written by a run killed before it saved its state) are purged for the viewer
    (purge_step); a logdir without events (a new run, or one started without tensorboard) gets history first."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("no TensorBoard events written: tensorboard is not installed (pip install 'ecanfnet[train]')")
        return None
    existing = sorted(logdir.glob(EVENTS_PREFIX + "*"))
    if existing:
        _wait_past(existing)
    next_epoch = int(history[-1]["epoch"]) + 1 if history else 1
    try:
        writer = SummaryWriter(str(logdir), purge_step=next_epoch if existing else None)
    except OSError as exc:  # a file in the way, no permission
        raise TrainingError(f"{logdir}: cannot hold TensorBoard event files: {exc.strerror or exc}") from None
    if not existing:
        for row in history:
            add_row(writer, row)
    return writer


def _wait_past(event_files: list[Path]) -> None:
    """Wait until the clock passes the newest event file's second: the viewer reads the files in name order, which
    is creation order only when their names' timestamps (whole seconds, before the host and pid) differ."""
    stamps = [int(m.group(1)) for f in event_files if (m := re.match(re.escape(EVENTS_PREFIX) + r"(\d+)", f.name))]
    until = max(stamps, default=0) + 1
    if until - time.time() > 2:  # a name from the future (another clock): waiting would not help
        return
    while time.time() < until:
        time.sleep(0.05)


def add_row(writer: SummaryWriter, row: Mapping[str, Any]) -> None:
    """One epoch's columns as scalars tagged with the column name at step = epoch (absent or blank ones skipped)."""
    epoch = int(row["epoch"])
    for name in COLUMNS[1:]:
        value = row.get(name)
        if value is not None and value != "":
            writer.add_scalar(name, float(value), epoch)


def plot_curves(target: Path, history: Sequence[Mapping[str, Any]], num_classes: int) -> None:
    """target (PNG): curves_figure, written atomically (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = curves_figure(history, num_classes)
    try:
        write_atomically(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)


def curves_figure(history: Sequence[Mapping[str, Any]], num_classes: int) -> Figure:
    """Loss (train, val), accuracy (val top-1; top-5 only from TOP5_MIN_CLASSES classes) and the learning rate by
    epoch, on integer epoch ticks; each line labelled."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    accuracy = ["val_top1"] + (["val_top5"] if num_classes >= TOP5_MIN_CLASSES else [])
    panels = (("loss", ["train_loss", "val_loss"]), ("accuracy", accuracy), ("learning rate", ["lr"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 4))
    for ax, (title, columns) in zip(axes, panels):
        for name in columns:
            points = [(int(r["epoch"]), float(r[name])) for r in history if _present(r.get(name))]
            if points:
                ax.plot(*zip(*points), "o-", label=CURVE_LABELS[name])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="epoch", title=title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    return fig


def _present(value: Any) -> bool:
    """A number was recorded (rows of earlier versions lack the telemetry columns)."""
    return value is not None and value != "" and math.isfinite(float(value))
