"""params.yaml groups of the model stages: base_model, train, evaluate and promote.

Each key is declared once, with its type, allowed values or range and description
(`chestct.settings.schema.key`); its value lives in params.yaml alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chestct.settings.data_params import ONE
from chestct.settings.schema import key


@dataclass(frozen=True)
class TextureParams:
    """The texture family's classifier (chestct.model.texture: HistGradientBoostingClassifier)."""

    max_iter: int = key(
        "texture/ensemble: boosting iterations at most; the valid split picks how many are kept",
        ge=1,
    )
    learning_rate: float = key("texture/ensemble: boosting learning rate", **ONE)
    max_features: float = key(
        "texture/ensemble: share of the features each split considers", **ONE
    )
    max_leaf_nodes: int = key("texture/ensemble: leaves per tree", ge=2)
    l2_regularization: float = key("texture/ensemble: L2 penalty on leaf values", ge=0)
    class_weight: Literal["balanced", "none"] = key("texture/ensemble: class weighting")
    threads: int = key(
        "texture/ensemble: OpenMP threads of the trees (explicit: their default takes every "
        "core, which crawls here)",
        ge=1,
    )
    bag: int = key(
        "texture/ensemble: boosters with seeds `base.seed`, +1, ...; their probabilities are "
        "averaged",
        ge=1,
        le=20,
    )
    refit: bool = key(
        "texture/ensemble: `true` fits the boosters again on train + valid once valid has "
        "chosen the iterations and the temperature (the test split stays untouched; evaluate "
        "then keeps train's temperature and sets the abstain threshold on valid's held-out "
        "logits)"
    )
    calibration_folds: int = key(
        "texture/ensemble, with `refit: true`: `0` keeps the temperature valid fitted before "
        "the refit; K ≥ 2 fits it on cross-fitted logits of train + valid (K folds of whole "
        "series, `base.near_copy_similarity`; K more fits of each booster), and the abstain "
        "threshold on valid's cross-fitted logits",
        ge=0,
        le=20,
    )


@dataclass(frozen=True)
class BaseModelParams:
    """The model family and the untrained network."""

    family: Literal["cnn", "texture", "ensemble"] = key(
        "`cnn` (the network below), `texture` (texture features + gradient boosting) or "
        "`ensemble` (both, calibrated probabilities averaged): [Texture family](texture-family.md)"
    )
    texture: TextureParams
    architecture: Literal[
        "small_cnn", "mobilenet_v3_small", "efficientnet_b0", "resnet50", "vgg16"
    ] = key("`small_cnn` is the baseline (see [Models and training](models.md))")
    weights: str = key(
        "`none` (random initialisation), `imagenet` (needs the download host or the Keras "
        "cache) or a path, absolute or relative to the project root, to a `.h5`/`.weights.h5` "
        "backbone file or a `.keras` chestct model"
    )
    freeze: Literal["auto", "backbone", "none"] = key(
        "`auto`: backbone frozen when weights are pretrained, trained when random; phase 1 of "
        "training uses it (`backbone` needs pretrained weights)"
    )
    dropout: float = key("dropout before the dense head", ge=0, lt=1)
    filters: list[int] = key(
        "`small_cnn` only: filters of each convolution block (five blocks: 8×8 feature map at "
        "128 px); not empty",
        ge=1,
    )


@dataclass(frozen=True)
class AugmentParams:
    """Random transforms of training batches (chestct.model.modeling.augmenter); 0 turns one
    off."""

    flip: bool = key("random horizontal flips")
    rotation: float = key("random rotation, as a fraction of a full turn", ge=0, lt=1)
    zoom: float = key("scale jitter: random zoom in or out by up to this share", ge=0, lt=1)
    contrast: float = key("random contrast factor", ge=0, lt=1)
    zoom_out: float = key(
        "shrink the slice by up to this share inside a black margin (a wider field of view)",
        ge=0,
        lt=1,
    )
    aspect: float = key("stretch the height alone by up to this share, either way", ge=0)
    translation: float = key("shift by up to this share of the side, black fill", ge=0)
    gamma: float = key("grey-level gamma drawn log-uniformly in [1/(1+g), 1+g]", ge=0)
    window: float = key(
        "clip up to this share of the grey range at each end and stretch back", ge=0, lt=0.5
    )
    blur: float = key("Gaussian blur with σ up to this many pixels", ge=0)
    noise: float = key("additive Gaussian noise with σ up to this many grey levels", ge=0)


@dataclass(frozen=True)
class ReduceLrParams:
    """The learning rate cut when `train.monitor` stalls."""

    factor: float = key("learning rate multiplier when `train.monitor` stalls", gt=0, lt=1)
    patience: int = key("epochs without improvement before the rate is cut", ge=1)
    min_learning_rate: float = key("floor of the learning rate", ge=0)


@dataclass(frozen=True)
class FineTuneParams:
    """Phase 2 of training: the top of a pretrained backbone unfrozen at a lower rate."""

    unfreeze_top: int = key(
        "phase 2: make the top N layers of the backbone trainable (batch-norm layers stay "
        "frozen); `0` skips phase 2",
        ge=0,
    )
    epochs: int = key("maximum epochs of phase 2", ge=1)
    learning_rate: float = key("phase 2 learning rate", gt=0)


@dataclass(frozen=True)
class TrainParams:
    """Fitting the network: optimiser, schedule, distribution and augmentation."""

    epochs: int = key("maximum epochs of phase 1", ge=1)
    batch_size: int = key(
        "global batch size (divided over the replicas of a distribution strategy)", ge=1
    )
    learning_rate: float = key("phase 1 learning rate", gt=0)
    optimizer: Literal["adam", "adamw"] = key("the optimiser")
    weight_decay: float = key("decoupled weight decay (`adamw` only)", ge=0)
    label_smoothing: float = key("label smoothing of the cross-entropy", ge=0, lt=1)
    monitor: Literal["val_loss", "val_accuracy", "val_macro_f1"] = key(
        "picks the best checkpoint and drives early stopping and reduce-on-plateau"
    )
    patience: int = key("epochs without a better `train.monitor` before a phase stops", ge=1)
    class_weights: Literal["balanced", "none"] = key(
        "`balanced`: inverse class frequency; `none`: every class weighs 1"
    )
    bn_recalibration: int = key(
        "before every validation, batch-norm moving statistics are re-estimated on this many "
        "clean (un-augmented) training batches with the current weights; `0` keeps Keras' "
        "moving averages",
        ge=0,
    )
    reduce_lr: ReduceLrParams
    fine_tune: FineTuneParams
    deterministic: bool = key(
        "deterministic TensorFlow ops and seeded shuffling/augmentation: the same data, params "
        "and seed give identical metrics"
    )
    strategy: Literal["default", "mirrored", "multi_worker"] = key(
        "the `tf.distribute` strategy: `mirrored` uses all local GPUs, else the CPU; "
        "`multi_worker` the machines in `TF_CONFIG`"
    )
    mixed_precision: bool = key(
        "`mixed_float16` compute where a GPU is present; ignored (float32, with a warning) on CPU"
    )
    ensemble: int = key(
        "N > 1: train N members one after another (member k from seed `base.seed` + k, k ≥ 1 "
        "with freshly drawn weights; a pretrained backbone's weights are kept) and merge them "
        "into one model that averages their logits; training takes N times as long",
        ge=1,
    )
    augment: AugmentParams


@dataclass(frozen=True)
class EvaluateParams:
    """Scoring, calibration, thresholds and intervals on the held-out splits."""

    batch_size: int = key("batch size for prediction", ge=1)
    abstain_quantile: float = key(
        "quantile of the normalised entropy of correctly classified valid images that becomes "
        "`thresholds.abstain_entropy`",
        **ONE,
    )
    ood_quantile: float = key(
        "quantile of valid Mahalanobis distances that becomes `ood.threshold`", **ONE
    )
    gallery_per_class: int = key(
        "Grad-CAM gallery: most confident correct and worst test images per class (0: empty)",
        ge=0,
    )
    calibrate_on: Literal["valid", "valid_and_shifted"] = key(
        "what the temperature is fitted on: the valid split alone, or with its copies under "
        "every shift-stress perturbation"
    )
    external: str = key(
        '`""` (off), or a folder / `.zip`/`.tar.gz`/`.tgz` archive of '
        "`[<split>/]<class>/<image>`: an external test set scored with every metric into "
        "`external.json`, never used for selection, calibration or thresholds"
    )
    bootstrap_resamples: int = key(
        "bootstrap resamples of groups (series) behind every interval in `metrics.json` / "
        "`external.json` ([novelty and intervals](evaluation-novelty.md))",
        ge=10,
    )
    confidence: float = key("two-sided level of those intervals", ge=0.5, lt=1)


@dataclass(frozen=True)
class PromoteParams:
    """When a candidate replaces the champion in model/."""

    metric: str = key(
        "any number in `metrics.json`, dotted for nested keys (`shift.blur.macro_f1`); "
        "lower-is-better keys (ECE, NLL, rates) compare the other way round; `external.*` is "
        "refused"
    )
    minimum: float = key(
        "a candidate below this (above it, for a lower-is-better metric) is never promoted, "
        "champion or not",
        ge=0,
        le=1,
    )
    margin: float = key(
        "a candidate must beat the champion's score by more than this; equal scores are a "
        "tie, which keeps the champion",
        gt=-1,
        lt=1,
    )
    registered_model: str = key("name in the MLflow model registry (not empty)")
    paired: Literal["bootstrap", "none"] = key(
        "`bootstrap`: a win over the champion must also survive the paired bootstrap of the "
        "metric difference on the same test items; `none`: the margin alone "
        "([novelty and intervals](evaluation-novelty.md))"
    )
    confidence: float = key(
        "the paired test's level: the candidate is better in at least this share of resamples",
        ge=0.5,
        lt=1,
    )
    beat_memorizer: bool = key(
        "refuse a candidate below the nearest-neighbour memorizer on the test split"
    )
