"""The light inference artifact: the Keras model converted to LiteRT (.tflite) for serving.

Export (`export_light`) needs TensorFlow; running the artifact (`LightModel`) needs only
`ai-edge-litert` and NumPy, so the serving process never imports TensorFlow. The artifact
has one signature, `serving_default`, with the input "image" (float32 (n, s, s, 1) in
[0, 255]) and three named outputs: "probabilities" (n, k), "logits" (n, k) and "features"
(the last 4-D feature map, for Grad-CAM and the out-of-distribution score).

LiteRT was chosen over ONNX after measuring both on this machine: bench/bench_export.py.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from chestct.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

LIGHT_FILE = "model.tflite"
RUNTIME = "litert"
SIGNATURE = "serving_default"
OUTPUT_NAMES: tuple[str, ...] = ("probabilities", "logits", "features")
# The largest |p_light - p_keras| on the test split that promote accepts.
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The model cannot be converted, or the light artifact disagrees with it."""


def export_light(model: Any, target: Path) -> dict[str, Any]:
    """Convert a Keras model (contract layers "features", "logits", "probabilities") to LiteRT.

    Args:
        model: the trained keras.Model.
        target: the .tflite file to write (atomically).

    Returns:
        The card's `inference` entry without the parity figures.
    """
    import tensorflow as tf

    try:
        layers = {name: model.get_layer(name).output for name in OUTPUT_NAMES}
    except ValueError as exc:
        raise ExportError(
            f"model {model.name!r} lacks a contract layer ({exc}); base-model must name "
            f"the layers {', '.join(OUTPUT_NAMES)}"
        ) from None
    import keras

    heads = keras.Model(model.inputs, layers, name=f"{model.name}_light")
    # from_keras_model freezes the weights into constants; converting a tf.function or a
    # SavedModel of a Keras 3 model leaves resource variables that LiteRT reads as NaN.
    converter = tf.lite.TFLiteConverter.from_keras_model(heads)
    # Plain float32 kernels: quantisation would break the 1e-4 parity the card promises.
    converter.optimizations = []
    chatter = io.StringIO()
    try:
        # The converter prints the traced signature to stdout; keep it for debugging only.
        with contextlib.redirect_stdout(chatter):
            flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises many private error types
        raise ExportError(f"LiteRT conversion of {model.name!r} failed: {exc}") from exc
    finally:
        log.debug("converter output: %s", chatter.getvalue())
    atomic_write_bytes(target, flatbuffer)
    log.info("wrote %s (%.1f MB)", target, len(flatbuffer) / 1e6)
    light = LightModel.load(target)
    return {
        "file": target.name,
        "runtime": RUNTIME,
        "signature": SIGNATURE,
        "input": light.input_name,
        "outputs": {name: name for name in OUTPUT_NAMES},
    }


@dataclass
class LightModel:
    """A loaded LiteRT artifact; `run()` maps images to the named outputs (no TensorFlow)."""

    path: Path
    input_name: str
    _runner: Any

    @classmethod
    def load(cls, path: Path, threads: int | None = None, reference: bool = False) -> LightModel:
        """Open `path` with ai-edge-litert.

        Args:
            path: the .tflite file.
            threads: interpreter threads (None: LiteRT's default).
            reference: LiteRT's reference kernels instead of XNNPACK's. XNNPACK picks its
                kernels by the CPU (AVX-512, AVX2, ...), so its last bits vary between
                machines; the reference kernels compute alike everywhere (and slower).
        """
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError as exc:
            raise ExportError(
                "ai-edge-litert is not installed; `pip install -r requirements.txt`"
            ) from exc
        if not path.is_file():
            raise ExportError(f"light model {path} not found; run promote to export it")
        resolver = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
        interpreter = Interpreter(
            model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver
        )
        signature = interpreter.get_signature_list().get(SIGNATURE)
        if signature is None or set(OUTPUT_NAMES) - set(signature["outputs"]):
            raise ExportError(
                f"{path} lacks the signature {SIGNATURE!r} with outputs "
                f"{', '.join(OUTPUT_NAMES)}; export it again with promote"
            )
        (input_name,) = signature["inputs"]
        return cls(path, input_name, interpreter.get_signature_runner(SIGNATURE))

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs for a batch of float32 images shaped (n, s, s, 1) in [0, 255]."""
        batch = np.ascontiguousarray(images, dtype=np.float32)
        return {k: np.array(v) for k, v in self._runner(**{self.input_name: batch}).items()}


def light_outputs(
    light: LightModel, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 32
) -> dict[str, np.ndarray]:
    """Run the light model over many images in batches; outputs concatenated per name."""
    images = np.asarray(images, dtype=np.float32)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in OUTPUT_NAMES}
    for start in range(0, len(images), batch_size):
        out = light.run(images[start : start + batch_size])
        for name in OUTPUT_NAMES:
            parts[name].append(out[name])
    return {name: np.concatenate(chunks, axis=0) for name, chunks in parts.items()}


def parity(p_light: np.ndarray, p_keras: np.ndarray) -> float:
    """The largest absolute difference between two probability matrices."""
    if p_light.shape != p_keras.shape:
        raise ExportError(
            f"light model gives probabilities of shape {p_light.shape}, Keras {p_keras.shape}"
        )
    return float(np.max(np.abs(p_light.astype(np.float64) - p_keras.astype(np.float64))))
