"""params.yaml groups of the data stages: base, ingest, split, resize and validate.

Each key is declared once, with its type, allowed values or range and description
(`chestct.settings.schema.key`); its value lives in params.yaml alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chestct.settings.schema import SettingsError, key

ONE = {"gt": 0.0, "le": 1.0}  # a share or correlation in (0, 1]


@dataclass(frozen=True)
class BaseParams:
    """Shared by every stage."""

    seed: int = key("seed for synthetic data, splits, weight initialisation and shuffling", ge=0)
    image_size: int = key(
        "side of the square grey image that resize writes and the model takes", ge=16
    )
    near_copy_similarity: float = key(
        "thumbnail correlation (`chestct.data.similarity`: body crop, 32 × 32, Pearson) at or "
        "above which a slice is a near-copy of its nearest train slice; split, validate and "
        "evaluate read it",
        **ONE,
    )


@dataclass(frozen=True)
class WindowParams:
    """The CT window that maps DICOM Hounsfield units to 8-bit grey."""

    level: float = key("DICOM window centre in Hounsfield units (lung window)")
    width: float = key("DICOM window width in Hounsfield units", gt=0)


@dataclass(frozen=True)
class IngestParams:
    """Where the images come from, and the limits on fetching and unpacking them."""

    source: str = key(
        "`synthetic` (embedded default), a folder, a `.zip`/`.tar.gz`/`.tgz` archive, an "
        "`http(s)://` URL of one (or `env:CHESTCT_SOURCE_URL`), or a `.csv` listing "
        "`path,label[,split][,group]` (see [Using your own data](own-data.md))"
    )
    synthetic_per_class: dict[str, int] = key(
        "images per class and split (`train`, `valid`, `test`) generated for the embedded default",
        ge=0,
    )
    class_map: dict[str, str] = key(
        "extra folder-name → label aliases (labels: `adenocarcinoma`, `large_cell_carcinoma`, "
        "`squamous_cell_carcinoma`, `normal`)"
    )
    sha256: str = key(
        "the archive's sha256: required for a URL source (checked before anything is "
        "unpacked), checked for a local archive when set"
    )
    timeout_s: float = key(
        "URL source: seconds without an answer before the download is abandoned", gt=0
    )
    deadline_s: float = key("URL source: total seconds the download may take", gt=0)
    max_download_mb: float = key(
        "URL source: a larger download (declared or received) is stopped", gt=0
    )
    redirect_hosts: list[str] = key(
        "URL source: hosts besides the URL's own that a redirect may lead to (`host`: any "
        "port, `host:port`: that one)"
    )
    allow_private_hosts: bool = key(
        "URL source: `true` lets downloads reach loopback, private and link-local addresses "
        "(a local mirror, tests)"
    )
    max_members: int = key("archive: more entries are refused", ge=1)
    max_unpacked_mb: float = key("archive: a larger total unpacked size is refused", gt=0)
    max_ratio: float = key(
        "archive: unpacked / packed bytes (whole archive or one entry) above this is refused",
        ge=1,
    )
    max_file_mb: float = key(
        "folder or listing source: a larger file is refused (one CT slice is well under 1 MB)",
        gt=0,
    )
    window: WindowParams
    synthetic_shortcut: Literal["", "zoom", "dark"] = key(
        '`""`: off; `zoom` or `dark`: the synthetic default draws `large_cell_carcinoma` '
        "slices zoomed out to 70 % of the frame on black, or with grey levels × 0.6, in every "
        "split: an acquisition shortcut, for testing that evaluation and promotion see through "
        "one"
    )
    synthetic_series: int = key(
        "slices per synthetic patient: near-copies (shifted, turned, noised) of one rendered "
        "slice, so that series grouping and novelty have something to find "
        "([data checks](data-checks.md))",
        ge=1,
    )


@dataclass(frozen=True)
class SplitParams:
    """How the images are divided into train, valid and test."""

    mode: Literal["keep", "pool"] = key(
        "`keep`: the source's splits, missing ones carved out of its train; `pool`: re-split "
        "everything"
    )
    valid_fraction: float = key(
        "share of the images being split that goes to valid (> 0; valid + test < 1)"
    )
    test_fraction: float = key(
        "share of the images being split that goes to test (> 0; valid + test < 1)"
    )
    near_duplicate_distance: int = key(
        "perceptual-hash bits (of 256) within which files are grouped as near-duplicates; "
        "`-1`: exact copies only",
        ge=-1,
        le=256,
    )
    dedupe: Literal["report", "drop"] = key(
        "`drop` keeps one of each group of copies: members the source spreads over two splits "
        "go from the later split, and repeats with the same label inside a split go too "
        "(`artifacts/split/dropped.csv` says why); `report` only reports them"
    )
    series_similarity: float = key(
        "thumbnail correlation at or above which slices are one series and move together "
        "(connected components; `-1` off; [data checks](data-checks.md))",
        **ONE,
        off=-1,
    )


@dataclass(frozen=True)
class ResizeParams:
    """How a slice becomes the model's square grey input (chestct.imaging.preparation)."""

    interpolation: Literal["area", "linear", "cubic"] = key("OpenCV interpolation")
    mode: Literal["stretch", "pad", "crop"] = key(
        "how a non-square slice becomes square (see "
        "[Resizing and shortcuts](preprocessing.md#resizing-and-shortcuts))"
    )
    workers: int = key("processes for resizing; `0` uses all cores", ge=0)
    crop: Literal["body", "lungs", "none"] = key(
        "`body`: cut each slice to the body's bounding box before resizing; `lungs`: to the "
        "lung field's box (falls back to the body box, with its reason, when no lungs are "
        "found; [data checks](data-checks.md)); `none`: the whole frame (see "
        "[Acquisition shift](preprocessing.md#acquisition-shift))"
    )
    crop_margin: float = key(
        "share of the body box's side added on every side (past the frame's edge in the "
        "background's grey)",
        ge=0,
        le=0.5,
    )
    intensity: Literal["percentile", "equalize", "clahe", "none"] = key(
        "`percentile`: stretch `resize.percentiles` to 0..255; `equalize`: each grey level "
        "becomes its rank (undoes gamma and window changes); `clahe`: adaptive histogram "
        "equalisation; `none`"
    )
    percentiles: list[float] = key(
        "the low and high percentile of the prepared slice that become 0 and 255 (low < high)",
        ge=0,
        le=100,
    )
    clahe_clip: float = key("`clahe` only: contrast limit (8 × 8 tiles)", gt=0)

    def __post_init__(self) -> None:
        problem = percentile_pair_problem(self.percentiles)
        if problem:
            raise SettingsError(f"resize.percentiles: {problem}")


def percentile_pair_problem(pair: object) -> str | None:
    """What is wrong with a percentile window [low, high] beyond each value's range (params
    resize.percentiles, a card's preprocessing.percentiles), or None."""
    if not isinstance(pair, list | tuple) or len(pair) != 2 or not pair[0] < pair[1]:
        return f"expected [low, high] with 0 <= low < high <= 100, got {pair}"
    return None


@dataclass(frozen=True)
class ValidateParams:
    """The data checks, their thresholds and what stops the pipeline."""

    fail_on: Literal["error", "warning", "never"] = key(
        "the lowest severity that stops the pipeline"
    )
    min_class_count: int = key("fewer images of a class in any split is an error", ge=0)
    max_imbalance: float = key(
        "largest / smallest class count in a split above this is a warning", ge=1
    )
    min_file_bytes: int = key("smaller files are reported (`small_file`)", ge=0)
    min_side: int = key("a width or height below this is reported (`dimensions`)", ge=1)
    max_side: int = key(
        "a width or height above this is reported (`dimensions`; at least min_side)", ge=1
    )
    min_std: float = key("a resized slice whose grey-level std is below this is near-blank", ge=0)
    allowed_modes: list[str] = key("colour modes that are not reported (`unexpected_mode`)")
    near_duplicate_distance: int = key(
        "perceptual-hash bits (of 256) within which files count as near duplicates; `-1` "
        "turns the near checks off",
        ge=-1,
        le=256,
    )
    shortcut_margin: float = key(
        "the shortcut detector warns when its balanced accuracy reaches chance + this", ge=0
    )
    shortcut_min_images: int = key("with fewer images the shortcut detector is skipped", ge=0)
    quarantine: bool = key(
        "`true`: leave files named by a warning or error out of the downstream manifests "
        "(listed in `quarantine.csv`)"
    )
    severities: dict[str, Literal["info", "warning", "error"]] = key(
        "per-check severity overrides, e.g. `{near_duplicate: warning}`; check names are in "
        "[Validation](validation.md)"
    )
    max_near_copy_share: float = key(
        "a split with a larger share of near-copies of train (`base.near_copy_similarity`) "
        "fires `near_copy_split`",
        ge=0,
        le=1,
    )
    series_similarity: float = key(
        "thumbnail correlation linking train slices into one series (`few_series`)",
        **ONE,
        off=-1,
    )
    min_series_per_class: int = key(
        "a train class drawn from fewer series is flagged (`few_series`; 0 off)", ge=0
    )
