"""base-model: build the initial, untrained model from params and save it."""

from __future__ import annotations

import logging
from pathlib import Path

from chestct.fsutil import staged_file
from chestct.modeling import build_model
from chestct.runner import run_main, stage_session
from chestct.settings import BaseModelParams

log = logging.getLogger(__name__)


def run_base_model(params: BaseModelParams, image_size: int, seed: int, out_dir: Path) -> Path:
    """Build the model and save it as out_dir/model.keras; returns the path."""
    model = build_model(params, image_size, seed)
    target = out_dir / "model.keras"
    with staged_file(target) as tmp:
        model.save(tmp)
    log.info("built %s: %d parameters", model.name, model.count_params())
    return target


def main() -> None:
    with stage_session("base-model") as session:
        s = session.settings
        path = run_base_model(
            s.params.base_model, s.params.base.image_size, s.params.base.seed, session.out_dir
        )
        from chestct.modeling import load_model

        params_count = load_model(path).count_params()
        session.finish(inputs=[], outputs={"model": path}, metrics={"parameters": params_count})


if __name__ == "__main__":
    run_main("base-model", main)
