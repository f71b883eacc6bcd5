"""The `ecanfnet` entry point: light to import, each command's examples valid, library errors as one line."""

from __future__ import annotations

import errno
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from ecanfnet.cli import COMMANDS, build_parser, main
from ecanfnet.errors import WeightsError

ROOT = Path(__file__).resolve().parents[2]


def test_building_every_parser_does_not_import_torch():
    """`ecanfnet --help` (and `COMMAND --help`) stays instant: only the command that runs loads torch."""
    code = "import sys, ecanfnet.cli; ecanfnet.cli.build_parser(); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.stdout.strip() == "False", done.stderr


@pytest.mark.parametrize("module", ["ecanfnet", "ecanfnet.cli"])
def test_runs_as_a_module(module):
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0 and done.stdout.startswith("ecanfnet "), done.stderr


def example_argv(command_line: str) -> list[str]:
    """The ecanfnet arguments of an example line (after `VAR=value` and a `torchrun ... -m ecanfnet` launcher)."""
    words = shlex.split(command_line.split(" > ")[0])
    start = words.index("ecanfnet") + 1 if "ecanfnet" in words else len(words)
    return words[start:]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_each_command_has_examples_that_parse(command):
    assert 2 <= len(command.EXAMPLES) <= 3
    for what, line in command.EXAMPLES:
        argv = example_argv(line)
        assert argv and what, line
        build_parser().parse_args(argv)  # SystemExit(2) here is an example that would not run


def test_examples_keep_their_layout_in_help_whatever_the_width(capsys, monkeypatch):
    from ecanfnet.cli import serve

    monkeypatch.setenv("COLUMNS", "40")
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    what, line = serve.EXAMPLES[1]
    assert "\nexamples:\n" in out and f"\n  # {what}\n  {line}\n" in out
    assert "Serve POST /v1/classify, POST /v1/embed," not in out  # the description is still wrapped


@pytest.mark.parametrize(("raised", "code", "stderr"), [
    (WeightsError("cannot get weights: no\nsuch\x1b[2J"), 1, "ecanfnet: error: cannot get weights: no\\x0asuch\\x1b[2J\n"),
    (KeyboardInterrupt(), 130, "ecanfnet: interrupted\n"),
    (BrokenPipeError(), 0, ""),
    (OSError(errno.ENOSPC, "No space left on device", "/out/x.onnx"), 1,
     "ecanfnet: error: /out/x.onnx: No space left on device\n"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), 1,
     "ecanfnet: error: /a -> /b: Invalid cross-device link\n")])
def test_library_errors_become_one_line_and_an_exit_code(run_cli, monkeypatch, raised, code, stderr):
    from ecanfnet.cli import export

    def fail(args):
        raise raised
    monkeypatch.setattr(export, "run", fail)  # build_parser() binds each command's run when main() calls it
    assert run_cli("export", "onnx", "x.onnx") == (code, "", stderr)


def test_library_log_records_are_lines_on_stderr_only_while_main_runs(run_cli, monkeypatch):
    import logging

    from ecanfnet.cli import export

    def log(args):
        logging.getLogger("ecanfnet.weights").info("downloading %s", "x\x1b")
        logging.getLogger("ecanfnet.backends").warning("slow path")
        return 0
    monkeypatch.setattr(export, "run", log)
    assert run_cli("export", "onnx", "x.onnx") == (0, "", "ecanfnet: downloading x\\x1b\n"
                                                          "ecanfnet: warning: slow path\n")
    assert not [h for h in logging.getLogger("ecanfnet").handlers if not isinstance(h, logging.NullHandler)]
