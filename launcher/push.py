"""`launcher push`: a delivered model (a run's final/) or an export folder to a Hugging Face Hub repository.

The token comes from the environment (HF_TOKEN) or `hf auth login`'s cache, as huggingface_hub finds it; it is never
printed nor passed on a command line. An interrupted upload resumes when run again: the Hub is asked which files
(and, with Xet storage, which chunks) it already holds, and only the rest is sent. `--dry-run` lists what would be
uploaded and shows the model card, and sends nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

from launcher.errors import LauncherError
from launcher.export import model_folder

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SKIPPED = (".cache", ".tmp")  # huggingface_hub's local upload state, half-written folders


def push_folder(path: Path) -> Path:
    """What is pushed: a run folder's final/, or a model or export folder as it is."""
    path = Path(path)
    if (path / "model.bin").is_file():  # a CTranslate2 export
        return path
    return model_folder(path)


def files_to_push(folder: Path) -> list[Path]:
    def skipped(p: Path) -> bool:
        return any(part.startswith(SKIPPED) or part.endswith(".tmp") for part in p.relative_to(folder).parts)

    return sorted(p for p in folder.rglob("*") if p.is_file() and not skipped(p))


def check_card(folder: Path) -> str:
    """The folder's README.md, checked with huggingface_hub's own parser (its model-index included)."""
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not card.is_file():
        raise LauncherError(f"{folder} has no README.md model card (a model this project delivered has one)")
    try:
        return str(ModelCard.load(card))
    except Exception as e:  # noqa: BLE001 - any parsing failure names the file
        raise LauncherError(f"{card}: not a valid model card ({type(e).__name__}: {e})") from None


def push(path: Path, repo: str, *, private: bool = False, revision: str | None = None, dry_run: bool = False,
         out=print) -> list[Path]:
    """Upload the folder (see `push_folder`) to `repo`; returns the files. With `dry_run` only lists them and shows
    the card."""
    if not REPO_ID.match(repo):
        raise LauncherError(f"--repo: got {repo!r}, expected OWNER/NAME")
    folder = push_folder(path)
    card = check_card(folder)
    files = files_to_push(folder)
    total = sum(p.stat().st_size for p in files)
    out(f"{'would upload' if dry_run else 'uploading'} {len(files)} files, {total / 1e6:.1f} MB, from {folder} to "
        f"https://huggingface.co/{repo}" + (f" (revision {revision})" if revision else "")
        + (" as a private repository" if private else ""))
    for p in files:
        out(f"  {p.relative_to(folder)}  {p.stat().st_size / 1e6:.1f} MB")
    if dry_run:
        out("model card (README.md):")
        out(card)
        return files
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=folder, revision=revision,
                          ignore_patterns=[f"{s}*" for s in SKIPPED] + [f"*/{s}*" for s in SKIPPED],
                          commit_message=f"Upload {folder.name} with whisper-launcher")
    except Exception as e:  # noqa: BLE001 - no token, no write access, no network: one line naming the cause (the
        # hub's messages never hold the token); rerunning resumes
        first = str(e).splitlines()[0] if str(e) else ""
        raise LauncherError(f"upload to {repo} failed: {type(e).__name__}: {first} (rerun to resume)") from None
    out(f"done: https://huggingface.co/{repo}")
    return files
