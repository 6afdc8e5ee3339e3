"""Where this process stands in a multi-worker training cluster (train.strategy: multi_worker).

TensorFlow reads the cluster from the TF_CONFIG environment variable; chestct reads the same
variable to decide which process writes the stage's outputs. No TensorFlow here: the parsing is
checked before TensorFlow starts, and tests use it without importing TensorFlow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from chestct.settings import SettingsError


@dataclass(frozen=True)
class WorkerRole:
    """This process's place in a multi-worker cluster, from TF_CONFIG."""

    task_type: str
    index: int
    workers: int  # processes that train (chief included)
    has_chief: bool = False  # the cluster names a `chief` task

    @property
    def chief(self) -> bool:
        """The chief writes the model, the pointer and the MLflow run; the others only train.

        TensorFlow's rule: the `chief` task if the cluster names one, else worker 0.
        """
        if self.has_chief:
            return self.task_type == "chief"
        return self.task_type == "worker" and self.index == 0


def worker_role(strategy: str, tf_config: str | None = None) -> WorkerRole:
    """Parse TF_CONFIG (TensorFlow's format) for `train.strategy`; a single process when the
    strategy is not multi_worker or TF_CONFIG is unset.

    Raises:
        SettingsError: TF_CONFIG is not valid JSON or lacks the cluster or task.
    """
    raw = os.environ.get("TF_CONFIG") if tf_config is None else tf_config
    if strategy != "multi_worker" or not raw:
        return WorkerRole("chief", 0, 1, has_chief=True)
    example = (
        'e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
        '"task": {"type": "worker", "index": 0}}'
    )
    try:
        config = json.loads(raw)
        cluster, task = config["cluster"], config["task"]
        task_type, index = str(task["type"]), int(task["index"])
        members = {role: list(hosts) for role, hosts in cluster.items()}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SettingsError(
            f"TF_CONFIG is not a TensorFlow cluster description ({exc!r}); {example}"
        ) from None
    if task_type not in members or not 0 <= index < len(members[task_type]):
        sizes = ", ".join(f"{len(hosts)} {role}" for role, hosts in members.items())
        raise SettingsError(
            f"TF_CONFIG task {task_type}:{index} is not in its cluster ({sizes}); {example}"
        )
    workers = len(members.get("chief", [])) + len(members.get("worker", []))
    return WorkerRole(task_type, index, workers, has_chief="chief" in members)
