"""Uploading a saved model: to the Hugging Face Hub (huggingface_hub), or to a local folder.

The token is huggingface_hub's (HF_TOKEN, or `hf auth login`); prefopt never stores one.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("prefopt")


def is_local(target: str) -> bool:
    """A folder, spelled as one: an absolute path, ./ or ../, or file:// (a bare 'name' is a Hub id,
    even where a folder of that name exists, as the output_dir of the run often does)."""
    return target.startswith(("/", "./", "../", "file://"))


def push_folder(folder: Path, target: str, *, private: bool | None = None, revision: str | None = None,
                commit_message: str = "End of training") -> str:
    """Upload ``folder`` to the repository ``target`` ('org/name', created when missing) and
    return the commit URL; a local ``target`` receives a copy and its path is returned."""
    if is_local(target):
        dest = Path(target.removeprefix("file://"))
        if revision:
            dest = dest / revision
        shutil.copytree(folder, dest, dirs_exist_ok=True)
        log.info("pushed %s to %s", folder, dest)
        return str(dest)
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(target, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo.repo_id, revision=revision,
                             commit_message=commit_message)
    url = getattr(info, "commit_url", None) or str(info)
    log.info("pushed %s to %s (%s)", folder, repo.repo_id, url)
    return url
