"""A promotion a shortcut cannot win.

The synthetic default with its acquisition shortcut on (`zoom`: large-cell slices drawn zoomed
out, in every split alike) trains a model that exploits it; the same recipe on the same
patients without the shortcut trains one that cannot. On the shortcut's own test split the
first scores the higher clean macro-F1, so plain macro_f1 would promote it; the shift stress
takes its cue away (every class zoomed out), so the default robust_macro_f1 promotes the other.
Real training, evaluation and promotion (export included), on 48 px images: minutes, hence slow.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from chestct.imaging.preparation import Preprocessing
from chestct.settings import BaseModelParams, EvaluateParams, PromoteParams, TrainParams
from helpers import synthetic_splits
from shipped import shipped

pytestmark = pytest.mark.slow

SIZE = 48
COUNTS = {"train": 40, "valid": 10, "test": 13}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from chestct.stages.base_model import run_base_model
    from chestct.stages.evaluate import run_evaluate
    from chestct.stages.train import run_train

    root = tmp_path_factory.mktemp("shortcut")
    with_shortcut = synthetic_splits(root, SIZE, COUNTS, shortcut="zoom")
    without = synthetic_splits(root, SIZE, COUNTS)
    base = run_base_model(shipped(BaseModelParams, filters=[8, 16, 32]), SIZE, 0, root / "base")
    params = shipped(TrainParams, epochs=12, batch_size=16, patience=12)
    out: dict[str, Any] = {"root": root, "splits": with_shortcut}
    for name, data in (("shortcut", with_shortcut), ("robust", without)):
        trained = run_train(base, data["train"], data["valid"], params, seed=0, root=root)
        path = root / f"{name}.keras"
        trained.model.save(path)
        # Both are evaluated as the pipeline would: on the data with the shortcut.
        ev = run_evaluate(path, with_shortcut, shipped(EvaluateParams, batch_size=32), root)
        ood = root / f"{name}-ood.npz"
        np.savez(ood, mean=ev.ood.mean, precision=ev.ood.precision)
        out[name] = {"path": path, "evaluation": ev, "ood": ood}
    return out


def candidate(world: dict[str, Any], name: str, digest: str):
    from chestct.promotion import Candidate

    ev = world[name]["evaluation"]
    return Candidate(
        model_path=world[name]["path"],
        metrics=ev.metrics,
        calibration=ev.calibration,
        ood_path=world[name]["ood"],
        data_digest=digest,
    )


def promote(world: dict[str, Any], cand, model_dir: Path, metric: str):
    from chestct.stages.promote import run_promote

    return run_promote(
        cand,
        world["splits"]["test"],
        # Only the selection metric decides here: on 40 slices a class, 48 px, the shortcut
        # model is below the nearest-neighbour memorizer, a rule tests/stages/test_promote.py
        # covers.
        shipped(PromoteParams, metric=metric, minimum=0.0, beat_memorizer=False),
        model_dir=model_dir,
        root=world["root"],
        batch_size=32,
        preprocessing=Preprocessing(SIZE),
        work_dir=model_dir.parent / "work",
        register=lambda path, alias: {"name": "chestct", "version": path.stem, "alias": alias},
    )


def test_the_shortcut_model_wins_clean_and_loses_under_shift(world) -> None:
    short = world["shortcut"]["evaluation"].metrics
    robust = world["robust"]["evaluation"].metrics
    assert short["macro_f1"] > robust["macro_f1"]
    # The cue gone (every class zoomed out), the shortcut model calls everything large cell.
    assert short["shift"]["worst_shift"] in ("zoom_60", "zoom_80")
    assert short["shift"]["worst_macro_f1"] < robust["shift"]["worst_macro_f1"]
    assert robust["robust_macro_f1"] > short["robust_macro_f1"]


def test_promote_picks_the_robust_model_under_the_default_metric_only(world, tmp_path) -> None:
    model_dir = tmp_path / "default" / "model"
    first = promote(world, candidate(world, "shortcut", "d1"), model_dir, "robust_macro_f1")
    assert first.decision.promote  # the first model only needs the minimum
    plain_dir = tmp_path / "plain" / "model"
    shutil.copytree(model_dir, plain_dir)

    # The test data changed since the champion's card was written: promote re-scores it,
    # shift stress included, and lands on the figure evaluate measured.
    default = shipped(PromoteParams).metric
    robust = promote(world, candidate(world, "robust", "d2"), model_dir, default)
    assert robust.decision.champion_rescored
    assert robust.decision.champion == pytest.approx(
        world["shortcut"]["evaluation"].metrics["robust_macro_f1"], abs=1e-6
    )
    assert robust.decision.promote, robust.decision.reason
    assert (model_dir / "model.keras").read_bytes() == world["robust"]["path"].read_bytes()

    plain = promote(world, candidate(world, "robust", "d2"), plain_dir, "macro_f1")
    assert not plain.decision.promote, plain.decision.reason
    assert (plain_dir / "model.keras").read_bytes() == world["shortcut"]["path"].read_bytes()
