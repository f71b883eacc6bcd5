"""`ecanfnet train`'s options become a TrainConfig field by field, without a hand-kept list."""

from __future__ import annotations

import dataclasses

import pytest

from ecanfnet.cli import build_parser
from ecanfnet.cli.train import train_config
from ecanfnet.training.data import DEFAULT_CROP_SCALE
from ecanfnet.training.config import TrainConfig

BASE = ["train", "--data", "d", "--output", "o"]
# TrainConfig fields no option sets (the library's defaults stand), and options named otherwise than their field.
# A new field fails test_every_option_reaches_a_field... until it gets an option or a place here.
NOT_OPTIONS = {"momentum", "history", "device"}
RENAMED = {"agc": "agc_clip", "no_randaugment": "randaugment", "no_progress": "progress"}


def train_args(*extra: str):
    return build_parser().parse_args([*BASE, *extra])


def test_every_option_reaches_a_field_and_every_field_but_the_librarys_has_an_option():
    parser = build_parser()._subparsers._group_actions[0].choices["train"]
    options = {a.dest for a in parser._actions} - {"help"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {RENAMED.get(o, o) for o in options} == fields - NOT_OPTIONS


def test_defaults_are_the_configs_except_where_the_cli_says_otherwise():
    cfg, library = train_config(train_args()), TrainConfig(data="d", output="o")
    differ = {f.name for f in dataclasses.fields(TrainConfig) if getattr(cfg, f.name) != getattr(library, f.name)}
    assert differ == {"workers"} and cfg.workers == 2  # data loading in 2 processes unless --workers 0
    assert cfg.crop_scale == DEFAULT_CROP_SCALE and isinstance(cfg.crop_scale, tuple)


@pytest.mark.parametrize(("extra", "field", "value"), [
    (["--agc", "0"], "agc_clip", 0.0), (["--no-randaugment"], "randaugment", False),
    (["--no-progress"], "progress", False), (["--crop-scale", "0.1", "0.9"], "crop_scale", (0.1, 0.9)),
    (["--val", "v"], "val", "v"), (["--from-scratch"], "from_scratch", True), (["--seed", "7"], "seed", 7),
    (["--resume", "--resume-with-changes"], "resume_with_changes", True), (["--precision", "bf16"], "precision", "bf16")])
def test_each_option_lands_in_its_field(extra, field, value):
    assert getattr(train_config(train_args(*extra)), field) == value


def test_reversed_crop_scale_is_a_usage_error_before_training(run_cli, tmp_path):
    code, out, err = run_cli(*BASE, "--crop-scale", "0.8", "0.2")
    assert code == 2 and out == ""
    assert err == "ecanfnet: error: argument --crop-scale: MIN must not exceed MAX, got 0.8 0.2\n"
