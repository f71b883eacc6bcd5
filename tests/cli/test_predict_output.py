"""`ecanfnet predict --output FILE.jsonl` (resumable shards, torchrun ranks) and `predict -` (paths on stdin):
the file holds what `--format json` prints; a killed run resumes to the same bytes; 2 ranks give the rows of 1;
foreign files, changed settings and bad stdin lines are refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import CPU_ENV, make_image_folder, one_error_line, read_json_lines, torchrun_env

LABELS = ["astronaut", "coffee", "rocket"]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """L0 with random weights, 3 named classes, 64 px preprocessing (quick on a CPU)."""
    from hostile import small_model_folder

    return small_model_folder(tmp_path_factory.mktemp("predict-output") / "model", label_names=LABELS)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 crops of real photos (4 per class, 64 px) and a corrupt JPEG: 13 inputs."""
    folder = make_image_folder(tmp_path_factory.mktemp("photos") / "photos", per_class=4, size=64)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def predict_args(model: Path, *inputs: str | Path, output: Path | None = None) -> list[str]:
    to_file = ["--output", str(output), "--shard-size", "2"] if output is not None else ["--format", "json"]
    return ["predict", *map(str, inputs), *to_file, "--weights", str(model), "--backend", "torch",
            "--batch-size", "2", "--top-k", "2", "--no-progress"]


def assert_same_rows(got: list[dict], want: list[dict]) -> None:
    """Same rows in the same order: every field equal, numbers to float rounding (predict's batches differ)."""
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert same_value(g, w), (g, w)


def same_value(got, want) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(same_value(got[k], want[k]) for k in want)
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(map(same_value, got, want))
    if isinstance(want, float):
        return got == pytest.approx(want, rel=1e-5, abs=1e-6)
    return got == want


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, model, photos) -> tuple[int, str, str, Path]:
    """(exit code, stdout, stderr, OUT) of an in-process run over a missing file and the photos."""
    from ecanfnet.cli import main

    folder = tmp_path_factory.mktemp("first-run")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(predict_args(model, folder / "no-such.jpg", photos, output=folder / "preds.jsonl"))
    return code, stdout.getvalue(), stderr.getvalue(), folder / "preds.jsonl"


def test_output_holds_what_format_json_prints_and_a_rerun_has_nothing_to_do(run_cli, first_run, model, photos):
    code, stdout, stderr, out = first_run
    missing = out.with_name("no-such.jpg")
    assert code == 1 and stdout == f"wrote 14 rows to {out}\n", stderr  # 12 photos, the broken one, the missing one
    assert "2 of 14 inputs failed" in stderr
    code, printed, _ = run_cli(*predict_args(model, missing, photos))
    assert code == 1
    rows = read_json_lines(out.read_text())
    assert_same_rows(rows, read_json_lines(printed))
    assert rows[0] == {"path": str(missing), "error": f"{missing}: no such file or folder"}
    assert [r["path"] for r in rows if "error" in r] == [str(missing), str(photos / "broken.jpg")]
    assert all(p["label"] == LABELS[p["index"]] for r in rows for p in r.get("predictions", []))
    manifest = json.loads(out.with_name("preds.manifest.json").read_text())
    assert (manifest["rows"], manifest["failed"], manifest["bytes"]) == (14, 2, out.stat().st_size)
    assert manifest["plan"]["top_k"] == 2 and not out.with_name("preds.parts").exists()

    before = (out.read_bytes(), out.stat().st_mtime_ns)
    code, stdout, stderr = run_cli(*predict_args(model, missing, photos, output=out))
    assert code == 1 and "is complete for these files and settings; nothing to do" in stderr
    assert (out.read_bytes(), out.stat().st_mtime_ns) == before


def test_paths_from_stdin_keep_their_order(run_cli, monkeypatch, tmp_path, model, photos):
    lines = [photos / "coffee" / "1.jpg", "", photos / "astronaut" / "0.jpg", "   ", tmp_path / "gone.jpg"]
    data = "".join(f"{p}\r\n" if i == 2 else f"{p}\n" for i, p in enumerate(lines)).encode()
    results = {}
    for mode, output in (("print", None), ("file", tmp_path / "stdin.jsonl")):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
        code, stdout, stderr = run_cli(*predict_args(model, "-", output=output))
        assert code == 1, stderr  # gone.jpg
        results[mode] = read_json_lines(stdout if output is None else output.read_text())
    want = [str(tmp_path / "gone.jpg"), str(photos / "coffee" / "1.jpg"), str(photos / "astronaut" / "0.jpg")]
    assert [r["path"] for r in results["print"]] == want  # unmatched inputs first, as --format json prints them
    assert_same_rows(results["file"], results["print"])


@pytest.mark.parametrize("data, message", [
    (b"a.jpg\nb\x00c.jpg\n", "stdin line 2: contains a NUL byte"),
    (b"a.jpg\n" + b"x" * 5000 + b"\n", "stdin line 2: longer than 4096 bytes"),
    (b"x" * 100_000, "stdin line 1: longer than 4096 bytes"),
    (b"\n  \n", "stdin holds no paths"),
    (b"", "stdin holds no paths"),
])
def test_bad_stdin_is_refused_in_one_line(run_cli, monkeypatch, tmp_path, data, message):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    # weights that do not exist: the input is checked before any model is looked for
    code, _, err = run_cli("predict", "-", "--weights", str(tmp_path / "no-such-weights"))
    assert code == 1 and message in one_error_line(err)


@pytest.mark.parametrize("case", ["foreign_rows", "foreign_manifest", "foreign_parts", "rows_are_a_folder",
                                  "output_is_a_folder", "not_jsonl", "stdin_twice", "shard_size_alone",
                                  "torchrun_without_output", "torchrun_stdin"])
def test_refusals_come_before_any_work_in_one_line(run_cli, monkeypatch, tmp_path, case):
    out = tmp_path / "preds.jsonl"
    victim = {"foreign_rows": out, "foreign_manifest": tmp_path / "preds.manifest.json",
              "foreign_parts": tmp_path / "preds.parts" / "notes.txt"}.get(case)
    if victim is not None:
        victim.parent.mkdir(exist_ok=True)
        victim.write_text('{"theme": "dark"}\n')
    if case == "rows_are_a_folder":
        out.mkdir()
    if case.startswith("torchrun"):
        monkeypatch.setenv("WORLD_SIZE", "2")
    target = {"output_is_a_folder": tmp_path, "not_jsonl": tmp_path / "preds.json"}.get(case, out)
    inputs = {"stdin_twice": ["-", "-"], "torchrun_stdin": ["-"]}.get(case, [str(tmp_path)])
    options = {"shard_size_alone": ["--shard-size", "4"], "torchrun_without_output": []}.get(
        case, ["--output", str(target)])
    code, _, err = run_cli("predict", *inputs, *options, "--weights", str(tmp_path / "no-such-weights"))
    line = one_error_line(err)
    assert code == 1 and "no-such-weights" not in line
    if victim is not None:
        assert str(victim if case != "foreign_parts" else victim.parent) in line
        assert victim.read_text() == '{"theme": "dark"}\n'
    expected = {"rows_are_a_folder": "is a folder", "output_is_a_folder": "must be a .jsonl file name",
                "not_jsonl": "must be a .jsonl file name",
                "foreign_rows": "exists without the `ecanfnet predict` manifest",
                "stdin_twice": "given more than once", "shard_size_alone": "--shard-size applies to --output only",
                "torchrun_without_output": "give --output FILE.jsonl", "torchrun_stdin": "cannot come from stdin"}
    assert expected.get(case, "") in line


def test_changed_settings_are_refused_and_damaged_shards_redone_on_resume(run_cli, monkeypatch, first_run, model,
                                                                        photos):
    import ecanfnet.batch_predict as batch_predict

    whole = first_run[3]
    inputs = (whole.with_name("no-such.jpg"), photos)  # the first run's, into another folder
    out = whole.parent / "resumed" / "preds.jsonl"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped after the shards, before the merge
    monkeypatch.setattr(batch_predict, "_merge", killed)
    code, _, err = run_cli(*predict_args(model, *inputs, output=out))
    assert code == 130 and not out.exists()
    monkeypatch.undo()

    for changed, option in (("top_k", ["--top-k", "3"]), ("min_score", ["--min-score", "0.5"])):
        code, _, err = run_cli(*predict_args(model, *inputs, output=out), *option)
        assert code == 1 and f"other settings ({changed} differ)" in one_error_line(err)
    shard = out.with_name("preds.parts") / "shard-00001.jsonl"
    shard.write_bytes(shard.read_bytes()[:-20])  # a torn write
    code, stdout, err = run_cli(*predict_args(model, *inputs, output=out))
    assert code == 1 and stdout == f"wrote 14 rows to {out}\n"
    assert f"{shard}: damaged or truncated (no newline at the end); classifying shard 1 again" in err
    assert "resuming" in err and "6 of 7 shards already done" in err
    assert out.read_bytes() == whole.read_bytes()


def start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, *(launcher or []), "-m", "ecanfnet", *args]
    return subprocess.Popen(cmd, env=torchrun_env(CPU_ENV), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model, photos) -> Path:
    """One uninterrupted single-process run (a subprocess, as the runs it is compared with)."""
    out = tmp_path_factory.mktemp("reference") / "preds.jsonl"
    proc = start(predict_args(model, photos, output=out))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1 and stdout == f"wrote 13 rows to {out}\n", stderr  # 1: the broken file
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_file(tmp_path, reference, model, photos):
    out = tmp_path / "preds.jsonl"
    proc = start(predict_args(model, photos, output=out))
    first_shard = tmp_path / "preds.parts" / "shard-00000.jsonl"
    deadline = time.monotonic() + 300
    while not first_shard.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert first_shard.exists() and not out.exists(), "the run must be killed part-way"

    again = start(predict_args(model, photos, output=out))
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 1 and "shards already done" in stderr, stderr
    assert out.read_bytes() == reference.read_bytes()
    assert not (tmp_path / "preds.parts").exists()


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_rows_of_one_process(tmp_path, reference, model, photos):
    out = tmp_path / "preds.jsonl"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = start(predict_args(model, photos, output=out), launcher=launcher)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stderr[-3000:]  # the broken file, as in the single-process run
    assert stdout.count("wrote 13 rows") == 1  # rank 0 alone merges and reports
    assert_same_rows(read_json_lines(out.read_text()), read_json_lines(reference.read_text()))
