"""A promoted model in the MLflow registry: logged, registered under an alias, described and
tagged with what it was trained on and its headline test figures, and linked to the runs of
every stage behind it (chestct.cli.compare follows those tags).

Every model family registers here: a CNN as a TensorFlow model (pinned requirements), a
texture or ensemble model as its files, registered by their artifact URI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from chestct.model.families import family_of, read_ensemble
from chestct.pointers import PointerError, read_pointer

# The figures a registered version carries as tags (metric.<name>) and in its description.
HEADLINE_METRICS = ("macro_f1", "robust_macro_f1", "balanced_accuracy", "ece_calibrated")


def version_facts(paths: Any, metrics: dict[str, Any]) -> tuple[str, dict[str, str]]:
    """A registered version's description and tags: what data it was trained on (synthetic or
    real, and the source), the model family and the headline test metrics."""
    try:
        source = str(read_pointer(paths, "ingest", verify=False).params["ingest"]["source"])
    except (PointerError, KeyError, TypeError):
        source = "unknown"
    try:
        family = str(
            read_pointer(paths, "base-model", verify=False).params["base_model"]["architecture"]
        )
    except (PointerError, KeyError, TypeError):
        family = "unknown"
    kind = "synthetic" if source == "synthetic" else "unknown" if source == "unknown" else "real"
    tags = {
        "chestct.data_source": kind,
        "chestct.ingest_source": source[:250],
        "chestct.family": family,
    }
    figures = []
    for key in HEADLINE_METRICS:
        value = metrics.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            tags[f"metric.{key}"] = f"{value:.4f}"
            figures.append(f"{key} {value:.4f}")
    description = (
        f"{family} trained on {kind} data (ingest.source: {source}). "
        f"Test split: {', '.join(figures) or 'no metrics'}."
    )
    return description, tags


def register_model(
    model_path: Path,
    name: str,
    alias: str,
    description: str = "",
    facts: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Log the Keras model to the active run, register it with `description` and the tags
    `facts`, and point `alias` at it."""
    import mlflow
    from mlflow import MlflowClient

    from chestct.model.modeling import load_model as load_keras

    client = MlflowClient()
    if family_of(model_path) == "cnn":
        info = mlflow.tensorflow.log_model(
            load_keras(model_path),
            name="model",
            registered_model_name=name,
            # Inferring requirements runs pip for ~20 s; the pins are known.
            pip_requirements=[
                f"tensorflow-cpu=={_version('tensorflow-cpu')}",
                f"keras=={_version('keras')}",
            ],
        )
        version, model_uri = str(info.registered_model_version), info.model_uri
    else:
        # texture / ensemble: the model's files as run artifacts, registered by their URI.
        for member in _family_files(model_path):
            mlflow.log_artifact(str(member), "model")
        run = mlflow.active_run()
        model_uri = f"runs:/{run.info.run_id}/model" if run else str(model_path.parent)
        with contextlib.suppress(mlflow.exceptions.MlflowException):  # registered before
            client.create_registered_model(name)
        created = client.create_model_version(
            name,
            f"{run.info.artifact_uri}/model" if run else model_uri,
            run_id=run.info.run_id if run else None,
        )
        version = str(created.version)
    client.set_registered_model_alias(name, alias, version)
    if description:
        client.update_model_version(name, version, description=description)
    for key, value in (facts or {}).items():
        client.set_model_version_tag(name, version, key, value)
    active = mlflow.active_run()
    if active is not None:
        run = client.get_run(active.info.run_id)
        # compare.py follows these tags from a version to the runs of every stage behind it.
        for key, value in run.data.tags.items():
            if key.startswith("chestct.run.") or key in ("git.sha", "dvc.exp_name"):
                client.set_model_version_tag(name, version, key, value)
        client.set_model_version_tag(name, version, "chestct.run.promote", run.info.run_id)
    return {"name": name, "version": version, "alias": alias, "model_uri": model_uri}


def _family_files(model_path: Path) -> list[Path]:
    """The files that make a texture or ensemble model (the ensemble: its members too)."""
    if family_of(model_path) != "ensemble":
        return [model_path]
    members = read_ensemble(model_path)["members"]
    return [model_path, *(model_path.parent / m["file"] for m in members.values())]


def _version(pkg: str) -> str:
    from importlib import metadata

    return metadata.version(pkg)
