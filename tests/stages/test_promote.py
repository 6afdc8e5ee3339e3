"""promote's run_promote(): the champion is replaced only by a better candidate, with the light
artifact, CAM head, OOD statistics and a card that serving can rely on (MLflow replaced by a
recorder of registrations)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
import pytest

from chestct.data.manifest import DATASET_COLUMNS
from chestct.evaluation.selection import decide
from chestct.fsutil import sha256_file
from chestct.imaging.preparation import Preprocessing
from chestct.labels import CLASSES
from chestct.promotion import read_card
from chestct.settings import (
    BaseModelParams,
    PromoteParams,
)
from helpers import (
    IMAGE_SIZE,
    tiny_split,
)
from model_folder import install_model
from shipped import shipped

SIZE = 32
PREPROCESSING = Preprocessing(SIZE, window=(-600.0, 1500.0))


class Registry:
    """Stands in for MLflow: numbers versions and remembers aliases."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, str]] = []

    def __call__(self, path: Path, alias: str) -> dict[str, Any]:
        self.calls.append((path, alias))
        return {"name": "chestct", "version": str(len(self.calls)), "alias": alias}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two untrained models, a test split and evaluate-like outputs."""
    from chestct.model.modeling import build_model

    root = tmp_path_factory.mktemp("promote")
    rows = []
    for c, label in enumerate(CLASSES):
        for i in range(2):
            rel = f"test/{label}/{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img = np.random.default_rng(10 * c + i).integers(0, 255, (SIZE, SIZE))
            assert cv2.imwrite(str(root / rel), img.astype(np.uint8))
            rows.append(
                {"path": rel, "label": label, "sha256": rel, "source_path": rel, "original": ""}
            )
    test = pd.DataFrame(rows, columns=list(DATASET_COLUMNS))
    models = {}
    for seed in (0, 1):
        models[seed] = root / f"model{seed}.keras"
        build_model(shipped(BaseModelParams, filters=[4, 8]), SIZE, seed=seed).save(models[seed])
    ood = root / "ood.npz"
    np.savez(ood, mean=np.zeros(8), precision=np.eye(8))
    return {"root": root, "test": test, "models": models, "ood": ood}


def candidate(world: dict[str, Any], seed: int, macro_f1: float, digest: str = "d1"):
    from chestct.promotion import Candidate

    return Candidate(
        model_path=world["models"][seed],
        metrics={"macro_f1": macro_f1, "accuracy": macro_f1},
        calibration={
            "temperature": 1.5,
            "temperature_reason": "fitted",
            "abstain_entropy": 0.8,
            "abstain_rule": "rule",
            "ood_threshold": 12.5,
            "ood_rule": "rule",
        },
        ood_path=world["ood"],
        data_digest=digest,
    )


def promote(world: dict[str, Any], cand, model_dir: Path, registry: Registry, **params):
    from chestct.stages.promote import run_promote

    return run_promote(
        cand,
        world["test"],
        shipped(PromoteParams, **{"minimum": 0.5, "metric": "macro_f1", **params}),
        model_dir=model_dir,
        root=world["root"],
        batch_size=4,
        preprocessing=PREPROCESSING,
        work_dir=model_dir.parent / "work",
        register=registry,
        run_ids={"train": "t" * 32},
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def champion(world, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, Registry]:
    """model/ after promoting the first candidate (macro-F1 0.8)."""
    model_dir = tmp_path_factory.mktemp("champion") / "model"
    registry = Registry()
    result = promote(world, candidate(world, 0, 0.8), model_dir, registry)
    return model_dir, result, registry


def test_first_candidate_is_promoted_with_the_serving_contract(champion, world) -> None:
    from chestct.model.export import PARITY_TOLERANCE, LightModel
    from chestct.model.gradcam import CamHead

    model_dir, result, registry = champion
    assert result.decision.promote
    assert registry.calls == [(world["models"][0], "champion")]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "cam_head.npz",
        "model.json",
        "model.keras",
        "model.tflite",
        "ood.npz",
        "promotion.json",
    ]
    card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    assert card == result.card
    assert card["classes"] == list(CLASSES)
    assert Preprocessing.from_card(card) == PREPROCESSING
    assert card["image_size"] == SIZE
    assert card["preprocessing"]["window"] == {"level": -600.0, "width": 1500.0}
    assert card["temperature"] == 1.5
    assert card["thresholds"]["abstain_entropy"] == 0.8
    assert card["ood"] == {
        "method": "mahalanobis_gap",
        "file": "ood.npz",
        "threshold": 12.5,
        "rule": "rule",
        "sha256": sha256_file(model_dir / "ood.npz"),
    }
    for key in ("inference", "cam"):  # every file the card names carries its digest
        assert card[key]["sha256"] == sha256_file(model_dir / card[key]["file"])
    assert card["cam"]["file"] == "cam_head.npz"
    inference = card["inference"]
    assert inference["file"] == "model.tflite" and inference["runtime"] == "litert"
    assert set(inference["outputs"]) >= {"probabilities", "features"}
    assert 0 <= inference["parity_max_abs_diff"] <= PARITY_TOLERANCE
    assert inference["parity_images"] == len(world["test"])
    assert card["metrics"]["macro_f1"] == 0.8 and card["data_digest"] == "d1"
    # What is run-specific is beside the card, not in it (DVC hashes model.json).
    assert not {"version", "mlflow_run_ids", "git_sha", "promoted_at", "registered"} & set(card)
    promotion = json.loads((model_dir / "promotion.json").read_text(encoding="utf-8"))
    assert promotion == result.promotion
    assert promotion["version"] == "1" and promotion["mlflow_run_ids"] == {"train": "t" * 32}
    assert promotion["registered"]["alias"] == "champion" and promotion["promoted_at"]

    light = LightModel.load(model_dir / "model.tflite")
    out = light.run(np.zeros((1, SIZE, SIZE, 1), np.float32))
    heat = CamHead.load(model_dir / "cam_head.npz").cam(out["features"][0], 0)
    assert heat.shape == out["features"].shape[1:3]


def test_the_monitoring_reference_is_copied_and_recorded_in_the_card(
    world, tmp_path: Path
) -> None:
    from dataclasses import replace

    from chestct.fsutil import sha256_file

    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps({"profile_version": 1, "n": 3}), encoding="utf-8")
    cand = replace(candidate(world, 0, 0.8), reference_path=reference)
    model_dir = tmp_path / "model"
    result = promote(world, cand, model_dir, Registry())
    assert result.decision.promote
    assert (model_dir / "reference.json").read_bytes() == reference.read_bytes()
    entry = result.card["monitoring"]
    assert entry["file"] == "reference.json"
    assert entry["sha256"] == sha256_file(model_dir / "reference.json")


@pytest.mark.parametrize(("score", "margin"), [(0.79, 0.0), (0.6, 0.0), (0.82, 0.05)])
def test_a_worse_candidate_never_replaces_the_champion(
    champion, world, tmp_path: Path, score: float, margin: float
) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    before = snapshot(model_dir)
    registry = Registry()

    result = promote(world, candidate(world, 1, score), model_dir, registry, margin=margin)

    assert not result.decision.promote
    assert result.card is None
    assert "rejected" in result.decision.reason
    assert registry.calls == [(world["models"][1], "challenger")]
    assert snapshot(model_dir) == before  # byte for byte
    assert not (model_dir.parent / "work" / "model.tflite").exists()  # nothing exported


def test_a_better_candidate_replaces_the_champion(champion, world, tmp_path: Path) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    result = promote(world, candidate(world, 1, 0.9), model_dir, Registry())
    assert result.decision.promote
    assert (model_dir / "model.keras").read_bytes() == world["models"][1].read_bytes()
    card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    assert card["metrics"]["macro_f1"] == 0.9
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".model")]
    assert leftovers == []


def test_champion_is_rescored_when_the_test_data_changed(champion, world, tmp_path) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    before = snapshot(model_dir)
    # The card says 0.8, but on the new test data the untrained champion scores far lower;
    # a candidate at 0.7 must be judged against the re-scored figure, not the card's.
    result = promote(world, candidate(world, 1, 0.7, digest="d2"), model_dir, Registry())
    decision = result.decision
    assert decision.champion_rescored
    assert decision.champion is not None and decision.champion < 0.7
    assert decision.promote
    assert snapshot(model_dir) != before


def test_same_test_data_uses_the_champions_card(champion, world, tmp_path: Path) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    result = promote(world, candidate(world, 1, 0.7, digest="d1"), model_dir, Registry())
    assert not result.decision.champion_rescored
    assert result.decision.champion == 0.8


def robust_world(champion, world, tmp_path: Path, champion_set: str | None):
    """A copy of the champion whose card says robust_macro_f1 0.8 measured on the stress set
    `champion_set` (None: a card from before the stress-set identity)."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    card_path = model_dir / "model.json"
    card = json.loads(card_path.read_text(encoding="utf-8"))
    card["metrics"]["robust_macro_f1"] = 0.8
    card.pop("stress_set", None)
    if champion_set is not None:
        card["stress_set"] = {"digest": champion_set, "shifts": ["zoom_80"], "items": 8}
    card_path.write_text(json.dumps(card), encoding="utf-8")
    return model_dir


def robust_candidate(world, stress: str):
    import dataclasses

    cand = candidate(world, 1, 0.7)
    metrics = {**cand.metrics, "robust_macro_f1": 0.7}
    return dataclasses.replace(cand, metrics=metrics, stress_set={"digest": stress, "items": 8})


@pytest.mark.parametrize("champion_set", ["old", None])
def test_a_changed_stress_set_rescores_the_champion(
    champion, world, tmp_path: Path, champion_set: str | None
) -> None:
    # Same test data, but the champion's robust score was measured on another stress set (or
    # its card does not say on which): it is scored again on the candidate's, not compared
    # as it stands (0.8 on the card against the candidate's 0.7 would keep it).
    model_dir = robust_world(champion, world, tmp_path, champion_set)
    result = promote(
        world, robust_candidate(world, "new"), model_dir, Registry(), metric="robust_macro_f1"
    )
    decision = result.decision
    assert decision.champion_rescored
    assert decision.champion is not None and decision.champion < 0.7
    assert decision.promote
    assert result.card["stress_set"] == {"digest": "new", "items": 8}


def test_the_same_stress_set_uses_the_champions_card(champion, world, tmp_path: Path) -> None:
    model_dir = robust_world(champion, world, tmp_path, "same")
    result = promote(
        world, robust_candidate(world, "same"), model_dir, Registry(), metric="robust_macro_f1"
    )
    assert not result.decision.champion_rescored
    assert result.decision.champion == 0.8 and not result.decision.promote


def test_stale_champion_names_why_the_card_cannot_be_used(world) -> None:
    from chestct.evaluation.selection import stale_champion

    cand = robust_candidate(world, "a")
    here = (cand.data_digest, cand.stress_set)
    metrics = {"macro_f1": 0.8, "robust_macro_f1": 0.8, "shift": {"zoom_80": {"macro_f1": 0.6}}}
    card = {"data_digest": "d1", "metrics": metrics}
    with_set = {**card, "stress_set": {"digest": "a"}}
    assert stale_champion(with_set, *here, "robust_macro_f1") is None
    assert "stress set" in stale_champion(
        {**card, "stress_set": {"digest": "b"}}, *here, "robust_macro_f1"
    )
    assert "stress set" in stale_champion(card, *here, "shift.zoom_80.macro_f1")
    # A clean metric does not read the stress set: an old card is compared as it stands.
    assert stale_champion(card, *here, "macro_f1") is None
    assert "test data" in stale_champion({**with_set, "data_digest": "d0"}, *here, "macro_f1")
    assert "balanced_accuracy is not among" in stale_champion(with_set, *here, "balanced_accuracy")


def test_a_tie_keeps_the_champion_and_registers_nothing(champion, world, tmp_path: Path) -> None:
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    before = snapshot(model_dir)
    registry = Registry()

    # The champion's own model and score again: what rerunning an unchanged baseline does.
    result = promote(world, candidate(world, 0, 0.8), model_dir, registry)

    assert not result.decision.promote
    assert result.decision.rule == "tie with the champion"
    assert result.decision.reason.startswith("kept the champion (tie with the champion)")
    assert result.registered == {} and registry.calls == []
    assert snapshot(model_dir) == before


def test_parity_failure_rejects_and_leaves_the_champion(
    champion, world, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from chestct.evaluation import release

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    before = snapshot(model_dir)
    # The export promote installs is chestct.evaluation.release's (evaluate scores the same).
    monkeypatch.setattr(release, "parity", lambda a, b: 0.25)
    registry = Registry()
    result = promote(world, candidate(world, 1, 0.95), model_dir, registry)
    assert not result.decision.promote
    assert "parity failed" in result.decision.reason and "0.25" in result.decision.reason
    assert result.decision.rule == "light model export failed"
    assert result.decision.reason.startswith(
        "rejected (light model export failed): candidate macro_f1 0.9500 > champion 0.8000"
    )
    assert registry.calls[-1][1] == "challenger"
    assert snapshot(model_dir) == before


def test_a_first_candidate_below_the_minimum_leaves_an_empty_model_folder(world, tmp_path) -> None:
    model_dir = tmp_path / "model"
    registry = Registry()
    result = promote(world, candidate(world, 0, 0.3), model_dir, registry)
    assert not result.decision.promote
    assert model_dir.is_dir() and list(model_dir.iterdir()) == []
    assert registry.calls[0][1] == "challenger"


def test_an_unknown_metric_is_a_clear_error(world, tmp_path: Path) -> None:
    from chestct.runner import StageFailed

    with pytest.raises(StageFailed, match=r"promote\.metric 'roc_auc' is not among"):
        promote(world, candidate(world, 0, 0.9), tmp_path / "model", Registry(), metric="roc_auc")


@pytest.mark.parametrize(("score", "promoted"), [(0.49, False), (0.5, True), (0.9, True)])
def test_decide_first_model_needs_the_minimum(score: float, promoted: bool) -> None:
    decision = decide(
        shipped(PromoteParams, metric="macro_f1", minimum=0.5), {"macro_f1": score}, None
    )
    assert decision.promote is promoted
    assert decision.champion is None
    assert decision.candidate == score
    if promoted:
        assert decision.rule == "first model"
        assert decision.reason.startswith("promoted (first model): no champion")
    else:
        assert decision.rule == "below promote.minimum"
        assert decision.reason == (
            "rejected (below promote.minimum): candidate macro_f1 0.4900 < promote.minimum 0.5"
            " (no champion)"
        )


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promoted", "rule"),
    [
        (0.60, 0.70, 0.0, False, "not better than champion + margin"),
        (0.80, 0.70, 0.0, True, "better than champion + margin"),
        (0.70, 0.70, 0.0, False, "tie with the champion"),
        (0.70, 0.70, -0.05, False, "tie with the champion"),  # a tie whatever the margin
        (0.74, 0.70, 0.05, False, "not better than champion + margin"),
        (0.76, 0.70, 0.05, True, "better than champion + margin"),
        (0.40, 0.20, 0.0, False, "below promote.minimum"),  # better, yet below the minimum
    ],
)
def test_decide_against_a_champion(
    candidate: float, champion: float, margin: float, promoted: bool, rule: str
) -> None:
    params = shipped(PromoteParams, metric="macro_f1", minimum=0.5, margin=margin)
    decision = decide(params, {"macro_f1": candidate}, {"macro_f1": champion}, True)
    assert decision.promote is promoted
    assert (decision.candidate, decision.champion) == (candidate, champion)
    assert decision.champion_rescored is True
    assert decision.rule == rule
    verdict = "promoted" if promoted else "kept the champion" if "tie" in rule else "rejected"
    assert decision.reason.startswith(f"{verdict} ({rule}): candidate macro_f1 {candidate:.4f}")


def test_decide_reason_names_the_minimum_not_the_champion() -> None:
    # The example: 0.375 beats a 0.1667 champion but is below promote.minimum.
    params = shipped(PromoteParams, metric="macro_f1", minimum=0.5)
    decision = decide(params, {"macro_f1": 0.375}, {"macro_f1": 0.1667})
    assert not decision.promote
    assert decision.reason == (
        "rejected (below promote.minimum): candidate macro_f1 0.3750 < promote.minimum 0.5"
        " (champion 0.1667)"
    )


def test_decide_uses_the_configured_metric() -> None:
    params = shipped(PromoteParams, metric="accuracy", minimum=0.0)
    candidate = {"accuracy": 0.9, "macro_f1": 0.1}
    decision = decide(params, candidate, {"accuracy": 0.8, "macro_f1": 0.9})
    assert decision.promote
    assert decision.metric == "accuracy"


def test_rescore_champion_after_image_size_changed(tmp_path: Path, base_model: Path) -> None:
    from chestct.promotion import rescore_champion

    model_dir = tmp_path / "model"
    install_model(base_model, {"image_size": IMAGE_SIZE, "model_file": "model.keras"}, model_dir)
    test = tiny_split(tmp_path, "test", 1, 0)  # 32x32 images ...
    for path in test["path"]:  # ... now made at a new base.image_size of 16
        grey = cv2.imread(str(tmp_path / path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(tmp_path / path), cv2.resize(grey, (16, 16)))
    metrics = rescore_champion(model_dir, read_card(model_dir), test, tmp_path, batch_size=4)
    assert 0.0 <= metrics["macro_f1"] <= 1.0


def staging_leftovers(model_dir: Path) -> list[str]:
    return [p.name for p in model_dir.parent.iterdir() if p.name.startswith(f".{model_dir.name}")]


def test_install_model_first_and_replacing(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    first = tmp_path / "first.keras"
    first.write_bytes(b"model one")
    install_model(first, {"version": "1", "model_file": "model.keras"}, model_dir)
    assert (model_dir / "model.keras").read_bytes() == b"model one"
    assert read_card(model_dir) == {"version": "1", "model_file": "model.keras"}
    assert staging_leftovers(model_dir) == []

    (model_dir / "stale.txt").write_text("from the old champion", encoding="utf-8")
    second = tmp_path / "second.keras"
    second.write_bytes(b"model two")
    install_model(second, {"version": "2", "model_file": "model.keras"}, model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.keras"]
    assert (model_dir / "model.keras").read_bytes() == b"model two"
    assert read_card(model_dir)["version"] == "2"
    assert staging_leftovers(model_dir) == []


def test_install_model_over_an_empty_model_folder(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()  # what a rejected first promote leaves
    assert read_card(model_dir) is None
    candidate = tmp_path / "c.keras"
    candidate.write_bytes(b"m")
    install_model(candidate, {"version": "1"}, model_dir)
    assert read_card(model_dir) == {"version": "1"}
    assert staging_leftovers(model_dir) == []


def test_install_model_failure_leaves_the_champion(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    first = tmp_path / "first.keras"
    first.write_bytes(b"model one")
    install_model(first, {"version": "1"}, model_dir)
    with pytest.raises(FileNotFoundError):
        install_model(tmp_path / "missing.keras", {"version": "2"}, model_dir)
    assert (model_dir / "model.keras").read_bytes() == b"model one"
    assert read_card(model_dir) == {"version": "1"}
    assert staging_leftovers(model_dir) == []


def test_read_card_treats_broken_cards_as_no_champion(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text("{not json", encoding="utf-8")
    (model_dir / "model.keras").write_bytes(b"m")
    assert read_card(model_dir) is None
    (model_dir / "model.json").write_text('{"model_file": "other.keras"}', encoding="utf-8")
    assert read_card(model_dir) is None  # names a file that is not there


@pytest.mark.parametrize("content", ["null", "[]", '"model"'])
def test_read_card_treats_a_non_object_card_as_no_champion(tmp_path: Path, content: str) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.json").write_text(content, encoding="utf-8")
    (model_dir / "model.keras").write_bytes(b"m")
    assert read_card(model_dir) is None


# --------------------------------------------------------------------------- memorizer, noise


def test_decide_refuses_a_candidate_below_the_memorizer() -> None:
    memorizer = {"baseline": {"nearest_neighbour": {"macro_f1": 0.8, "accuracy": 0.9}}}
    params = shipped(PromoteParams, metric="robust_macro_f1", minimum=0.5)
    below = {"robust_macro_f1": 0.75, "macro_f1": 0.7, **memorizer}
    decision = decide(params, below, None)
    assert not decision.promote and decision.rule == "below the memorizer"
    assert decision.reason == (
        "rejected (below the memorizer): candidate macro_f1 0.7000 < 0.8000 of the "
        "nearest-neighbour memorizer (the label of the most similar training slice, no "
        "learning) on the test split; promote.beat_memorizer refuses it (no champion)"
    )
    # The selection metric itself when the memorizer has it.
    by_accuracy = decide(
        shipped(PromoteParams, metric="accuracy"), {"accuracy": 0.85, **memorizer}, None
    )
    assert by_accuracy.rule == "below the memorizer" and "accuracy 0.8500 < 0.9000" in (
        by_accuracy.reason
    )
    off = shipped(PromoteParams, metric="robust_macro_f1", minimum=0.5, beat_memorizer=False)
    assert decide(off, below, None).rule == "first model"
    above = {"robust_macro_f1": 0.75, "macro_f1": 0.8, **memorizer}  # equal is not below
    assert decide(params, above, None).promote
    # Rerunning an unchanged pipeline stays a tie: nothing is registered.
    assert decide(params, below, {"robust_macro_f1": 0.75}).rule == "tie with the champion"


def _tables(
    tmp_path: Path, n: int, champion_right: float, gain: int, loss: int = 0
) -> tuple[Path, pd.DataFrame]:
    """The candidate's predictions.csv and the champion's table on n shared test images: the
    candidate gets `gain` images right that the champion gets wrong and `loss` wrong that it
    gets right, clean and under the one shift."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(CLASSES), n)
    champ = {
        c: np.where(rng.random(n) < champion_right, y, (y + 1) % len(CLASSES))
        for c in ("predicted", "predicted_blur")
    }
    cand = {c: v.copy() for c, v in champ.items()}
    for column in cand:
        wrong = np.flatnonzero(cand[column] != y)[:gain]
        right = np.flatnonzero(cand[column] == y)[-loss:] if loss else []
        cand[column][wrong] = y[wrong]
        cand[column][right] = (y[right] + 1) % len(CLASSES)
    paths = [f"test/{i}.png" for i in range(n)]

    def frame(preds: dict) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "path": paths,
                "actual": [CLASSES[i] for i in y],
                **{c: [CLASSES[i] for i in v] for c, v in preds.items()},
                "group": [f"s{i // 2}" for i in range(n)],  # pairs of near-copies
            }
        )

    path = tmp_path / "predictions.csv"
    frame(cand).to_csv(path, index=False)
    return path, frame(champ).sample(frac=1.0, random_state=1)  # another row order


@pytest.mark.parametrize(("gain", "loss", "promoted"), [(12, 9, False), (40, 0, True)])
def test_a_win_that_is_noise_is_not_a_promotion(
    tmp_path: Path, gain: int, loss: int, promoted: bool
) -> None:
    """Two models that disagree on 21 of 120 images, 12 to 9 for the candidate: a margin win
    that a paired test calls noise. 40 more right answers is a real improvement."""
    from chestct.evaluation.selection import apply_paired
    from chestct.promotion import Candidate, paired_test

    path, champion_table = _tables(tmp_path, 120, 0.6, gain, loss)
    params = shipped(PromoteParams, metric="robust_macro_f1", minimum=0.1)
    candidate = Candidate(Path("m"), {}, {}, Path("o"), "d", predictions_path=path)
    paired = paired_test(params, candidate, lambda: champion_table)
    assert paired.groups == 60  # pairs of near-copies resampled together
    assert paired.difference > 0
    margin_win = decide(params, {"robust_macro_f1": 0.7}, {"robust_macro_f1": 0.6})
    assert margin_win.rule == "better than champion + margin"
    decision = apply_paired(margin_win, params, paired)
    assert decision.promote is promoted
    assert decision.paired is not None and decision.paired["metric"] == "robust_macro_f1"
    if promoted:
        assert decision.rule == "better than champion + margin"
        assert "; paired bootstrap over 60 groups" in decision.reason
    else:
        assert decision.rule == "difference within noise (paired bootstrap)"
        assert decision.reason.startswith(
            "rejected (difference within noise (paired bootstrap)): candidate "
            "robust_macro_f1 0.7000 > champion 0.6000 + promote.margin 0.0, but the paired"
        )
        assert "the difference may be noise" in decision.reason


def test_the_paired_test_says_why_it_did_not_run(tmp_path: Path) -> None:
    from chestct.evaluation.selection import apply_paired
    from chestct.promotion import Candidate, paired_test

    path, table = _tables(tmp_path, 20, 0.6, 1)
    params = shipped(PromoteParams, metric="macro_f1", minimum=0.1)
    margin_win = decide(params, {"macro_f1": 0.7}, {"macro_f1": 0.6})
    cases = [
        (replace_params(params, paired="none"), path, "promote.paired is none"),
        (params, None, "evaluate's per-image predictions are not available"),
        (replace_params(params, metric="roc_auc"), path, "roc_auc is not recomputed"),
    ]
    for p, predictions, why in cases:
        cand = Candidate(Path("m"), {}, {}, Path("o"), "d", predictions_path=predictions)
        result = paired_test(p, cand, lambda: table)
        assert result == why or result.startswith(why)
        kept = apply_paired(margin_win, p, result)
        assert kept.promote and kept.reason.endswith(f"; paired test not run: {result}")
    # Only a margin win is ever re-examined.
    loss = decide(params, {"macro_f1": 0.5}, {"macro_f1": 0.6})
    assert apply_paired(loss, params, "x") == loss


def replace_params(params: PromoteParams, **changes: Any) -> PromoteParams:
    from dataclasses import replace

    return replace(params, **changes)


def test_run_promote_rescores_the_champion_and_refuses_a_noisy_win(
    champion, world, tmp_path: Path
) -> None:
    """The candidate claims accuracy 0.9 against the champion's 0.8, but image by image it
    differs from the champion on one of 8 test images: the paired bootstrap calls that noise."""
    import shutil

    from chestct.promotion import Candidate, rescore_champion_full

    model_dir = tmp_path / "model"
    shutil.copytree(champion[0], model_dir)
    before = snapshot(model_dir)
    card = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    _, table = rescore_champion_full(model_dir, card, world["test"], world["root"], 4)
    wrong = table.index[table["predicted"] != table["actual"]][0]
    table.loc[wrong, "predicted"] = table.loc[wrong, "actual"]
    table.to_csv(tmp_path / "predictions.csv", index=False)
    cand = Candidate(
        **{**candidate(world, 1, 0.9).__dict__, "predictions_path": tmp_path / "predictions.csv"}
    )
    registry = Registry()
    result = promote(world, cand, model_dir, registry, metric="accuracy")
    assert not result.decision.promote
    assert result.decision.rule == "difference within noise (paired bootstrap)"
    assert "paired bootstrap over 8 groups" in result.decision.reason
    assert registry.calls == [(world["models"][1], "challenger")]
    assert snapshot(model_dir) == before


def test_the_card_shows_how_far_the_model_is_above_the_memorizer(world) -> None:
    from chestct.promotion import build_card

    metrics = {
        "macro_f1": 0.9,
        "accuracy": 0.92,
        "baseline": {
            "nearest_neighbour": {"macro_f1": 0.7, "accuracy": 0.8},
            "model_above": {"macro_f1": 0.2, "accuracy": 0.12},
        },
        "near_copy_share": 0.4,
        "near_copy_similarity": 0.9,
        "novel": {
            "n": 6,
            "accuracy": 0.83,
            "balanced_accuracy": 0.8,
            "macro_f1": 0.75,
            "baseline": {
                "nearest_neighbour": {"accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.4}
            },
        },
        "ci": {"confidence": 0.95, "resamples": 1000, "groups": 9, "grouped_by": "series"},
    }
    cand = candidate(world, 0, 0.9)
    card = build_card(
        params=shipped(PromoteParams),
        preprocessing=PREPROCESSING,
        candidate=type(cand)(**{**cand.__dict__, "metrics": metrics}),
        inference={"file": "model.tflite"},
        model_sha="0" * 64,
    )
    entry = card["baseline"]
    assert entry["test"] == {"macro_f1": 0.7, "accuracy": 0.8}
    assert entry["model_above"]["macro_f1"] == 0.2
    assert entry["novel"]["model_above"]["macro_f1"] == pytest.approx(0.35)
    assert entry["novel"]["memorizer"]["accuracy"] == 0.5
    assert entry["near_copy_similarity"] == 0.9 and entry["near_copy_share"] == 0.4
    assert entry["intervals"].startswith("95% bootstrap intervals over 9 groups (series)")
    assert "no learning" in entry["method"]
    # A candidate evaluated before the memorizer existed gets no entry.
    assert "baseline" not in build_card(
        params=shipped(PromoteParams),
        preprocessing=PREPROCESSING,
        candidate=cand,
        inference={"file": "model.tflite"},
        model_sha="0" * 64,
    )
