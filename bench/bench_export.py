"""LiteRT vs ONNX Runtime for the light serving artifact, measured side by side in one run.

For the default small CNN at base.image_size (params.yaml), each runtime is loaded in a fresh
Python process (no TensorFlow imported) and reports: import time of the runtime, resident
memory after loading the model and one warm-up call, the median single-image latency over
200 calls, and the largest probability difference against Keras. ONNX needs tf2onnx, onnx and
onnxruntime, which chestct does not install; pass their folder with --onnx-path.

    python bench/bench_export.py [--onnx-path /tmp/onnxpkgs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = r"""
import json, statistics, sys, time
def rss_mb():
    # VmRSS, not ru_maxrss: the peak would include the parent's memory from before exec().
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
t0 = time.perf_counter()
import numpy as np
runtime, path, images = sys.argv[1], sys.argv[2], sys.argv[3]
if runtime == "litert":
    from ai_edge_litert.interpreter import Interpreter
else:
    import onnxruntime as ort
imported = time.perf_counter() - t0
x = np.load(images)
if runtime == "litert":
    it = Interpreter(model_path=path, num_threads=1)
    run = it.get_signature_runner("serving_default")
    name = it.get_signature_list()["serving_default"]["inputs"][0]
    call = lambda b: run(**{name: b})["probabilities"]
else:
    opts = ort.SessionOptions(); opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    out = [o.name for o in sess.get_outputs()].index("probabilities")
    call = lambda b: sess.run(None, {name: b})[out]
proba = np.concatenate([call(x[i:i+1]) for i in range(len(x))])
times = []
for i in range(200):
    b = x[i % len(x):i % len(x) + 1]
    t = time.perf_counter(); call(b); times.append(time.perf_counter() - t)
print(json.dumps({"import_s": imported, "latency_ms": statistics.median(times) * 1e3,
                  "rss_mb": rss_mb(),
                  "proba": proba.tolist(),
                  "tf_imported": "tensorflow" in sys.modules}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx-path", default="", help="folder holding tf2onnx/onnxruntime")
    args = parser.parse_args()
    if args.onnx_path:
        sys.path.append(args.onnx_path)

    import tensorflow as tf

    from chestct.model.export import export_light
    from chestct.model.modeling import build_model
    from chestct.settings import load_settings

    s = load_settings()
    size = s.params.base.image_size
    model = build_model(s.params.base_model, size, s.params.base.seed)
    x = np.random.default_rng(0).uniform(0, 255, (16, size, size, 1)).astype(np.float32)
    p_keras = model.predict(x, verbose=0)
    tmp = Path(tempfile.mkdtemp(prefix="chestct-bench-"))
    np.save(tmp / "x.npy", x)
    files = {"litert": tmp / "model.tflite"}
    export_light(model, files["litert"])
    try:
        import tf2onnx

        names = ("probabilities", "logits", "features")
        import keras

        heads = keras.Model(model.inputs, [model.get_layer(n).output for n in names])
        spec = (tf.TensorSpec((None, size, size, 1), tf.float32, name="image"),)

        @tf.function(input_signature=spec)
        def serve(image):
            outs = heads(image, training=False)
            return {n: tf.identity(o, name=n) for n, o in zip(names, outs, strict=True)}

        files["onnx"] = tmp / "model.onnx"
        tf2onnx.convert.from_function(
            serve, input_signature=spec, opset=17, output_path=str(files["onnx"])
        )
    except Exception as exc:  # report and go on with LiteRT alone
        print(f"ONNX export skipped: {exc!r}", file=sys.stderr)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [args.onnx_path]))}
    print(f"small CNN {size}x{size}, 1 thread, single image, median of 200 calls")
    print(
        f"{'runtime':8} {'file MB':>8} {'import s':>9} {'RSS MB':>8} {'latency ms':>11} "
        f"{'max|dp|':>9} {'TF loaded':>9}"
    )
    for runtime, path in files.items():
        out = subprocess.run(
            [sys.executable, "-c", CHILD, runtime, str(path), str(tmp / "x.npy")],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if out.returncode != 0:
            print(f"{runtime:8} failed: {out.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        diff = float(np.max(np.abs(np.array(r["proba"]) - p_keras)))
        print(
            f"{runtime:8} {path.stat().st_size / 1e6:8.2f} {r['import_s']:9.2f} "
            f"{r['rss_mb']:8.0f} {r['latency_ms']:11.2f} {diff:9.1e} {r['tf_imported']!s:>9}"
        )


if __name__ == "__main__":
    main()
