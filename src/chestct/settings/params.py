"""params.yaml as one frozen tree: a group per stage plus `base`.

Every key is declared once in data_params or model_params, with its type, allowed values or
range and description; its value lives in params.yaml alone (no key has a default here).
docs/generated/params.md is rendered from these declarations and params.yaml
(`python bench/docsgen.py`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from chestct.settings.data_params import (
    BaseParams,
    IngestParams,
    ResizeParams,
    SplitParams,
    ValidateParams,
)
from chestct.settings.model_params import (
    BaseModelParams,
    EvaluateParams,
    PromoteParams,
    TrainParams,
)


@dataclass(frozen=True)
class Params:
    """params.yaml: everything that changes results."""

    base: BaseParams
    ingest: IngestParams
    split: SplitParams
    resize: ResizeParams
    validate: ValidateParams
    base_model: BaseModelParams
    train: TrainParams
    evaluate: EvaluateParams
    promote: PromoteParams

    def group(self, name: str) -> dict[str, Any]:
        """One params group as a plain dict (for pointers and MLflow)."""
        return dataclasses.asdict(getattr(self, name))
