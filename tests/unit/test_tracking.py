"""An unreachable MLflow server is reported when a stage starts, promptly and without side
effects: the stage's previous outputs stay where they are."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from chestct.tracking import TrackingError, check_store

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A server on 127.0.0.1 that accepts connections and never answers (a hung tracker)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def closed_port_uri() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens there once the probe is closed


def test_a_server_that_never_answers_is_reported_after_the_timeout(silent_server: str) -> None:
    with pytest.raises(TrackingError, match=r"unreachable.*timed out") as err:
        check_store(silent_server, timeout_s=0.5)
    assert "MLFLOW_TRACKING_URI" in str(err.value)  # says how to fix it


def test_a_refused_connection_is_reported() -> None:
    with pytest.raises(TrackingError, match="unreachable"):
        check_store(closed_port_uri(), timeout_s=0.5)


def test_stage_start_fails_before_emptying_the_stage_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chestct.runner import stage_session

    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n", encoding="utf-8")
    previous = tmp_path / "artifacts" / "evaluate" / "metrics.json"
    previous.parent.mkdir(parents=True)
    previous.write_text("{}", encoding="utf-8")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", closed_port_uri())

    with pytest.raises(TrackingError, match="unreachable"), stage_session("evaluate", tmp_path):
        pytest.fail("the stage body must not run")
    assert previous.read_text(encoding="utf-8") == "{}"
