"""`ecanfnet evaluate` from the command line: which files it writes, and where its progress goes."""

from __future__ import annotations

import json


def test_evaluate_writes_files_only_where_asked(run_cli, tmp_path, monkeypatch):
    from hostile import small_model_folder, write_pngs

    model = small_model_folder(tmp_path / "model", label_names=["a", "b", "c"])
    for name in "abc":
        write_pngs(tmp_path / "data" / name, 2)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    base = ["evaluate", "--data", str(tmp_path / "data"), "--weights", str(model), "--workers", "0",
            "--batch-size", "4", "--device", "cpu"]
    code, out, err = run_cli(*base, "--format", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["images"] == 6 and "per_class_csv" not in summary
    assert list((tmp_path / "cwd").iterdir()) == []
    assert "\r" not in err and err.splitlines()[-1].startswith("evaluate: 6/6 img (100%)"), err

    code, out, err = run_cli(*base, "--per-class-csv", str(tmp_path / "out" / "pc.csv"), "--no-progress")
    assert code == 0 and err == "" and f"per class: {tmp_path / 'out' / 'pc.csv'}" in out
    assert (tmp_path / "out" / "pc.csv").read_text().splitlines()[0] == \
        "class,index,images,top1,top5,precision,recall,f1,support"
    code, out, err = run_cli(*base, "--per-class-csv", "/proc/pc.csv")
    assert code == 1 and err.count("\n") == 1 and err.startswith("ecanfnet: error: /proc/pc.csv: ")
    assert list((tmp_path / "cwd").iterdir()) == []
