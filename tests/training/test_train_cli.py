"""`ecanfnet train` as a user meets it: OUT that holds a run, OUT that is a file, unusable training states,
out-of-range options, a one-class folder, and progress lines in a log."""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from pathlib import Path

import pytest
import torch

from helpers import one_error_line
from ecanfnet.cli import main
from ecanfnet.training.state import state_file, training_dir
from helpers import make_image_folder

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

TINY = ["--from-scratch", "--epochs", "1", "--batch-size", "3", "--image-size", "32", "--workers", "0",
        "--val-split", "0.25"]


def train_cli(data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--output", str(out), *TINY, *extra])


def copy_run(src: Path, dst: Path) -> None:
    """A run's OUT and its OUT.training, copied."""
    shutil.copytree(src, dst)
    shutil.copytree(training_dir(src), training_dir(dst))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("train_cli") / "data", per_class=4, size=40)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory) -> tuple[Path, str]:
    """OUT of a finished 1-epoch run with progress on (stderr is not a terminal here), and its stderr."""
    out = tmp_path_factory.mktemp("finished") / "out"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = train_cli(data, out, "--val-split", "0.5")
    assert code == 0, err.getvalue()
    return out, err.getvalue()


def test_validation_reports_progress_as_a_few_plain_lines_in_a_log(finished):
    _, err = finished
    validate = [line for line in err.splitlines() if "validate" in line]
    assert validate and validate[-1].startswith("epoch 1/1: validate: 6/6 img (100%)"), err
    assert len(validate) <= 11 and "\r" not in err  # no bar redraws in a log


def test_a_second_run_into_the_same_output_is_refused_unless_overwrite(finished, data, tmp_path, capsys):
    out = tmp_path / "out"
    copy_run(finished[0], out)
    before = (out / "model.safetensors").read_bytes()
    assert train_cli(data, out) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "already holds" in line and "--resume" in line and "--overwrite" in line
    assert (out / "model.safetensors").read_bytes() == before
    # a model alone (no training state) is protected too
    state_file(out).unlink()
    assert train_cli(data, out) == 1 and "model.safetensors" in one_error_line(capsys.readouterr().err)
    assert train_cli(data, out, "--resume") == 1  # nothing to resume: --resume must not replace it either
    assert "no training state" in one_error_line(capsys.readouterr().err)
    assert (out / "model.safetensors").read_bytes() == before
    assert train_cli(data, out, "--overwrite") == 0
    assert (out / "model.safetensors").read_bytes() != before and state_file(out).is_file()
    with pytest.raises(SystemExit) as exit_:
        train_cli(data, out, "--overwrite", "--resume")
    assert exit_.value.code == 2


@pytest.mark.parametrize("layout", ["file", "below_a_file"])
def test_output_naming_a_file_fails_before_any_work(tmp_path, capsys, layout):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    out = existing if layout == "file" else existing / "model"
    start = time.perf_counter()
    # no such data folder and the default (hub) weights: the output is refused before either is looked at
    code = main(["train", "--data", str(tmp_path / "no_data"), "--output", str(out), "--epochs", "1"])
    assert code == 1 and time.perf_counter() - start < 5
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "is an existing file" in line
    assert existing.read_text() == "keep me"


@pytest.mark.parametrize("out", ["/proc/ecanfnet-model", "/proc/no-such-dir/ecanfnet-model"])
def test_output_under_a_folder_that_refuses_files_even_to_root_fails_before_any_work(out, tmp_path, capsys):
    # root passes every permission check, yet /proc takes no new files: only a real probe finds that out
    start = time.perf_counter()
    code = main(["train", "--data", str(tmp_path / "no_data"), "--output", out, "--epochs", "1"])
    assert code == 1 and time.perf_counter() - start < 5
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"ecanfnet: error: {out}: cannot create files in /proc ("), line


def test_status_and_skip_lines_are_logged_through_one_escaping_handler(data, tmp_path, capsys):
    import logging

    from ecanfnet.console import printable

    hostile = tmp_path / "data"
    shutil.copytree(data, hostile)
    (hostile / "coffee" / "bad\x1b]0;pwned\x07.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "out\x1b[31m\u202e"
    assert train_cli(hostile, out, "--no-progress") == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\u202e" not in err, err  # file names reach these lines: escaped, never raw
    skipped = [line for line in err.splitlines() if "bad" in line]
    assert len(skipped) == 1 and skipped[0].startswith("ecanfnet: warning: skipped unreadable image: "), err
    assert "bad\\x1b]0;pwned\\x07.jpg" in skipped[0]
    assert "ecanfnet: epoch 1/1: train loss " in err
    assert train_cli(hostile, out, "--resume", "--no-progress") == 0  # the one epoch is done: nothing left to do
    err = capsys.readouterr().err
    assert err == f"ecanfnet: resuming {printable(out)} after epoch 1\n", err
    # the handler lives as long as main(): used as a library, ecanfnet only logs
    assert all(isinstance(h, logging.NullHandler) for h in logging.getLogger("ecanfnet").handlers)


@pytest.fixture(scope="module")
def hostile_states(finished, tmp_path_factory) -> dict[str, Path]:
    from hostile import hostile_training_states

    return hostile_training_states(tmp_path_factory.mktemp("states"), state_file(finished[0]))


HOSTILE_STATES = ["truncated", "empty", "random_bytes", "other_model_state_dict", "bare_model_weights",
                  "model_missing_tensors", "model_not_tensors", "model_hostile_key", "a_list", "optimizer_foreign",
                  "epoch_negative", "pickle:pickle_p2_object", "pickle:pickle_runs_code", "pickle:zip_runs_code",
                  "pickle:zip_class_instance", "pickle:legacy_foreign_object"]


@pytest.mark.parametrize("name", HOSTILE_STATES)
def test_resume_from_an_unusable_training_state_is_one_line(name, hostile_states, finished, data, tmp_path, capsys):
    out = tmp_path / "out"
    copy_run(finished[0], out)
    shutil.copyfile(hostile_states[name], state_file(out))
    assert train_cli(data, out, "--resume") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(state_file(out)) in line and "weights_only" not in line  # no advice to unpickle it anyway
    assert "\x1b" not in line  # a hostile key is quoted, not printed raw
    assert not (hostile_states[name].parent / "pwned").exists()  # no pickled code ran


def test_resume_with_another_class_count_names_both_counts(finished, data, tmp_path, capsys):
    out, fewer = tmp_path / "out", tmp_path / "two_classes"
    copy_run(finished[0], out)
    shutil.copytree(data, fewer)
    shutil.rmtree(fewer / "rocket")
    assert train_cli(fewer, out, "--resume") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(state_file(out)) in line and "for 3 classes, this run has 2" in line


def test_a_single_class_folder_is_refused(data, tmp_path, capsys):
    single = tmp_path / "one"
    shutil.copytree(data / "coffee", single / "coffee")
    assert train_cli(single, tmp_path / "out") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(single) in line and "at least 2" in line
    assert not (tmp_path / "out" / "model.safetensors").exists()


BAD_OPTIONS = [("--label-smoothing", "5"), ("--label-smoothing", "1"), ("--label-smoothing", "-0.1"),
               ("--val-split", "0"), ("--val-split", "-1"), ("--val-split", "1.0"), ("--val-split", "5"),
               ("--val-split", "nan"), ("--lr", "-1"), ("--lr", "0"), ("--lr", "inf"), ("--lr", "nan"),
               ("--warmup-epochs", "-5"), ("--mixup", "-1"), ("--cutmix", "-0.5"), ("--weight-decay", "-1e-4"),
               ("--agc", "-0.01"), ("--drop-rate", "1"), ("--drop-path-rate", "-0.1"), ("--ema-decay", "1"),
               ("--hflip", "1.5"), ("--workers", "-1"), ("--seed", "-1"), ("--epochs", "0"),
               ("--weight-decay", "1e400"), ("--lr", "x"), ("--image-size", "8"), ("--image-size", "100000")]


@pytest.mark.parametrize(("flag", "value"), BAD_OPTIONS)
def test_out_of_range_options_are_usage_errors(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--data", str(tmp_path), "--output", str(tmp_path / "out"), f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err and "Traceback" not in err


@pytest.mark.parametrize("scale", [("0", "1"), ("0.5", "1.5"), ("0.8", "0.2"), ("nan", "1")])
def test_crop_scale_outside_0_to_1_or_reversed_is_a_usage_error(scale, tmp_path, capsys):
    argv = ["train", "--data", str(tmp_path), "--output", str(tmp_path / "out"), "--crop-scale", *scale]
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert "--crop-scale" in capsys.readouterr().err


def test_edge_values_inside_the_ranges_are_accepted():
    from ecanfnet.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "d", "--output", "o", "--label-smoothing", "0", "--val-split", "0.999", "--lr", "1e-9",
         "--warmup-epochs", "0", "--mixup", "0", "--agc", "0", "--drop-rate", "0.99", "--ema-decay", "0.9999",
         "--hflip", "1", "--workers", "0", "--crop-scale", "0.08", "1", "--image-size", "1024"])
    assert (args.label_smoothing, args.val_split, args.hflip, args.crop_scale) == (0.0, 0.999, 1.0, [0.08, 1.0])
    assert args.image_size == 1024  # the largest side a checkpoint may record (metadata.MAX_IMAGE_SIDE)
    assert torch.isfinite(torch.tensor(args.lr))
