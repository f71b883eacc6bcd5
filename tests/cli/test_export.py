"""`ecanfnet export`: an output that cannot be written fails in one line, before the model is looked at."""

from __future__ import annotations

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
