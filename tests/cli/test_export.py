"""`ecanfnet export`: an output that cannot be written fails in one line, before the model is looked at; option checks."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize("where", ["proc", "under_a_file", "folder", "name_with_controls"])
def test_export_to_an_unwritable_path_is_one_line_before_loading(run_cli, raw_control, tmp_path, where):
    from ecanfnet.console import printable

    (tmp_path / "plain").write_text("x")
    out = {"proc": "/proc/x.onnx", "under_a_file": str(tmp_path / "plain" / "x.onnx"), "folder": str(tmp_path),
           "name_with_controls": str(tmp_path / "plain" / "x\x1b[2J\n.onnx")}[where]
    # weights that do not exist: the output is checked first, so they are never looked at
    code, stdout, err = run_cli("export", "onnx", out, "--weights", str(tmp_path / "no-such-weights"))
    assert code == 1 and stdout == "" and not any(raw_control(c) for c in err)
    assert err.count("\n") == 1 and err.startswith(f"ecanfnet: error: {printable(out)}: ") and "Traceback" not in err, err


@pytest.mark.parametrize("where", ["a_file", "foreign_model_folder", "proc"])
def test_export_triton_to_an_unusable_repository_is_one_line_before_loading(run_cli, tmp_path, where):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "repo" / "m").mkdir(parents=True)
    (tmp_path / "repo" / "m" / "config.pbtxt").write_text('name: "m"\n')  # someone else's model
    out, target = {"a_file": (tmp_path / "plain", tmp_path / "plain"),
                   "foreign_model_folder": (tmp_path / "repo", tmp_path / "repo" / "m"),
                   "proc": (Path("/proc/repo"), Path("/proc/repo"))}[where]
    code, stdout, err = run_cli("export", "triton", str(out), "--model-name", "m",
                                "--weights", str(tmp_path / "no-such-weights"))
    assert code == 1 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith(f"ecanfnet: error: {target}: ") and "Traceback" not in err, err
    assert (tmp_path / "repo" / "m" / "config.pbtxt").read_text() == 'name: "m"\n'


def test_triton_options_are_refused_for_other_formats(run_cli, tmp_path):
    code, stdout, err = run_cli("export", "onnx", str(tmp_path / "m.onnx"), "--model-name", "m",
                                "--max-batch-size", "4", "--weights", str(tmp_path / "no-such-weights"))
    assert code == 2 and stdout == "" and not (tmp_path / "m.onnx").exists()
    assert err == "ecanfnet: error: --model-name, --max-batch-size: only for `ecanfnet export triton`\n"


@pytest.mark.parametrize("name", [".hidden", "a/b", "x" * 129])
def test_a_model_name_triton_cannot_hold_is_a_usage_error(run_cli, capsys, tmp_path, name):
    with pytest.raises(SystemExit) as info:
        run_cli("export", "triton", str(tmp_path), "--model-name", name)
    assert info.value.code == 2 and "model name must be letters, digits" in capsys.readouterr().err
