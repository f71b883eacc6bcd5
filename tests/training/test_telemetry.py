"""Training telemetry: metrics.csv's new columns (learning rate on the schedule, epoch time, images/s, AGC's
clipped fraction), TensorBoard events equal to the CSV and not duplicated by a resume, curves.png without top-5
for 3 classes and with integer epochs, a resumed run of an earlier version, and the meters reduced over ranks."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecanfnet.training import telemetry
from ecanfnet.training.config import lr_at
from ecanfnet.training.loop import train
from ecanfnet.training.state import state_file, training_dir
from helpers import make_image_folder, tiny_config

pytestmark = pytest.mark.slow  # training runs and processes: `pytest -m "not slow"` skips them

SIZE = 48
HEADER = ["epoch", "train_loss", "val_loss", "val_top1", "val_top5",  # the columns of earlier versions, first
          "lr", "epoch_time_s", "train_images_per_s", "agc_clipped_fraction"]
TRAIN_IMAGES, STEPS = 14, 3  # make_image_folder: 3 x 6 photos, 4 of them validation (tiny_config); batches of 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder, timm_hub_folder) -> tuple[Path, list[dict]]:
    """One epoch with aggressive AGC (0.001), resumed for a second, then for a third with AGC off; and what each
    curves_figure call plotted."""
    plotted = []

    def recording(history, num_classes):
        fig = real(history, num_classes)
        fig.canvas.draw()  # the tick locators run at drawing
        plotted.append({"labels": [ax.get_legend_handles_labels()[1] for ax in fig.axes],
                        "ticks": [list(ax.get_xticks()) for ax in fig.axes], "limits": [ax.get_xlim() for ax in fig.axes]})
        return fig

    real = telemetry.curves_figure
    out = tmp_path_factory.mktemp("telemetry") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(telemetry, "curves_figure", recording)
        for epochs, more in ((1, {}), (2, {"resume": True}), (3, {"resume": True, "resume_with_changes": True})):
            train(tiny_config(folder, out, timm_hub_folder, epochs=epochs, image_size=SIZE,
                              agc_clip=0.0 if epochs == 3 else 0.001, **more))
    return out, plotted


def csv_rows(out: Path) -> tuple[list[str], list[dict[str, str]]]:
    return csv_rows_in(training_dir(out) / "metrics.csv")


def csv_rows_in(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) of every scalar tag, as TensorBoard's own reader shows them (purged events left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_csv_adds_the_scheduled_lr_time_throughput_and_agc_fraction(run):
    out, _ = run
    header, rows = csv_rows(out)
    assert header == HEADER and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for row in rows:  # each resume stretched the schedule to its own number of epochs
        epoch = int(row["epoch"])
        # the rate of the epoch's last optimizer step: warm-up over half an epoch, then cosine to 0 at the end
        expected = lr_at(epoch * STEPS - 1, epoch * STEPS, round(0.5 * STEPS), 0.02)
        assert float(row["lr"]) == pytest.approx(expected, rel=1e-12), row
        seconds, per_s = float(row["epoch_time_s"]), float(row["train_images_per_s"])
        assert 0 < per_s < 10_000 and 0 < seconds < 600
        assert seconds >= TRAIN_IMAGES / per_s  # the epoch (training + validation) outlasts its training pass
    clipped = [float(r["agc_clipped_fraction"]) for r in rows]
    assert all(0.1 < f <= 1 for f in clipped[:2]), clipped  # limit 0.001 x ||W||: many units clipped
    assert clipped[2] == 0.0  # AGC off


def test_tensorboard_events_hold_the_csv_values_once_per_epoch_across_resumes(run):
    out, _ = run
    _, rows = csv_rows(out)
    events = scalars(training_dir(out) / "tensorboard")
    assert sorted(events) == sorted(HEADER[1:])
    for tag, points in events.items():
        assert [step for step, _ in points] == [1, 2, 3], (tag, points)  # each resume appended its epoch only
        assert [value for _, value in points] == pytest.approx([float(r[tag]) for r in rows], rel=1e-6), tag
    assert len(list((training_dir(out) / "tensorboard").iterdir())) == 3  # one event file per call that trained


def test_curves_leave_out_top5_for_three_classes_and_tick_whole_epochs(run):
    out, plotted = run
    assert (training_dir(out) / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(plotted) == 3  # one figure per epoch
    last = plotted[-1]
    assert last["labels"] == [["train loss", "val loss"], ["val top-1"], ["learning rate"]]
    for ticks, (low, high) in zip(last["ticks"], last["limits"]):
        shown = [t for t in ticks if low <= t <= high]
        assert shown and all(float(t).is_integer() for t in shown), ticks
    fig = telemetry.curves_figure(state_history(out), num_classes=5)  # from 5 classes on, top-5 is drawn
    assert fig.axes[1].get_legend_handles_labels()[1] == ["val top-1", "val top-5"]


def state_history(out: Path) -> list[dict]:
    return torch.load(state_file(out), weights_only=True)["history"]


def test_an_earlier_versions_history_gets_blank_cells_and_its_values_in_tensorboard(tmp_path):
    """A resumed run of an earlier version: its history rows lack the new columns (and it wrote no event files)."""
    old = [{"epoch": 1, "train_loss": 1.5, "val_loss": 1.25, "val_top1": 0.5, "val_top5": 1.0}]
    new = {"epoch": 2, "train_loss": 1.0, "val_loss": 0.75, "val_top1": 0.75, "val_top5": 1.0, "lr": 0.015625,
           "epoch_time_s": 2.5, "train_images_per_s": 8.0, "agc_clipped_fraction": 0.125}
    with telemetry.recorder(tmp_path, old, num_classes=3) as rec:
        rec.record([*old, new])
    header, rows = csv_rows_in(tmp_path / "metrics.csv")
    assert header == HEADER and rows == [{**{k: str(v) for k, v in old[0].items()}, **dict.fromkeys(HEADER[5:], "")},
                                         {k: str(v) for k, v in new.items()}]
    events = scalars(tmp_path / "tensorboard")
    assert events["val_loss"] == [(1, 1.25), (2, 0.75)] and events["lr"] == [(2, 0.015625)]
    assert (tmp_path / "curves.png").stat().st_size > 10_000


def test_a_resume_purges_events_recorded_after_the_saved_state(tmp_path):
    """A run killed between recording epoch 3 and saving its state resumes after epoch 2: the viewer shows the
    redone epoch 3 once, with its new value."""
    from torch.utils.tensorboard import SummaryWriter

    logdir = tmp_path / "tensorboard"
    first = SummaryWriter(str(logdir))
    for epoch in (1, 2, 3):
        first.add_scalar("val_loss", float(epoch), epoch)
    first.close()
    history = [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 2.0}]
    writer = telemetry.open_tensorboard(logdir, history)
    telemetry.add_row(writer, {"epoch": 3, "val_loss": 30.0})
    writer.close()
    assert scalars(logdir)["val_loss"] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_without_tensorboard_the_run_says_so_in_one_info_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    caplog.set_level(logging.INFO, "ecanfnet")
    assert telemetry.open_tensorboard(tmp_path / "tensorboard", []) is None
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "pip install 'ecanfnet[train]'" in said[0] and "tensorboard" in said[0], said
    assert not (tmp_path / "tensorboard").exists()


def test_a_file_in_the_way_of_the_event_folder_is_refused_in_one_line(tmp_path):
    from ecanfnet.errors import TrainingError

    (tmp_path / "tensorboard").write_text("not a folder")
    with pytest.raises(TrainingError, match=r"tensorboard: cannot hold TensorBoard event files: File exists$"):
        telemetry.open_tensorboard(tmp_path / "tensorboard", [])


def test_overwrite_removes_the_replaced_runs_events_only(tmp_path):
    from ecanfnet.training.state import forget_previous_run

    logdir = training_dir(tmp_path / "out") / "tensorboard"
    logdir.mkdir(parents=True)
    (logdir / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"old run")
    (logdir / "notes.txt").write_text("the user's")
    forget_previous_run(tmp_path / "out")
    assert [p.name for p in logdir.iterdir()] == ["notes.txt"]


REDUCE_SCRIPT = """
import sys, time
import torch, torch.distributed as dist
from ecanfnet.distributed import DistContext
from ecanfnet.training.telemetry import EpochMeter

rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
meter = EpochMeter(agc_units=100)
meter.batch(1.0 + rank, 4 + 2 * rank)         # rank 0: 4 images at loss 1, rank 1: 6 at loss 2
for clipped in ([10, 20] if rank == 0 else [30, 40]):
    meter.step(0.5, clipped)
time.sleep(0.1 + 0.4 * rank)                  # rank 1 is the slower one
meter.finish(DistContext(rank=rank, world=2, device=torch.device("cpu")))
row = meter.row()
print(meter.images, meter.clipped, meter.units, round(meter.train_loss, 6), row["agc_clipped_fraction"],
      meter.seconds >= 0.5, round(row["train_images_per_s"] * meter.seconds, 6))
dist.destroy_process_group()
"""


def test_meters_are_reduced_over_ranks(tmp_path):
    """Images and AGC counts summed over the ranks, the loss averaged per image, the time the slowest rank's."""
    script, store = tmp_path / "reduce.py", tmp_path / "store"
    script.write_text(REDUCE_SCRIPT)
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(store)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    expected = f"10 100 400 {round((4 * 1 + 6 * 2) / 10, 6)} 0.25 True 10.0"
    assert [out.strip() for out, _ in outputs] == [expected, expected]
