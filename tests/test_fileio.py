"""Written files' permissions, early output checks, terminal-safe text and progress off a terminal."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ecanfnet.console import json_line, printable
from ecanfnet.fileio import check_output_dir, check_output_file, write_atomically, write_csv_atomically
from ecanfnet.progress import PlainProgress, progress

ROOT = Path(__file__).resolve().parents[1]

# One child process writes every kind of output under each umask: the model folder (save_pretrained),
# an ONNX export, an embedding run and a CSV; it prints the mode of each file and folder it made.
WRITE_EVERYTHING = r"""
import json, os, stat, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from hostile import small_model_folder, write_pngs
from ecanfnet import create_model
from ecanfnet.exports import export_onnx
from ecanfnet.embed import embed_files
from ecanfnet.fileio import write_csv_atomically

root, modes = Path(sys.argv[1]), {}
images = write_pngs(root / "images", 2)
for umask in (0o022, 0o077):
    os.umask(umask)
    out = root / f"u{umask:03o}"
    folder = small_model_folder(out / "new" / "model")
    model = create_model(pretrained=folder)
    export_onnx(model, out / "onnx" / "net.onnx", image_size=64, check=False)
    embed_files([str(p) for p in images], out / "emb" / "vectors.npy", model=model, backend="torch", progress=False)
    write_csv_atomically(out / "table.csv", [{"a": 1}], ["a"])
    for path in sorted(out.rglob("*")):
        modes[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
print(json.dumps(modes))
"""


@pytest.mark.slow
def test_written_files_and_folders_follow_the_umask(tmp_path):
    proc = subprocess.run([sys.executable, "-c", WRITE_EVERYTHING, str(tmp_path), str(ROOT / "tests")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr
    modes = json.loads(proc.stdout)
    for umask, file_mode, dir_mode in ((0o022, 0o644, 0o755), (0o077, 0o600, 0o700)):
        made = {k: v for k, v in modes.items() if k.startswith(f"u{umask:03o}/")}
        files = {k for k in made if (tmp_path / k).is_file()}
        expected = {"model/model.safetensors", "model/config.json", "onnx/net.onnx", "emb/vectors.npy",
                    "emb/vectors.json", "emb/vectors.paths.txt", "table.csv"}
        assert {k for k in files if any(k.endswith(e) for e in expected)} == files
        assert len(files) == len(expected), sorted(files)
        assert {k: oct(made[k]) for k in files} == {k: oct(file_mode) for k in files}
        assert {k: oct(v) for k, v in made.items() if k not in files} == \
            {k: oct(dir_mode) for k in made if k not in files}


def test_replacing_a_file_keeps_its_mode(tmp_path):
    target = tmp_path / "kept.csv"
    target.write_text("old\n")
    target.chmod(0o640)
    write_csv_atomically(target, [{"a": 1}], ["a"])
    assert target.read_text() == "a\n1\n" and stat.S_IMODE(target.stat().st_mode) == 0o640
    setuid = tmp_path / "setuid.bin"
    setuid.write_bytes(b"x")
    setuid.chmod(0o4755)
    write_atomically(setuid, lambda tmp: Path(tmp).write_bytes(b"y"))
    assert stat.S_IMODE(setuid.stat().st_mode) == 0o755


def test_umask_is_read_without_proc_too(tmp_path, monkeypatch):
    import ecanfnet.fileio as fileio

    old = os.umask(0o027)
    try:
        assert fileio.new_file_mode(tmp_path / "new") == 0o640
        monkeypatch.setattr(fileio, "_umask_from_proc", lambda: None)
        assert fileio.new_file_mode(tmp_path / "new") == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("where", ["folder", "under_a_file", "proc"])
def test_check_output_file_fails_early_naming_the_path(tmp_path, where):
    (tmp_path / "plain").write_text("x")
    target = {"folder": tmp_path, "under_a_file": tmp_path / "plain" / "x.onnx", "proc": Path("/proc/x.onnx")}[where]
    with pytest.raises(OSError) as info:
        check_output_file(target)
    assert info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == [tmp_path / "plain"]  # the probe left nothing behind
    assert check_output_file(tmp_path / "new" / "deeper" / "x.onnx") == tmp_path / "new" / "deeper" / "x.onnx"
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("where", ["file", "under_a_file", "proc", "under_proc"])
def test_check_output_dir_fails_early_naming_the_path(tmp_path, where):
    (tmp_path / "plain").write_text("x")
    target = {"file": tmp_path / "plain", "under_a_file": tmp_path / "plain" / "model",
              "proc": Path("/proc/model"), "under_proc": Path("/proc/no-such/model")}[where]
    with pytest.raises(OSError) as info:
        check_output_dir(target)
    assert info.value.filename == str(target)
    assert isinstance(info.value, NotADirectoryError) == (where in ("file", "under_a_file"))
    assert list(tmp_path.iterdir()) == [tmp_path / "plain"]  # the probe left nothing behind
    assert check_output_dir(tmp_path / "new" / "model") == tmp_path / "new" / "model"
    assert check_output_dir(tmp_path) == tmp_path and not (tmp_path / "new").exists()


def test_printable_escapes_every_terminal_control():
    hostile = "a\x1b]0;pwned\x07b\x1b[2J\nc\td\x7f\x9b31m\u202eE\u2028\udcff ok é 猫 \u00a0"
    safe = printable(hostile)
    assert not any(ord(c) < 0x20 or 0x7f <= ord(c) <= 0x9f or c in "\u202e\u2028" or 0xd800 <= ord(c) <= 0xdfff
                   for c in safe)
    assert safe == ("a\\x1b]0;pwned\\x07b\\x1b[2J\\x0ac\\x09d\\x7f\\x9b31m\\u202eE\\u2028\\udcff ok é 猫 \u00a0")
    assert printable("plain/path.jpg") == "plain/path.jpg"


def test_json_line_escapes_what_json_dumps_leaves_raw():
    data = {"label": "\x1b[2J\x7f\x9b\u202e\udcff é"}
    line = json_line(data)
    assert not any(0x7f <= ord(c) <= 0x9f or c == "\u202e" or 0xd800 <= ord(c) <= 0xdfff for c in line)
    assert "é" in line and json.loads(line) == data
    line.encode("utf-8")  # printable to a strict UTF-8 stream


def test_plain_progress_prints_a_line_per_tenth(monkeypatch):
    err, out = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(sys, "stdout", out)
    bar = progress(605, "predict")
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(605):
            bar.update(1)
        bar.set_postfix(loss=0.1234567)
        bar.write("a result")
    lines = err.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in err.getvalue()
    assert lines[0].startswith("predict: 61/605 img (10%)") and lines[-1].startswith("predict: 605/605 img (100%)")
    assert out.getvalue() == "a result\n"
    quiet = progress(5, "x", enabled=False)
    quiet.update(5)
    quiet.close()
    assert len(err.getvalue().splitlines()) == 10
    partial = progress(10, "x")
    partial.update(3)
    partial.close()  # stopped early: the end line says how far it got
    assert err.getvalue().splitlines()[-1].startswith("x: 3/10 img (30%)")


def test_plain_progress_lines_escape_control_characters(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress(2, "embed \x1b]0;pwned\x07") as bar:
        bar.set_postfix(file="a\nb\u202e.jpg")
        bar.update(2)
    line = err.getvalue()
    assert line.startswith("embed \\x1b]0;pwned\\x07: 2/2 img (100%) in "), line
    assert line.endswith(", file=a\\x0ab\\u202e.jpg\n") and line.count("\n") == 1, line


def test_a_failed_write_names_the_target_and_leaves_no_temp_file(tmp_path):
    import errno

    def disk_full(tmp: str) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    with pytest.raises(OSError) as info:
        write_atomically(tmp_path / "out.bin", disk_full)
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(tmp_path / "out.bin"))
    assert list(tmp_path.iterdir()) == []
