"""`ecanfnet push` as a user meets it: options handed to publish.push, usage errors, and one line (exit 1) for a
folder to not publish, a missing token, offline mode or no network. The upload itself: tests/test_publish.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import one_error_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A folder to publish: save_pretrained's config.json and model.safetensors, and a model card."""
    from ecanfnet import build_model, save_pretrained

    out = tmp_path_factory.mktemp("push") / "flowers"
    save_pretrained(build_model(num_classes=2), out, label_names=["cat", "dog"])
    (out / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# flowers\n")
    return out


def test_options_reach_the_library(run_cli, monkeypatch):
    from ecanfnet import publish

    calls = []
    monkeypatch.setattr(publish, "push", lambda folder, repo, **options: calls.append((folder, repo, options)) or "U")
    monkeypatch.setenv("MY_TOKEN", "hf_secret")
    code, out, err = run_cli("push", "runs/flowers", "me/flowers", "--private", "--revision", "v2",
                             "--commit-message", "Better", "--token-env", "MY_TOKEN")
    assert (code, out, err) == (0, "pushed runs/flowers to me/flowers: U\n", "")
    assert calls == [("runs/flowers", "me/flowers", dict(private=True, revision="v2", commit_message="Better",
                                                         token="hf_secret"))]
    assert run_cli("push", "runs/flowers", "me/flowers")[0] == 0
    assert calls[-1][2] == dict(private=False, revision=None, commit_message=None, token=None)  # the hub's defaults


@pytest.mark.parametrize("argv", [["out", "no-owner"], ["out", "a/b/c"], ["out", "me/bad--name"], ["out", "me/x y"],
                                  ["out", "me/flowers", "--token-env", "NOT-A-NAME"], ["out"]])
def test_bad_arguments_are_usage_errors(argv, capsys):
    from ecanfnet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["push", *argv])
    assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err


def test_an_unset_token_variable_is_one_line(run_cli, monkeypatch):
    monkeypatch.delenv("NO_SUCH_TOKEN_VAR", raising=False)
    code, out, err = run_cli("push", "out", "me/flowers", "--token-env", "NO_SUCH_TOKEN_VAR")
    assert code == 1 and out == ""
    assert "--token-env NO_SUCH_TOKEN_VAR: that environment variable is not set or empty" in one_error_line(err)


def test_a_folder_missing_a_file_or_with_a_foreign_config_is_one_line_naming_the_file(run_cli, monkeypatch, tmp_path,
                                                                                      model_folder):
    import shutil

    monkeypatch.setenv("MY_TOKEN", "hf_secret")
    folder = tmp_path / "out"
    shutil.copytree(model_folder, folder)
    (folder / "README.md").unlink()
    code, _, err = run_cli("push", str(folder), "me/flowers", "--token-env", "MY_TOKEN")
    assert code == 1 and f"{folder / 'README.md'}: missing" in one_error_line(err)
    (folder / "README.md").write_text("# card\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "num_labels": 2}))
    code, _, err = run_cli("push", str(folder), "me/flowers", "--token-env", "MY_TOKEN")
    assert code == 1 and f"{folder / 'config.json'}: not a timm hub config" in one_error_line(err)


def test_no_network_is_one_line(run_cli, monkeypatch, model_folder):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("MY_TOKEN", "hf_secret")
    code, _, err = run_cli("push", str(model_folder), "me/flowers", "--token-env", "MY_TOKEN")
    assert code == 1 and "cannot push: no connection to http://127.0.0.1:9" in one_error_line(err)


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_x"}, {"HF_TOKEN": ""}],
                         ids=["offline", "no-token"])
def test_offline_or_without_a_token_the_command_says_so_in_one_line(env, tmp_path, model_folder):
    full_env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT / "src"), **env}
    full_env.pop("HUGGING_FACE_HUB_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "ecanfnet", "push", str(model_folder), "me/flowers"],
                          capture_output=True, text=True, timeout=300, env=full_env)
    line = one_error_line(done.stderr)
    assert done.returncode == 1 and done.stdout == ""
    assert ("HF_HUB_OFFLINE is set" if "HF_HUB_OFFLINE" in env else "no Hugging Face token") in line
