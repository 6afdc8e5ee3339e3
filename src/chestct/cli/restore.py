"""The way back from an experiment: `python -m chestct.cli.restore [REV]` (default HEAD).

`git checkout HEAD -- params.yaml dvc.lock && dvc checkout` deletes every output that differs
from the lock and then puts back what DVC's cache holds; an output the lock records but this
clone never computed (a dvc.lock committed from another machine, nothing pulled) is deleted and
not restored. This checks the cache first. When it holds every output REV's dvc.lock records,
it restores REV's params.yaml, dvc.lock and git-tracked metrics/plots (the `cache: false`
outputs) and runs `dvc checkout`. Otherwise it changes nothing, names the outputs that are not
in the cache and says what to run; `--repro` then does that: restores what it can and lets
`dvc repro` recompute the rest.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from chestct.settings import find_root

# Files of REV that the way back restores from git, when REV has them (reports: the metrics and
# plots tables, git-tracked because they are `cache: false` outputs).
GIT_PATHS = ("params.yaml", "dvc.lock", "reports")


class RestoreError(RuntimeError):
    """The way back cannot restore everything; the message says what and what to run."""


@dataclass(frozen=True)
class Missing:
    stage: str
    path: str


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def lock_at(root: Path, rev: str) -> dict:
    """dvc.lock as committed in `rev`."""
    shown = _git(root, "show", f"{rev}:dvc.lock")
    if shown.returncode != 0:
        raise RestoreError(
            f"{rev} has no dvc.lock ({shown.stderr.strip()}); name a commit that has one"
        )
    return yaml.safe_load(shown.stdout) or {}


def cache_dir(root: Path) -> Path:
    """DVC's local cache folder (`dvc cache dir`)."""
    done = subprocess.run(["dvc", "cache", "dir"], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        raise RestoreError(f"`dvc cache dir` failed: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def _object(cache: Path, md5: str) -> Path:
    return cache / "files" / "md5" / md5[:2] / md5[2:]


def in_cache(cache: Path, md5: str) -> bool:
    """True when the object `md5` (a file, or a folder `*.dir` with every file in it) is cached."""
    listing = _object(cache, md5)
    if not listing.is_file():
        return False
    if not md5.endswith(".dir"):
        return True
    entries = json.loads(listing.read_text(encoding="utf-8"))
    return all(_object(cache, e["md5"]).is_file() for e in entries)


def uncached_outputs(root: Path, lock: dict, git_tracked: set[str]) -> list[Missing]:
    """The outputs `lock` records that DVC's cache cannot bring back (git-tracked ones aside)."""
    cache = cache_dir(root)
    missing = []
    for stage, entry in (lock.get("stages") or {}).items():
        for out in entry.get("outs") or []:
            if out["path"] in git_tracked:
                continue  # a `cache: false` metric or plot: git restores it
            md5 = out.get("md5")
            if not md5 or not in_cache(cache, md5):
                missing.append(Missing(stage, out["path"]))
    return missing


def tracked_paths(root: Path, rev: str, paths: tuple[str, ...]) -> list[str]:
    """The `paths` that exist in `rev`, and every file under them."""
    listed = _git(root, "ls-tree", "-r", "--name-only", rev, "--", *paths)
    return [line for line in listed.stdout.splitlines() if line]


def restore(root: Path, rev: str = "HEAD", repro: bool = False) -> str:
    """Restore `rev`'s params, lock and outputs; see the module docstring. Returns a summary.

    Raises:
        RestoreError: some output is not in the cache and `repro` is False (nothing changed).
    """
    lock = lock_at(root, rev)
    files = tracked_paths(root, rev, GIT_PATHS)
    missing = uncached_outputs(root, lock, set(files))
    stages = list(lock.get("stages") or {})
    if missing and not repro:
        names = ", ".join(f"{m.path} ({m.stage})" for m in missing)
        cached = [s for s in stages if s not in {m.stage for m in missing}]
        raise RestoreError(
            f"DVC's cache lacks what {rev}'s dvc.lock records for {names} (made on another "
            "machine or never pulled). Nothing was changed. Bring them with `dvc pull` from a "
            f"DVC remote, or run `python -m chestct.cli.restore --repro {rev}`: it restores "
            f"params, lock and the cached outputs ({', '.join(cached) or 'none'}) and recomputes "
            "the rest with `dvc repro`"
        )
    checkout = _git(root, "checkout", rev, "--", *files)
    if checkout.returncode != 0:
        raise RestoreError(f"git checkout {rev} failed: {checkout.stderr.strip()}")
    targets = [s for s in stages if s not in {m.stage for m in missing}]
    if targets:
        done = subprocess.run(["dvc", "checkout", *targets], cwd=root, text=True)
        if done.returncode != 0:
            raise RestoreError("`dvc checkout` failed; its message is above")
    if missing:
        done = subprocess.run(["dvc", "repro"], cwd=root, text=True)
        if done.returncode != 0:
            raise RestoreError("`dvc repro` failed; its message is above")
        return f"restored {rev} from the cache and recomputed {len(missing)} output(s)"
    return f"restored {rev}: params.yaml, dvc.lock and every output, from DVC's cache"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Go back to a commit's params, dvc.lock and outputs, never deleting an "
        "output DVC's cache cannot restore."
    )
    parser.add_argument("rev", nargs="?", default="HEAD", help="a git commit (default HEAD)")
    parser.add_argument(
        "--repro",
        action="store_true",
        help="when the cache lacks some outputs: restore the rest and recompute them",
    )
    args = parser.parse_args(argv)
    try:
        print(f"chestct restore: {restore(find_root(), args.rev, args.repro)}")
    except RestoreError as exc:
        print(f"chestct restore: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
