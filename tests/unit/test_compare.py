"""`python -m chestct.cli.compare A B` on a throwaway sqlite MLflow store with two pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two pipelines (train -> evaluate -> promote), registered as versions 1 and 2."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("chestct", artifact_location=str(folder / "art"))
    client.create_registered_model("chestct")
    ids: dict[str, dict[str, str]] = {}
    for n, (lr, f1, exp) in enumerate([(0.001, 0.70, "exp-a"), (0.0003, 0.76, "exp-b")], 1):
        common = {"dvc.exp_name": exp, "git.sha": f"{n}" * 40}
        train = client.create_run(experiment, tags={**common, "chestct.stage": "train"})
        client.log_param(train.info.run_id, "train.learning_rate", str(lr))
        client.log_param(train.info.run_id, "base.seed", "42")
        client.log_metric(train.info.run_id, "best_val_loss", 1.0 - f1)
        evaluate = client.create_run(
            experiment,
            tags={**common, "chestct.stage": "evaluate", "chestct.run.train": train.info.run_id},
        )
        client.log_metric(evaluate.info.run_id, "macro_f1", f1)
        client.log_metric(evaluate.info.run_id, "baseline.nearest_neighbour.macro_f1", 0.72)
        client.log_metric(evaluate.info.run_id, "baseline.model_above.macro_f1", f1 - 0.72)
        client.log_param(evaluate.info.run_id, "evaluate.batch_size", "64")
        links = {
            "chestct.run.train": train.info.run_id,
            "chestct.run.evaluate": evaluate.info.run_id,
        }
        promote = client.create_run(
            experiment,
            tags={**common, **links, "chestct.stage": "promote", "chestct.decision": "promoted"},
        )
        client.log_metric(promote.info.run_id, "promoted", 1)
        version = client.create_model_version(
            "chestct", str(folder / f"m{n}"), run_id=promote.info.run_id
        )
        client.set_registered_model_alias("chestct", "champion", version.version)
        ids[exp] = {
            "train": train.info.run_id,
            "evaluate": evaluate.info.run_id,
            "promote": promote.info.run_id,
            "version": str(version.version),
        }
    client.set_registered_model_alias("chestct", "challenger", ids["exp-a"]["version"])
    return {"uri": uri, "client": client, "ids": ids}


def test_a_version_leads_to_the_params_and_metrics_of_every_stage(store) -> None:
    from chestct.cli.compare import resolve

    side = resolve(store["client"], "1", "chestct")
    assert side.run_id == store["ids"]["exp-a"]["promote"]
    assert side.info["version"] == "1" and side.info["dvc exp"] == "exp-a"
    assert side.params["train.learning_rate"] == "0.001"
    assert side.metrics["evaluate.macro_f1"] == pytest.approx(0.70)
    assert side.metrics["train.best_val_loss"] == pytest.approx(0.30)
    assert side.metrics["promote.promoted"] == 1


def test_aliases_and_run_ids_resolve(store) -> None:
    from chestct.cli.compare import resolve

    assert resolve(store["client"], "champion", "chestct").info["version"] == "2"
    assert resolve(store["client"], "challenger", "chestct").info["version"] == "1"
    run = resolve(store["client"], store["ids"]["exp-b"]["evaluate"], "chestct")
    assert run.metrics["evaluate.macro_f1"] == pytest.approx(0.76)
    assert run.params["train.learning_rate"] == "0.0003"  # reached through the train tag


def test_table_shows_both_sides_and_the_deltas(store) -> None:
    from chestct.cli.compare import render, resolve, rows

    a = resolve(store["client"], "1", "chestct")
    b = resolve(store["client"], "champion", "chestct")
    table = {(section, key): (va, vb, delta) for section, key, va, vb, delta in rows(a, b)}
    assert table[("metric", "evaluate.macro_f1")] == ("0.7", "0.76", "+0.06")
    assert table[("param", "train.learning_rate")] == ("0.001", "0.0003", "-0.0007")
    assert table[("param", "base.seed")] == ("42", "42", "")
    assert table[("model", "dvc exp")][:2] == ("exp-a", "exp-b")
    # Each model against the memorizer, before the params: A below it, B above.
    assert table[("memorizer", "baseline.nearest_neighbour.macro_f1")] == ("0.72", "0.72", "+0")
    above = table[("memorizer", "baseline.model_above.macro_f1")]
    assert (float(above[0]), float(above[1])) == pytest.approx((-0.02, 0.04))
    sections = [section for section, *_ in rows(a, b)]
    assert sections.index("memorizer") < sections.index("param")

    changed = {key for _, key, *_ in rows(a, b, changed_only=True)}
    assert "train.learning_rate" in changed and "base.seed" not in changed
    text = render(rows(a, b), "1", "champion")
    header = text.splitlines()[0]
    assert "A: 1" in header and "B: champion" in header and "B − A" in header
    assert any(line.startswith("metric") and "+0.06" in line for line in text.splitlines())


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("9", "version 9 of model 'chestct' not found"),
        ("f" * 32, "run " + "f" * 32 + " not found"),
        ("latest", "neither a run id"),
    ],
)
def test_unknown_references_are_clear_errors(store, ref: str, message: str) -> None:
    from chestct.cli.compare import CompareError, resolve

    with pytest.raises(CompareError, match=message):
        resolve(store["client"], ref, "chestct")


def test_main_prints_the_table_or_a_one_line_error(
    store, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from chestct.cli.compare import main

    monkeypatch.setenv("CHESTCT_ROOT", str(REPO))  # params.yaml and config.yaml, read only
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert main(["challenger", "champion", "--changed"]) == 0
    out = capsys.readouterr().out
    assert "evaluate.macro_f1" in out and "+0.06" in out

    assert main(["1", "nonsense"]) == 1
    assert "neither a run id" in capsys.readouterr().err
