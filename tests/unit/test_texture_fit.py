"""chestct.model.texture_fit's bag and refit on generated slices: the bag averages its boosters,
the refit fits on train + valid only (the test split stays unseen) with the iterations and the
temperature valid chose, and a file of the one-booster format still loads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chestct.model import families, texture, texture_fit
from texture_folder import slices

SPEC = texture.ClassifierSpec(max_iter=20, max_features=0.3)


@pytest.fixture(scope="module")
def features() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name, n, seed in (("train", 48, 0), ("valid", 20, 1000), ("test", 20, 2000)):
        x, y = slices(n, seed)
        out[name] = (texture.feature_matrix(x), y)
    return out


def fit(features: dict, spec: texture.ClassifierSpec) -> texture.TextureModel:
    (xt, yt), (xv, yv) = features["train"], features["valid"]
    data = texture_fit.FeatureSplits(xt, yt, xv, yv)
    return texture.fit_texture_features(data, spec, seed=3, image_size=64)


def test_bag_averages_its_boosters(features: dict) -> None:
    bag = fit(features, texture.ClassifierSpec(**{**SPEC.__dict__, "bag": 3}))
    x = features["test"][0]
    assert len(bag.classifiers) == 3
    assert len(bag.details["iterations_per_booster"]) == 3
    each = [c.predict_proba(x) for c in bag.classifiers]
    assert not np.allclose(each[0], each[1])  # other seeds, other trees
    np.testing.assert_allclose(bag.full_probabilities(x), np.mean(each, axis=0), atol=1e-9)
    # The first booster is the one a single-booster fit with the same seed keeps.
    single = fit(features, SPEC)
    np.testing.assert_allclose(
        bag.classifiers[0].predict_proba(x), single.classifiers[0].predict_proba(x), atol=1e-12
    )


def test_refit_uses_train_and_valid_and_leaves_test_untouched(
    features: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen = fit(features, SPEC)
    seen: list[int] = []
    original = texture_fit._classifier

    def recording(spec: texture.ClassifierSpec, seed: int, max_iter: int) -> object:
        model = original(spec, seed, max_iter)
        fit_rows = model.fit

        def fit_and_count(x: np.ndarray, y: np.ndarray) -> object:
            seen.append(len(x))
            return fit_rows(x, y)

        model.fit = fit_and_count
        return model

    monkeypatch.setattr(texture_fit, "_classifier", recording)
    refitted = fit(features, texture.ClassifierSpec(**{**SPEC.__dict__, "refit": True}))
    monkeypatch.undo()
    n_train, n_valid = len(features["train"][1]), len(features["valid"][1])
    # One fit on train (choosing), then the refit on train + valid; never a row more.
    assert seen == [n_train, n_train + n_valid]
    assert refitted.details["refit_on"] == "train+valid"
    assert refitted.details["train_slices"] == n_train + n_valid
    # Valid chose the iterations and the temperature before the refit: the same as without it.
    assert refitted.classifiers[0].n_iter_ == chosen.classifiers[0].n_iter_
    assert refitted.temperature == chosen.temperature
    # The refit booster is a fit on train + valid with those iterations, nothing else.
    (xt, yt), (xv, yv) = features["train"], features["valid"]
    direct = texture_fit._classifier(SPEC, 3, chosen.classifiers[0].n_iter_).fit(
        np.concatenate([xt, xv]), np.concatenate([yt, yv])
    )
    x = features["test"][0]
    np.testing.assert_allclose(
        refitted.classifiers[0].predict_proba(x), direct.predict_proba(x), atol=1e-12
    )
    assert not np.allclose(refitted.full_probabilities(x), chosen.full_probabilities(x))
    assert families.kept_calibration(families.TextureFamily(refitted))
    assert families.kept_calibration(families.TextureFamily(chosen)) == ""
    # What evaluate sets the abstain threshold on: valid as the model saw it before the refit.
    held_out = families.held_out_valid_logits(families.TextureFamily(refitted), len(yv))
    np.testing.assert_allclose(held_out, chosen.logits(xv), atol=1e-5)
    assert families.held_out_valid_logits(families.TextureFamily(chosen), len(yv)) is None
    assert families.held_out_valid_logits(families.TextureFamily(refitted), len(yv) + 1) is None


def test_a_one_booster_file_of_format_1_still_loads(features: dict, tmp_path: Path) -> None:
    import skops.io as sio

    model = fit(features, SPEC)
    state = {
        "format": texture.FORMAT,
        "version": 1,
        "classifier": model.classifiers[0],  # format 1: the booster itself, not a list
        "temperature": model.temperature,
        "mean": model.mean,
        "scale": model.scale,
        "image_size": 64,
        "classes": list(model.classes),
        "details": {},
    }
    sio.dump(state, tmp_path / "old.skops")
    old = texture.load(tmp_path / "old.skops")
    x = features["test"][0]
    np.testing.assert_array_equal(old.logits(x), model.logits(x))
    path = texture.save(
        fit(features, texture.ClassifierSpec(**{**SPEC.__dict__, "bag": 2})),
        tmp_path / "bag.skops",
    )
    assert len(texture.load(path).classifiers) == 2


def test_a_bag_below_one_is_refused(features: dict) -> None:
    with pytest.raises(texture.TextureError, match="bag must be >= 1"):
        fit(features, texture.ClassifierSpec(**{**SPEC.__dict__, "bag": 0}))


CROSSFIT = texture.ClassifierSpec(**{**SPEC.__dict__, "refit": True, "calibration_folds": 3})


def _series(n: int) -> np.ndarray:
    return np.arange(n) // 4  # four slices to a series


def test_crossfit_scores_each_series_with_boosters_that_never_saw_it(
    features: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    (xt, yt), (xv, yv) = features["train"], features["valid"]
    groups = _series(len(yt) + len(yv))
    data = texture_fit.FeatureSplits(xt, yt, xv, yv, groups)
    rows = {np.asarray(r).tobytes(): i for i, r in enumerate(np.concatenate([xt, xv]))}
    fitted: list[set[int]] = []
    scored: list[set[int]] = []
    original = texture_fit._classifier

    def recording(spec: texture.ClassifierSpec, seed: int, max_iter: int) -> object:
        model = original(spec, seed, max_iter)
        fit_rows, predict = model.fit, model.predict_proba

        def fit_and_note(x: np.ndarray, y: np.ndarray) -> object:
            fitted.append({rows[r.tobytes()] for r in x})
            return fit_rows(x, y)

        def predict_and_note(x: np.ndarray) -> np.ndarray:
            scored.append({rows[r.tobytes()] for r in x})
            return predict(x)

        model.fit, model.predict_proba = fit_and_note, predict_and_note
        return model

    monkeypatch.setattr(texture_fit, "_classifier", recording)
    oof = texture_fit.crossfit_logits(data, CROSSFIT, seed=3, iterations=[5, 7])
    monkeypatch.undo()
    assert len(fitted) == len(scored) == 3 * 2  # three folds, two boosters each
    # The folds cover every train + valid row once, and each booster never saw what it scored,
    # not even another slice of the same series.
    assert sorted(i for s in scored[::2] for i in s) == list(range(len(groups)))
    for seen, held in zip(fitted, scored, strict=True):
        assert not seen & held
        assert not {int(groups[i]) for i in seen} & {int(groups[i]) for i in held}
    assert oof.shape == (len(groups), 4)
    np.testing.assert_allclose(np.exp(oof).sum(axis=1), 1.0, atol=1e-5)


def test_crossfit_calibration_sets_the_temperature_and_held_out_logits(features: dict) -> None:
    (xt, yt), (xv, yv) = features["train"], features["valid"]
    groups = _series(len(yt) + len(yv))
    data = texture_fit.FeatureSplits(xt, yt, xv, yv, groups)
    model = texture.fit_texture_features(data, CROSSFIT, seed=3, image_size=64)
    plain = fit(features, texture.ClassifierSpec(**{**SPEC.__dict__, "refit": True}))
    iterations = model.details["iterations_per_booster"]
    oof = texture_fit.crossfit_logits(data, CROSSFIT, 3, iterations)
    from chestct.model.calibration import fit_temperature

    expected = fit_temperature(np.concatenate([yt, yv]), oof)
    assert model.temperature == pytest.approx(expected.temperature)
    assert model.temperature != pytest.approx(plain.temperature)
    assert "cross-fitting" in model.details["temperature_fitted_on"]
    assert plain.details["temperature_fitted_on"] == "valid"
    # The boosters are the refit ones: cross-fitting changes the temperature, not the trees.
    x = features["test"][0]
    np.testing.assert_allclose(
        model.full_probabilities(x), plain.full_probabilities(x), atol=1e-12
    )
    held_out = families.held_out_valid_logits(families.TextureFamily(model), len(yv))
    np.testing.assert_allclose(held_out, oof[len(yt) :] / model.temperature, atol=1e-5)
    # evaluate's calibration.json says where the kept temperature came from.
    assert "3-fold cross-fitting" in families.kept_calibration(families.TextureFamily(model))
    assert "on valid before the refit" in families.kept_calibration(families.TextureFamily(plain))


@pytest.mark.parametrize(
    ("refit", "folds", "message"),
    [(False, 3, "needs refit: true"), (True, 1, "must be 0 or >= 2")],
)
def test_bad_calibration_folds_are_refused(
    features: dict, refit: bool, folds: int, message: str
) -> None:
    spec = texture.ClassifierSpec(**{**SPEC.__dict__, "refit": refit, "calibration_folds": folds})
    with pytest.raises(texture.TextureError, match=message):
        fit(features, spec)
