"""Two versions of the predictor measured side by side: a git revision's src/ against the
working tree's, in the same conditions (bench/serve.py's series, alternating).

On a shared machine the load moves more than a code change does, so a change is judged by two
gunicorn servers running at once (the revision's src/, from `git archive`, first on its
workers' PYTHONPATH; the working tree's as installed), same model, same 75 kB PNG, their
1-client series alternating round by round with bare's (bench/serve.py) in between, then each
under 4 clients. Every figure is the median over the rounds.

    python bench/serve_ab.py REV [--model-dir model] [--requests 300] [--seconds 5]
                             [--rounds 4] [--record docs/results/<name>.json]

Without --model-dir the model is bench/serve.py's untrained small CNN.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import serve

# The app's own steps around the model's work (bench/serve.py STEP_HELP).
SERVICE_STEPS = ("receive", "checks", "analyse", "monitor")


def revision_src(rev: str, scratch: Path) -> Path:
    """The src/ folder of git revision `rev`, unpacked into `scratch`."""
    archive = subprocess.run(
        ["git", "archive", rev, "src"], cwd=serve.REPO, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    return scratch / "src"


def start(model_dir: Path, scratch: Path, pythonpath: str | None) -> serve.Server:
    """A 1-worker server of `model_dir`; `pythonpath` first on the worker's import path."""
    saved = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = pythonpath
    try:
        return serve.Server(model_dir, scratch, workers=1)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def one_round(server: serve.Server, body: bytes, requests: int, seconds: float) -> dict:
    """1-client p50, worker CPU and steps, then 4-client throughput and CPU per request."""
    pid = server.worker_pids()[0]
    cpu = serve.cpu_seconds(pid)
    steps: list[dict[str, float]] = []
    times = serve.post_loop(server.port, body, None, requests, steps=steps)
    cpu = (serve.cpu_seconds(pid) - cpu) / requests
    loaded = serve.load_run(server, body, seconds, "/predict")
    return {
        "p50_ms": statistics.median(times) * 1e3,
        "cpu_ms": cpu * 1e3,
        "steps": {name: statistics.median(s.get(name, 0.0) for s in steps) for name in steps[0]},
        "throughput": loaded["throughput"],
        "load_cpu_ms": loaded["cpu_ms"],
    }


def summary(rounds: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in rounds) for k in rounds[0] if k != "steps"}
    out["steps"] = {
        k: statistics.median(r["steps"][k] for r in rounds) for k in rounds[0]["steps"]
    }
    return out


def table(old: dict, new: dict, bare: dict) -> list[list[str]]:
    """The rows of the comparison, bare's p50 and CPU per call beside their served figures."""
    for figures in (old, new):
        figures["service"] = sum(figures["steps"].get(n, 0.0) for n in SERVICE_STEPS)
        figures["outside"] = figures["p50_ms"] - sum(figures["steps"].values())
    rows = [
        ["p50 /predict, 1 client (ms)", f"{old['p50_ms']:.2f}", f"{new['p50_ms']:.2f}"],
        [
            "p50 over bare's",
            f"{old['p50_ms'] / bare['p50_ms']:.2f}",
            f"{new['p50_ms'] / bare['p50_ms']:.2f}",
        ],
        ["worker CPU per request, 1 client (ms)", f"{old['cpu_ms']:.2f}", f"{new['cpu_ms']:.2f}"],
    ]
    for name in SERVICE_STEPS:
        rows.append(
            [
                f"step `{name}`, 1 client (wall ms)",
                f"{old['steps'].get(name, 0.0):.2f}",
                f"{new['steps'].get(name, 0.0):.2f}",
            ]
        )
    rows += [
        ["the four steps together (ms)", f"{old['service']:.2f}", f"{new['service']:.2f}"],
        ["p50 outside the steps (ms)", f"{old['outside']:.2f}", f"{new['outside']:.2f}"],
        ["throughput, 4 clients (req/s)", f"{old['throughput']:.1f}", f"{new['throughput']:.1f}"],
        [
            "worker CPU per request, 4 clients (ms)",
            f"{old['load_cpu_ms']:.2f}",
            f"{new['load_cpu_ms']:.2f}",
        ],
    ]
    # Bare's figure beside the served ones it compares with: its p50, its CPU per call.
    cpu = f"{bare['cpu_ms']:.2f}"
    beside = {0: f"{bare['p50_ms']:.2f}", 2: cpu, len(rows) - 1: cpu}
    return [[name, a, b, beside.get(i, "")] for i, (name, a, b) in enumerate(rows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rev", help="the git revision to compare the working tree with")
    serve.add_run_arguments(ap, seconds=5.0, rounds=4)
    ap.add_argument("--record", type=Path, help="also write the table as a docs results file")
    args = ap.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="chestct-bench-ab-"))
    try:
        model_dir = serve.model_folder(args.model_dir, scratch)
        image = scratch / "slice.png"
        serve.make_image(image)
        body = image.read_bytes()
        old_src = revision_src(args.rev, scratch)
        servers = {
            "old": start(model_dir, scratch / "old", str(old_src)),
            "new": start(model_dir, scratch / "new", None),
        }
        results: dict[str, list[dict]] = {"old": [], "new": []}
        bares = []
        try:
            for server in servers.values():
                server.wait_ready()
                serve.post_loop(server.port, body, None, 30)
            for i in range(args.rounds):
                bares.append(serve.bare_run(model_dir, image, args.requests))
                order = ("old", "new") if i % 2 == 0 else ("new", "old")
                for name in order:
                    results[name].append(
                        one_round(servers[name], body, args.requests, args.seconds)
                    )
        finally:
            for server in servers.values():
                server.stop()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    bare = {k: statistics.median(b[k] for b in bares) for k in ("p50_ms", "cpu_ms")}
    old, new = summary(results["old"]), summary(results["new"])
    rows = table(old, new, bare)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"load average at the end (1, 5, 15 min): {load}")
    print(f"{'measure':42} {args.rev[:12]:>12} {'working tree':>13} {'bare':>7}")
    for name, a, b, c in rows:
        print(f"{name:42} {a:>12} {b:>13} {c:>7}")
    if args.record is not None:
        from results import write_result

        write_result(
            args.record,
            f"The served path at {args.rev} against the working tree, side by side",
            ["measure", args.rev, "working tree", "bare"],
            rows,
            note=f"load average at the end of the run (1, 5, 15 min): {load}",
        )
        print(f"recorded {args.record}")


if __name__ == "__main__":
    main()
