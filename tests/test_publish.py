"""Publishing: the model card a run writes (front matter, escaping of class names, the repository filled in on
push) and `push`, against a local stand-in for the Hub that records what it is sent: exactly README.md, config.json
and model.safetensors, never the training state; offline, without a token or refused: one line."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from ecanfnet.publish import (MAX_LISTED_CLASSES, PUBLISH_FILES, REPO_PLACEHOLDER, PublishError, RunSummary,
                              card_for_repo, check_publishable, hub_repo, model_card, push, write_model_card)

CLASSES = ("astronaut", "coffee", "rocket")
HISTORY = ({"epoch": 1, "train_loss": 1.2, "val_loss": 0.9, "val_top1": 0.5, "val_top5": 1.0},
           {"epoch": 2, "train_loss": 0.8, "val_loss": 0.7, "val_top1": 0.75, "val_top5": 1.0},
           {"epoch": 3, "train_loss": 0.6, "val_loss": 0.8, "val_top1": 0.625, "val_top5": 1.0})


def summary(**changes) -> RunSummary:
    values = dict(name="flowers", base_weights="hf-hub:timm/eca_nfnet_l0", classes=CLASSES, train_images=(6, 5, 5),
                  val_images=(2, 3, 3), validation="a random 30% of the images", image_size=48,
                  preprocessing="the shorter side resized to 48", recipe=(("epochs", "3"), ("precision", "fp32")),
                  history=HISTORY, epochs=3)
    values.update(changes)
    return RunSummary(**values)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# --- the card ------------------------------------------------------------------------------------------------

def test_card_front_matter_names_the_published_base_weights_and_the_hub_fields():
    meta = front_matter(model_card(summary()))
    assert meta == {"license": "apache-2.0", "library_name": "timm", "pipeline_tag": "image-classification",
                    "tags": ["image-classification", "timm", "ecanfnet", "eca_nfnet_l0"],
                    "base_model": "timm/eca_nfnet_l0", "metrics": ["accuracy"]}


@pytest.mark.parametrize(("source", "base_model", "said"), [
    ("hf_hub:someone/nfnet-birds@v2", "someone/nfnet-birds", "fine-tuned from [`someone/nfnet-birds`]"),
    ("/home/me/secret/checkpoints/start.safetensors", None, "the local checkpoint `start.safetensors`"),
    ("hf-hub:not a repo\nlicense: mit", None, "the local checkpoint"),
    (None, None, "trained from scratch"),
])
def test_card_names_other_starting_weights_without_leaking_local_paths(source, base_model, said):
    card = model_card(summary(base_weights=source))
    assert front_matter(card).get("base_model") == base_model and "license" not in front_matter(card)  # not ours to say
    assert said in card and "/home/me" not in card
    assert ("ImageNet-1k pretraining" in card) is False  # the ImageNet caveats belong to the published base only


def test_card_reports_the_saved_and_the_last_epoch_the_data_and_the_recipe():
    card = model_card(summary())
    assert "| saved weights (best top-1) | 2 | 75.0 % | 100.0 % | 0.7000 |" in card
    assert "| last epoch | 3 | 62.5 % | 100.0 % | 0.8000 |" in card
    assert "epoch 2 of 3" in card and "in progress" not in card
    assert "| astronaut | 6 | 2 |" in card and "16 training and 8 validation images in 3 classes" in card
    assert "| epochs | 3 |" in card and "| precision | fp32 |" in card
    assert "ImageNet-1k pretraining" in card and "A small training set" in card
    assert "Training is in progress: 1 of 3 epochs finished" in model_card(summary(history=HISTORY[:1]))


def test_hostile_class_and_folder_names_stay_inert_text():
    hostile = ("a|b", "<script>alert(1)</script>", "esc\x1b[2J\u202e", "[link](http://x)", "`code`\nnew line")
    card = model_card(summary(classes=hostile, train_images=(1,) * 5, val_images=(1,) * 5, name="# title\x07"))
    rows = [line for line in card.splitlines() if line.startswith("| ") and line.endswith(" | 1 | 1 |")]
    assert len(rows) == 5 and all(row.count(" | ") == 2 for row in (r.replace("\\|", "") for r in rows))
    assert "<script>" not in card and "&lt;script&gt;" in card and "\\[link\\](http" in card  # no link
    assert not any(c in card for c in "\x1b\u202e\x07") and "\\x1b" in card
    assert card.count("\n# ") == 1  # one title: a class name cannot start a heading


def test_many_classes_are_counted_past_the_listed_ones():
    n = MAX_LISTED_CLASSES + 7
    card = model_card(summary(classes=tuple(f"c{i}" for i in range(n)), train_images=(2,) * n, val_images=(1,) * n))
    assert f"| c{MAX_LISTED_CLASSES - 1} | 2 | 1 |" in card and f"| c{MAX_LISTED_CLASSES} |" not in card
    assert "| ... and 7 more | 14 | 7 |" in card


def test_push_fills_in_the_repository_and_drops_the_note():
    card = model_card(summary())
    assert REPO_PLACEHOLDER in card
    filled = card_for_repo(card, "someone/flowers")
    assert REPO_PLACEHOLDER not in filled and 'pipeline("image-classification", model="someone/flowers")' in filled
    assert 'timm.create_model("hf-hub:someone/flowers", pretrained=True)' in filled
    assert len(filled.splitlines()) == len(card.splitlines()) - 2  # the note and the blank line after it
    with pytest.raises(PublishError, match="not a Hub repository id"):
        card_for_repo(card, "no-owner")


@pytest.mark.parametrize(("source", "repo"), [("hf-hub:timm/eca_nfnet_l0", "timm/eca_nfnet_l0"),
                                              ("hf_hub:a/b@main", "a/b"), ("hf-hub:a/b/c", None),
                                              ("hf-hub:a--b/c", None), ("timm/eca_nfnet_l0", None)])
def test_hub_repo_of_a_weights_source(source, repo):
    assert hub_repo(source) == repo


# --- a folder to publish -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """OUT as train leaves it (README.md, config.json, model.safetensors) plus files that must never be uploaded:
    OUT.training/last.pt beside it, and inside it a legacy training/last.pt and a note."""
    from ecanfnet import build_model, save_pretrained

    out = tmp_path_factory.mktemp("publish") / "flowers"
    model = build_model(num_classes=3)
    model.pretrained_cfg = model.pretrained_cfg.as_trained_at(48)
    save_pretrained(model, out, label_names=list(CLASSES))
    write_model_card(out, summary())
    (out / "training").mkdir()
    (out / "training" / "last.pt").write_bytes(b"state")
    (out / "notes.txt").write_text("private notes")
    (out.parent / "flowers.training").mkdir()
    (out.parent / "flowers.training" / "last.pt").write_bytes(b"state")
    return out


@pytest.mark.parametrize("missing", PUBLISH_FILES)
def test_a_folder_without_one_of_the_files_is_refused_naming_it(model_folder, tmp_path, missing):
    folder = tmp_path / "out"
    shutil.copytree(model_folder, folder)
    (folder / missing).unlink()
    with pytest.raises(PublishError) as refused:
        check_publishable(folder)
    assert str(folder / missing) in str(refused.value) and "missing" in str(refused.value)


def test_a_folder_that_is_no_timm_checkpoint_is_refused_naming_the_file(model_folder, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(model_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({"num_classes": 3}))
    with pytest.raises(PublishError, match=r"config\.json: not a timm hub config .*architecture, pretrained_cfg"):
        check_publishable(folder)
    (folder / "config.json").write_text(json.dumps({**config, "num_classes": 5}))
    with pytest.raises(PublishError, match=r"config\.json"):
        check_publishable(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PublishError, match=r"model\.safetensors"):
        check_publishable(folder)
    assert check_publishable(model_folder) == model_folder


# --- push, against a stand-in for the Hub --------------------------------------------------------------------

class FakeHub:
    """A local HTTP server answering the Hub API calls of a push (create repo, create branch, validate the card's
    metadata, preupload, commit), recording each request; every file is asked for as a "regular" (inline) upload, so
    the commit carries the bytes of all of them. refuse=STATUS answers every request with that status."""

    def __init__(self, refuse: int | None = None) -> None:
        self.requests: list[tuple[str, str, dict]] = []   # (method, path, headers)
        self.commits: list[dict] = []                     # {"revision", "summary", "files": {path: bytes}}
        self.refuse = refuse
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        parts = path.split("?")[0].strip("/").split("/")
        if self.refuse:
            return self.refuse, {"error": "Invalid credentials in Authorization header"}
        if parts[:3] == ["api", "repos", "create"]:
            payload = json.loads(body)
            return 200, {"url": f"{self.endpoint}/{payload['organization']}/{payload['name']}"}
        if parts[:2] == ["api", "validate-yaml"]:
            bad = b"license: not-a-license" in body
            return (400, {"errors": [{"message": '"license" must be one of [apache-2.0, mit, ...]'}]}) if bad \
                else (200, {"errors": [], "warnings": []})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "branch":
            return 200, {}
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in files]}
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            files = {item["value"]["path"]: base64.b64decode(item["value"]["content"])
                     for item in lines if item["key"] == "file"}
            others = [item["key"] for item in lines if item["key"] not in ("header", "file")]
            self.commits.append({"revision": "/".join(parts[5:]), "summary": lines[0]["value"]["summary"],
                                 "files": files, "others": others})
            return 200, {"commitUrl": f"{self.endpoint}/{parts[2]}/{parts[3]}/commit/0123abcd",
                         "commitOid": "0123abcd" * 5, "pullRequestUrl": None}
        return 404, {"error": f"the fake Hub does not answer {method} {path}"}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def _reply(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
                status, payload = hub.answer(self.command, self.path, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _reply

            def log_message(self, *args) -> None:
                pass
        return Handler


@pytest.fixture
def fake_hub():  # a server (in a thread): the tests that use it are slow
    hub = FakeHub()
    yield hub
    hub.close()


@pytest.mark.slow
def test_push_uploads_exactly_the_publishable_files_in_one_commit(model_folder, fake_hub):
    url = push(model_folder, "someone/flowers", token="hf_test", endpoint=fake_hub.endpoint)
    assert url == f"{fake_hub.endpoint}/someone/flowers/commit/0123abcd"
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == sorted(PUBLISH_FILES) and commit["others"] == []  # no last.pt, no notes
    assert commit["revision"] == "main" and commit["summary"] == "Upload model, config and model card (ecanfnet push)"
    for name in ("config.json", "model.safetensors"):
        assert commit["files"][name] == (model_folder / name).read_bytes()
    card = commit["files"]["README.md"].decode()
    assert card == card_for_repo((model_folder / "README.md").read_text(), "someone/flowers")
    assert REPO_PLACEHOLDER in (model_folder / "README.md").read_text()  # the folder itself is left as it was
    assert all(headers.get("authorization") == "Bearer hf_test" for _, path, headers in fake_hub.requests)
    create = [path for method, path, _ in fake_hub.requests if path.startswith("/api/repos/create")]
    assert len(create) == 1


@pytest.mark.slow
def test_push_to_a_branch_with_a_message_creates_the_branch_first(model_folder, fake_hub):
    push(model_folder, "someone/flowers", revision="v2", commit_message="Second try", private=True,
         token="hf_test", endpoint=fake_hub.endpoint)
    paths = [path for _, path, _ in fake_hub.requests]
    branch = paths.index("/api/models/someone/flowers/branch/v2")
    assert paths.index("/api/repos/create") < branch < next(i for i, p in enumerate(paths) if "/commit/" in p)
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v2" and commit["summary"] == "Second try"


@pytest.mark.slow
@pytest.mark.parametrize(("status", "expected"), [(401, "check the token"), (403, "write access")])
def test_a_refused_push_is_one_line(model_folder, status, expected):
    hub = FakeHub(refuse=status)
    try:
        with pytest.raises(PublishError) as refused:
            push(model_folder, "someone/flowers", token="hf_bad", endpoint=hub.endpoint)
    finally:
        hub.close()
    message = str(refused.value)
    assert "\n" not in message and message.startswith("the Hub refused the push to someone/flowers: ")
    assert str(status) in message and expected in message


@pytest.mark.slow
def test_a_card_the_hub_refuses_is_one_line_and_nothing_is_committed(model_folder, fake_hub, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(model_folder, folder)
    card = (folder / "README.md").read_text()
    (folder / "README.md").write_text(card.replace("license: apache-2.0", "license: not-a-license"))
    with pytest.raises(PublishError) as refused:
        push(folder, "someone/flowers", token="hf_test", endpoint=fake_hub.endpoint)
    assert str(refused.value) == ('cannot push to someone/flowers: Invalid metadata in README.md. "license" must be '
                                  'one of [apache-2.0, mit, ...]')
    assert fake_hub.commits == []


@pytest.mark.slow
def test_push_offline_without_network_or_token_is_one_line_before_any_request(model_folder, fake_hub, monkeypatch,
                                                                              tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PublishError, match=r"^cannot push: HF_HUB_OFFLINE is set"):
        push(model_folder, "someone/flowers", token="hf_test", endpoint=fake_hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PublishError, match=r"^cannot push: no connection to http://127\.0\.0\.1:9 "):
        push(model_folder, "someone/flowers", token="hf_test", endpoint="http://127.0.0.1:9")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-tokens"), raising=False)
    with pytest.raises(PublishError, match=r"^cannot push: no Hugging Face token; log in with `hf auth login`"):
        push(model_folder, "someone/flowers", endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


@pytest.mark.slow
def test_push_refuses_a_bad_repository_id_and_a_folder_to_not_publish(tmp_path, fake_hub):
    with pytest.raises(PublishError, match="not a Hub repository id"):
        push(tmp_path, "someone/flowers/extra", token="hf_test", endpoint=fake_hub.endpoint)
    with pytest.raises(PublishError, match=r"README\.md: missing"):
        push(tmp_path, "someone/flowers", token="hf_test", endpoint=fake_hub.endpoint)
    assert fake_hub.requests == []


@pytest.mark.slow
def test_the_push_command_uploads_and_prints_the_commit(model_folder, fake_hub, run_cli, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", fake_hub.endpoint)
    monkeypatch.setenv("MY_WRITE_TOKEN", "hf_cli")
    code, out, err = run_cli("push", str(model_folder), "someone/flowers", "--token-env", "MY_WRITE_TOKEN",
                             "--commit-message", "From the CLI")
    url = f"{fake_hub.endpoint}/someone/flowers/commit/0123abcd"
    assert code == 0 and out == f"pushed {model_folder} to someone/flowers: {url}\n"
    assert err.startswith("ecanfnet: uploading README.md, config.json, model.safetensors (") and err.count("\n") == 1
    (commit,) = fake_hub.commits
    assert sorted(commit["files"]) == sorted(PUBLISH_FILES) and commit["summary"] == "From the CLI"
    assert fake_hub.requests[0][2].get("authorization") == "Bearer hf_cli"
