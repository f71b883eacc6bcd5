"""`ecanfnet push`: upload the publishable files of a trained model folder to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import os
import re

from ..console import printable
from ._console import EXIT_FAILED, EXIT_OK, error
from ._options import add_command

EXAMPLES = (
    ("upload the model `ecanfnet train` wrote to runs/flowers (the repository is created if needed)",
     "ecanfnet push runs/flowers your-name/flowers-nfnet"),
    ("into a private repository, on a branch, with the token in $HF_WRITE_TOKEN",
     "ecanfnet push runs/flowers your-name/flowers-nfnet --private --revision v2 --token-env HF_WRITE_TOKEN"),
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def repo_id(text: str) -> str:
    """argparse type of REPO: OWNER/NAME (checked in full by the library)."""
    from ..publish import REPO_ID  # no heavy imports: publish imports huggingface_hub only when pushing

    if not REPO_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be a Hub repository id OWNER/NAME (letters, digits, '.', '_', '-'; "
                                         f"no '--' or '..'), got {text}")
    return text


def env_name(text: str) -> str:
    """argparse type of --token-env: the name of an environment variable."""
    if not _ENV_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be the name of an environment variable, got {text}")
    return text


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the push parser."""
    p = add_command(subparsers, "push", help="upload a trained model folder to the Hugging Face Hub",
                    description="Upload exactly README.md, config.json and model.safetensors of OUT (the "
                                "folder `ecanfnet train` wrote) to the Hub model repository REPO in one commit, "
                                "creating the repository if needed; anything else in OUT stays local. The model "
                                "card's OWNER/REPO placeholders are filled in with REPO in the uploaded copy. "
                                "Needs network access and a token with write access.",
                    examples=EXAMPLES)
    p.add_argument("folder", metavar="OUT", help="the model folder (README.md, config.json, model.safetensors)")
    p.add_argument("repo", metavar="REPO", type=repo_id, help="the Hub repository, OWNER/NAME")
    p.add_argument("--private", action="store_true",
                   help="create the repository private (an existing one keeps its visibility)")
    p.add_argument("--revision", metavar="BRANCH", default=None,
                   help="the branch to commit to, created from main if it does not exist (default: main)")
    p.add_argument("--commit-message", metavar="TEXT", default=None,
                   help="the commit's summary (default: 'Upload model, config and model card (ecanfnet push)')")
    p.add_argument("--token-env", metavar="NAME", type=env_name, default=None,
                   help="the environment variable holding the token (default: huggingface_hub's own: HF_TOKEN, "
                        "or the token saved by `hf auth login`)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Push the folder and print the commit's URL."""
    from ..errors import PublishError
    from ..publish import push

    token = None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            error(f"--token-env {args.token_env}: that environment variable is not set or empty")
            return EXIT_FAILED
    try:
        url = push(args.folder, args.repo, private=args.private, revision=args.revision,
                   commit_message=args.commit_message, token=token)
    except PublishError as exc:
        error(str(exc))
        return EXIT_FAILED
    print(printable(f"pushed {args.folder} to {args.repo}: {url}"))
    return EXIT_OK
