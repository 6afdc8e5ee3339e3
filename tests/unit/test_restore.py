"""chestct.cli.restore, the way back from an experiment, on a real git + DVC repository with a
one-line stage: it restores from the cache, and never deletes what the cache cannot restore."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chestct.cli.restore import RestoreError, restore

BIN = Path(sys.executable).parent


def sh(root: Path, *cmd: str) -> str:
    env = {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        "HOME": str(root),
        "DVC_NO_ANALYTICS": "1",
    }
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A committed pipeline: params.yaml -> out.txt (cached) and reports/m.json (git)."""
    root = tmp_path
    monkeypatch.setenv("PATH", f"{BIN}:/usr/bin:/bin")
    sh(root, "git", "init", "-q")
    sh(root, "dvc", "init", "-q")
    sh(root, "dvc", "config", "core.analytics", "false")
    (root / "params.yaml").write_text("n: 1\n", encoding="utf-8")
    stage = {
        "cmd": "python -c \"import yaml; n = yaml.safe_load(open('params.yaml'))['n']; "
        "open('out.txt', 'w').write(str(n)); import os; os.makedirs('reports', exist_ok=True); "
        "open('reports/m.json', 'w').write('{\\\"n\\\": %d}' % n)\"",
        "params": ["n"],
        "outs": ["out.txt"],
        "metrics": [{"reports/m.json": {"cache": False}}],
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}), "utf-8")
    sh(root, "dvc", "repro", "-q")
    sh(root, "git", "add", "-A")
    sh(root, "git", "commit", "-qm", "baseline")
    return root


def _experiment(root: Path) -> None:
    (root / "params.yaml").write_text("n: 2\n", encoding="utf-8")
    sh(root, "dvc", "repro", "-q")
    assert (root / "out.txt").read_text() == "2"


def test_restores_params_lock_metrics_and_outputs_from_the_cache(repo: Path) -> None:
    _experiment(repo)
    assert "restored HEAD" in restore(repo)
    assert (repo / "out.txt").read_text() == "1"
    assert (repo / "reports" / "m.json").read_text() == '{"n": 1}'
    assert sh(repo, "git", "status", "--porcelain") == ""


def test_an_output_missing_from_the_cache_changes_nothing_and_says_what_to_run(
    repo: Path,
) -> None:
    _experiment(repo)
    # As in a fresh clone of a dvc.lock made elsewhere: HEAD's out.txt was never cached here
    # (the experiment's is).
    _uncache_head_output(repo)
    with pytest.raises(RestoreError) as err:
        restore(repo)
    message = str(err.value)
    assert "out.txt (make)" in message and "Nothing was changed" in message
    assert "dvc pull" in message and "python -m chestct.cli.restore --repro HEAD" in message
    assert (repo / "out.txt").read_text() == "2"  # the experiment's output is still there
    assert (repo / "params.yaml").read_text() == "n: 2\n"
    # --repro: params and lock back, the missing output recomputed.
    assert "recomputed 1 output" in restore(repo, repro=True)
    assert (repo / "out.txt").read_text() == "1"
    assert sh(repo, "git", "status", "--porcelain") == ""


def _uncache_head_output(root: Path) -> None:
    lock = yaml.safe_load(sh(root, "git", "show", "HEAD:dvc.lock"))
    md5 = lock["stages"]["make"]["outs"][0]["md5"]
    (root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()


def test_the_old_way_back_deletes_what_the_cache_cannot_restore(repo: Path) -> None:
    """The control: the README's former one-liner, in the same situation, loses the output."""
    _experiment(repo)
    _uncache_head_output(repo)
    subprocess.run(
        "git checkout HEAD -- params.yaml dvc.lock && dvc checkout",
        shell=True,
        cwd=repo,
        capture_output=True,
    )
    assert not (repo / "out.txt").exists()


def test_a_revision_without_a_lock_is_refused(repo: Path) -> None:
    with pytest.raises(RestoreError, match=r"has no dvc\.lock"):
        restore(repo, "HEAD~5")
