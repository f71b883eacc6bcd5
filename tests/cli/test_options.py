"""The shared options: usage errors exit 2 with argparse's message, numbers in range, --device checked early."""

from __future__ import annotations

import argparse

import pytest
import torch

from ecanfnet.cli import build_parser, main
from ecanfnet.cli._options import float_in, int_in


@pytest.mark.parametrize("args", [["predict"], ["predict", "--top-k", "0", "x.jpg"],
                                  ["predict", "--format", "xml", "x.jpg"], ["frobnicate"]])
def test_usage_errors_exit_2(capsys, args):
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2


@pytest.mark.parametrize("command", ["predict", "evaluate", "embed", "search", "bench"])
def test_device_that_is_not_here_is_one_line(run_cli, capsys, tmp_path, command):
    args = {"predict": ["predict", "x.png"], "evaluate": ["evaluate", "--data", str(tmp_path)],
            "embed": ["embed", "x.png", "--output", str(tmp_path / "e.npy")],
            "search": ["search", str(tmp_path / "e.npy"), "--query", "x.png"], "bench": ["bench"]}[command]
    with pytest.raises(SystemExit) as info:
        main([*args, "--device", "garbage"])
    assert info.value.code == 2 and "'garbage' is not a device" in capsys.readouterr().err
    missing = f"cuda:{torch.cuda.device_count() + 3}"
    code, out, err = run_cli(*args, "--device", missing)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"ecanfnet: error: --device {missing}: "), err


@pytest.mark.parametrize(("flag", "value", "rule"), [
    ("--port", "0", "a TCP port between 1 and 65535"), ("--port", "+80", "a TCP port between 1 and 65535"),
    ("--port", "9" * 5000, "a TCP port between 1 and 65535"), ("--seed", str(2 ** 32), "an integer in [0, 2**32)"),
    ("--workers", "x", "an integer >= 0"), ("--workers", " 2", "an integer >= 0"),
    ("--batch-size", "x", "a positive integer"), ("--batch-size", "1_0", "a positive integer"),
    ("--image-size", "\u00b2", "an integer from 16 to 64"), ("--image-size", "65", "an integer from 16 to 64")])
def test_integer_options_take_plain_digits_in_range(flag, value, rule, capsys, monkeypatch):
    import ecanfnet.metadata

    monkeypatch.setattr(ecanfnet.metadata, "MAX_IMAGE_SIDE", 64)  # --image-size reads the bound, not a copy
    command = ["serve"] if flag == "--port" else ["train", "--data", "d", "--output", "o"]
    with pytest.raises(SystemExit) as exit_:
        main([*command, flag, value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {flag}: must be {rule}, got {value}" in err, err[-300:]


def test_integer_options_accept_their_bounds(monkeypatch):
    import ecanfnet.metadata

    monkeypatch.setattr(ecanfnet.metadata, "MIN_IMAGE_SIDE", 20)
    args = build_parser().parse_args(["train", "--data", "d", "--output", "o", "--image-size", "20", "--seed",
                                      str(2 ** 32 - 1), "--workers", "0", "--batch-size", "1"])
    assert (args.image_size, args.seed, args.workers, args.batch_size) == (20, 2 ** 32 - 1, 0, 1)
    assert build_parser().parse_args(["serve", "--port", "65535"]).port == 65535


@pytest.mark.parametrize(("parse", "text", "message"), [
    (float_in(0.0, 1.0), "1.5", "must be a number in [0, 1], got 1.5"),
    (float_in(0.0, 1.0, lo_open=True, hi_open=True), "0", "must be a number in (0, 1), got 0"),
    (float_in(0.0), "-1", "must be a number >= 0, got -1"),
    (float_in(0.0, lo_open=True), "inf", "must be a number > 0, got inf"),
    (int_in(2, 4), "5", "must be an integer from 2 to 4, got 5"),
    (int_in(3), "2", "must be an integer >= 3, got 2")])
def test_range_types_name_the_rule_they_break(parse, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as info:
        parse(text)
    assert str(info.value) == message


def test_choices_come_from_the_library_table():
    from ecanfnet.choices import BACKENDS, DECODE_MODES, FLOAT_PRECISIONS, RUN_PRECISIONS

    commands = {a.dest: a for a in build_parser()._actions if a.dest == "command"}["command"].choices

    def choices(command: str, dest: str) -> tuple:
        return tuple(next(a for a in commands[command]._actions if a.dest == dest).choices)

    assert choices("predict", "backend") == ("auto", *BACKENDS) and choices("bench", "backend") == BACKENDS
    assert choices("serve", "precision") == RUN_PRECISIONS and choices("train", "precision") == FLOAT_PRECISIONS
    assert choices("embed", "decode") == DECODE_MODES == choices("evaluate", "decode")
