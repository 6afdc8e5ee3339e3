"""Model families behind one contract: `base_model.family` cnn | texture | ensemble.

A trained model is one file that train hands on as its `model` output:
- cnn: model.keras (chestct.model.modeling);
- texture: texture.skops (chestct.model.texture);
- ensemble: ensemble.json, naming model.keras and texture.skops beside it with their sha256
  and the CNN's temperature (fitted on valid by train); its prediction is the average of the
  two members' calibrated probabilities, and its "logits" the logarithm of that average.

`load_any` opens any of them; a texture or ensemble model answers `family_outputs(images)`
with the layers of the model contract (logits, probabilities, gap, features), which
chestct.evaluation.scoring reads in place of a Keras model's named layers. What each family offers
besides the prediction is in `OFFERS` (the card and the service say it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestct.fsutil import atomic_write_json, sha256_file
from chestct.model.calibration import softmax
from chestct.model.texture import TextureModel, log_probabilities
from chestct.model.texture import load as load_texture

FAMILIES = ("cnn", "texture", "ensemble")
TEXTURE_FILE = "texture.skops"
ENSEMBLE_FILE = "ensemble.json"
CNN_FILE = "model.keras"

# What a served model of each family gives beside calibrated probabilities and abstain.
OFFERS: dict[str, dict[str, str]] = {
    "cnn": {
        "explain": "Grad-CAM of the predicted class (the dense head over the last feature map)",
        "mc_dropout": "yes: dropout sampled on the pooled features",
        "ood": "Mahalanobis distance of the pooled CNN features to the train split",
    },
    "texture": {
        "explain": "occlusion of body tiles on the texture model's probability, and the share "
        "of each feature group (lbp, glcm, histogram, hog) in the decision",
        "mc_dropout": "not offered: gradient-boosted trees have no dropout; the calibrated "
        "entropy (abstain) is the uncertainty",
        "ood": "Mahalanobis distance of the standardised texture features to the train split",
    },
    "ensemble": {
        "explain": "Grad-CAM of the CNN member",
        "mc_dropout": "not offered: the texture member has no dropout; the calibrated entropy "
        "(abstain) is the uncertainty",
        "ood": "Mahalanobis distance of the CNN member's pooled features to the train split",
    },
}


class FamilyError(ValueError):
    """A model file of no known family, or an ensemble whose members do not match."""


def family_of(path: Path) -> str:
    """The family of a trained model file, by its name."""
    if path.suffix == ".skops":
        return "texture"
    if path.suffix == ".json":
        return "ensemble"
    return "cnn"


def is_family_model(model: Any) -> bool:
    """True for the texture and ensemble models (they answer `family_outputs`)."""
    return callable(getattr(model, "family_outputs", None))


@dataclass
class TextureFamily:
    """A texture model in the family contract."""

    model: TextureModel
    family: str = "texture"

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return self.model.input_shape

    def family_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.model.outputs(images)


def _keras_heads(model: Any, names: Sequence[str]) -> Any:
    import keras

    return keras.Model(model.inputs, [model.get_layer(n).output for n in names])


@dataclass
class EnsembleFamily:
    """The CNN and the texture model, their calibrated probabilities averaged."""

    cnn: Any  # keras.Model
    texture: TextureModel
    cnn_temperature: float
    family: str = "ensemble"
    _heads: Any = None

    @property
    def input_shape(self) -> tuple[None, int, int, int]:
        return (None, int(self.cnn.input_shape[1]), int(self.cnn.input_shape[2]), 1)

    def cnn_outputs(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The CNN member's logits and last feature maps."""
        if self._heads is None:
            self._heads = _keras_heads(self.cnn, ["logits", "features"])
        batch = np.asarray(images, np.float32)
        if batch.ndim == 3:
            batch = batch[..., None]
        logits, features = self._heads.predict(batch, batch_size=64, verbose=0)
        return np.asarray(logits, np.float64), np.asarray(features, np.float32)

    def family_outputs(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cnn_logits, features = self.cnn_outputs(images)
        tex = self.texture.outputs(images)
        proba = average(
            [softmax(cnn_logits, self.cnn_temperature), softmax(tex["logits"])],
        )
        logits = log_probabilities(proba).astype(np.float32)
        return {
            "logits": logits,
            "probabilities": proba.astype(np.float32),
            # The CNN's pooled features: what the served ensemble's OOD distance is taken on.
            "gap": features.mean(axis=(1, 2)),
            "features": features,
        }


def average(probabilities: Sequence[np.ndarray]) -> np.ndarray:
    """The members' calibrated probabilities, averaged (each row still sums to 1)."""
    return np.mean(np.stack([np.asarray(p, np.float64) for p in probabilities]), axis=0)


def write_ensemble(
    target: Path, cnn_file: Path, texture_file: Path, cnn_temperature: float
) -> Path:
    """ensemble.json beside its members, pinning each by its sha256."""
    for member in (cnn_file, texture_file):
        if member.parent != target.parent:
            raise FamilyError(f"{member} must lie beside {target}")
    atomic_write_json(
        target,
        {
            "family": "ensemble",
            "combine": "mean of the members' calibrated probabilities",
            "members": {
                "cnn": {
                    "file": cnn_file.name,
                    "sha256": sha256_file(cnn_file),
                    "temperature": float(cnn_temperature),
                },
                "texture": {"file": texture_file.name, "sha256": sha256_file(texture_file)},
            },
        },
    )
    return target


def read_ensemble(path: Path) -> dict[str, Any]:
    """ensemble.json, its members checked against their sha256."""
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        members: Mapping[str, Any] = spec["members"]
        cnn, tex = members["cnn"], members["texture"]
        temperature = float(cnn["temperature"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FamilyError(f"{path.name} is not an ensemble description ({exc!r})") from None
    for entry in (cnn, tex):
        name = entry.get("file")
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise FamilyError(f"{path.name}: member file {name!r} is not a plain file name")
        member = path.parent / name
        if not member.is_file() or sha256_file(member) != entry.get("sha256"):
            raise FamilyError(
                f"{path.name}: member {name} is missing or does not match its sha256; "
                "rerun `dvc repro train`"
            )
    if not temperature > 0:
        raise FamilyError(f"{path.name}: the CNN member's temperature must be > 0")
    return spec


def load_any(path: Path) -> Any:
    """A trained model file of any family: a Keras model, a TextureFamily or an
    EnsembleFamily."""
    family = family_of(path)
    if family == "texture":
        return TextureFamily(load_texture(path))
    if family == "ensemble":
        spec = read_ensemble(path)
        from chestct.model.modeling import load_model

        members = spec["members"]
        return EnsembleFamily(
            cnn=load_model(path.parent / members["cnn"]["file"]),
            texture=load_texture(path.parent / members["texture"]["file"]),
            cnn_temperature=float(members["cnn"]["temperature"]),
        )
    from chestct.model.modeling import load_model

    return load_model(path)


def cam_head_of(model: Any) -> Any:
    """The dense head whose CAM explains the model: the CNN's, the ensemble's CNN member's,
    None for the texture family (explained by occlusion instead)."""
    from chestct.model.gradcam import CamHead

    if isinstance(model, TextureFamily):
        return None
    return CamHead.from_model(model.cnn if isinstance(model, EnsembleFamily) else model)


def _texture_member(model: Any) -> TextureModel | None:
    """The texture model of a texture or ensemble model: a trained family here, or a served
    artefact (chestct.inference.artefact.Artefact, which carries it as `texture`)."""
    if isinstance(model, TextureFamily):
        return model.model
    if isinstance(model, EnsembleFamily):
        return model.texture
    return getattr(model, "texture", None)


def _family_name(model: Any) -> str:
    if isinstance(model, TextureFamily):
        return "texture"
    if isinstance(model, EnsembleFamily):
        return "ensemble"
    return str(getattr(model, "family", "cnn"))


def kept_calibration(model: Any) -> str:
    """Why evaluate must not fit its temperature on the valid split for `model`, or "" when it
    may: a texture model (or an ensemble's texture member) refit on train + valid has seen
    valid, so a temperature fitted there would only sharpen it."""
    texture = _texture_member(model)
    if texture is None or not texture.details.get("refit_on"):
        return ""
    source = str(texture.details.get("temperature_fitted_on") or "valid")
    where = "on valid before the refit" if source == "valid" else f"by {source}"
    return (
        "the texture model was refit on train + valid (base_model.texture.refit), so valid is "
        f"no longer held out; the temperature train fitted {where} "
        f"({float(texture.temperature):.4f}) is inside the model"
    )


def held_out_valid_logits(model: Any, n_valid: int) -> np.ndarray | None:
    """The valid split's calibrated logits from before a texture model's refit, or its
    cross-fitted ones (base_model.texture.calibration_folds); None for any other model, or
    when the valid split no longer has `n_valid` rows: the refit model has seen valid, so an
    abstain threshold set on its own valid entropies would be in-sample."""
    texture = _texture_member(model) if _family_name(model) == "texture" else None
    stored = texture.details.get("held_out_valid_logits") if texture is not None else None
    if not stored or len(stored) != n_valid:
        return None
    return np.asarray(stored, np.float64)


def explainer_of(model: Any) -> TextureModel | None:
    """The texture model whose occlusion maps explain `model` (texture family only)."""
    return model.model if isinstance(model, TextureFamily) else None


def batched_outputs(
    model: Any, images: np.ndarray, batch_size: int, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """`family_outputs` over batches, the named outputs concatenated."""
    parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for start in range(0, len(images), max(1, batch_size)):
        out = model.family_outputs(images[start : start + batch_size])
        for n in names:
            parts[n].append(out[n])
    if not len(images):
        probe = model.family_outputs(np.zeros((1, *model.input_shape[1:]), np.float32))
        return {n: np.zeros((0, *probe[n].shape[1:]), np.float32) for n in names}
    return {n: np.concatenate(parts[n]) for n in names}
