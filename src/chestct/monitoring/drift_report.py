"""The monitor's report: the verdict for the terminal and one self-contained HTML page.

`verdict_lines` is what `python -m chestct.monitoring.monitor` prints; `render_html` is
report.html, with a table per kind (signals, rates, live performance) and the reference and
window distributions drawn inline (chestct.evaluation.plots.shares_png).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from html import escape as esc
from typing import Any

from chestct.monitoring.signals import BY_NAME, CLASS_SIGNAL


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """The short verdict printed on the terminal."""
    w = report["window"]
    lines = [
        f"chestct monitor: {report['verdict'].upper()} — {w['n']} predictions "
        f"({w['start'] or '-'} .. {w['end'] or '-'}) of model {report['model']['name']} "
        f"v{report['model']['version']} vs {report['reference']['n']} reference images"
    ]
    if report["verdict"] == "insufficient":
        lines.append(
            f"  too few requests to judge: {w.get('requests', w['n'])} (answered and refused), "
            f"monitor.min_requests = {report['thresholds']['min_requests']}; nothing is judged"
        )
        return lines
    refused = report["rates"].get("refused", {})
    if w.get("refused"):
        reasons = ", ".join(f"{k} {v}" for k, v in refused.get("reasons", {}).items())
        lines.append(f"  {w['refused']} of {w['requests']} requests refused (422): {reasons}")
    for name, s in report["signals"].items():
        if not s.get("judged"):
            continue
        mark = row_mark(s, report["thresholds"])
        lines.append(f"  {name:18} PSI {s['psi']:7.3f}  {s['test']} p={s['p_value']:.2g}  {mark}")
    for flag, r in report["rates"].items():
        if r.get("judged"):
            mark = "DRIFT" if r["drift"] else "ok"
            lines.append(
                f"  {flag + ' rate':18} {r['observed']:.3f} vs expected {r['expected']:.3f}  "
                f"p={r['p_value']:.2g}  {mark}"
            )
    if report["window"]["n"] < report["thresholds"]["min_requests"]:
        lines.append(
            f"  signals not judged: only {report['window']['n']} answered predictions "
            f"(monitor.min_requests = {report['thresholds']['min_requests']})"
        )
    perf = report["performance"]
    if perf.get("live"):
        live, test = perf["live"], perf["test"]
        mark = "DEGRADED" if perf.get("degraded") else ("ok" if perf["judged"] else "not judged")
        lines.append(
            f"  live on {perf['labelled']} labelled: accuracy {live['accuracy']:.3f}, "
            f"balanced accuracy {live['balanced_accuracy']:.3f}, macro-F1 "
            f"{live['macro_f1']:.3f} (test {_fmt(test.get('macro_f1'))})  {mark}"
        )
    if report.get("not_in_reference"):
        lines.append(
            f"  not judged, absent from this model's reference.json (fitted by an older "
            f"chestct): {', '.join(report['not_in_reference'])}; `dvc repro evaluate promote` "
            "fits them"
        )
    if report["drifted"]:
        lines.append(f"  drifted: {', '.join(report['drifted'])}")
    return lines


def row_mark(s: dict[str, Any], t: dict[str, Any]) -> str:
    """DRIFT, ok, or why a large PSI is not drift (its test is not significant)."""
    if s["drift"]:
        return "DRIFT"
    if s["psi"] >= t["psi"] and s["p_value"] >= t["p_value"]:
        return f"not significant (PSI >= {t['psi']:g} but p >= {t['p_value']:g})"
    return "ok"


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def _png_b64(labels: Sequence[str], ref: Sequence[float], win: Sequence[float], title: str) -> str:
    """Reference vs window fractions per bin (chestct.evaluation.plots), as base64 PNG for the
    page."""
    from chestct.evaluation.plots import shares_png

    return base64.b64encode(shares_png(labels, ref, win, title)).decode("ascii")


def _bin_labels(edges: Sequence[float]) -> list[str]:
    labels, lower = [], None
    for edge in edges:
        labels.append(f"≤{edge:g}" if lower is None else f"{lower:g}–{edge:g}")
        lower = edge
    labels.append(f">{edges[-1]:g}")
    return labels


def render_html(report: dict[str, Any]) -> str:
    """One self-contained HTML page: verdict, the rule, a table per kind and the pictures in a
    grid; laid out for a 1280 px screen and narrower."""
    t = report["thresholds"]
    lines = "\n".join(esc(line) for line in verdict_lines(report))
    if report["verdict"] == "insufficient":
        judged = "<p>Too few requests: nothing is judged, and no row reads drift.</p>"
    else:
        judged = ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>chestct monitor: {esc(report["verdict"])}</title>
<style>
* {{ box-sizing: border-box; }}
body {{ font-family: system-ui, sans-serif; max-width: 76rem; margin: 1.5rem auto;
        padding: 0 1rem; }}
table {{ border-collapse: collapse; margin: .5rem 0 1rem; max-width: 100%; }}
td, th {{ border: 1px solid #ccc; padding: .2rem .6rem; text-align: left; }}
tr.drift td {{ background: #f6d7a7; }}
#figures {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(22rem, 1fr));
            gap: .75rem; }}
figure {{ margin: 0; min-width: 0; }}
figure img {{ width: 100%; height: auto; display: block; }}
pre {{ background: #f4f4f4; padding: .6rem; white-space: pre-wrap;
       overflow-wrap: anywhere; }}
#rule {{ background: #eef3fb; padding: .6rem; }}
</style></head><body>
<h1>chestct monitor: {esc(report["verdict"])}</h1>
<pre id="verdict">{lines}</pre>
<p id="rule"><strong>Rule.</strong> {esc(report["rule"])}</p>
{judged}
<h2>Signals</h2>
<table><tr><th>signal</th><th>PSI</th><th>test</th><th>p-value</th><th>n</th><th></th></tr>
{"".join(_signal_rows(report))}</table>
<h2>Refused, abstain and out-of-distribution rates</h2>
<table><tr><th>flag</th><th>observed</th><th>expected</th><th>p-value</th><th></th>
<th>reasons</th></tr>
{"".join(_rate_rows(report))}</table>
<h2>Live performance (labelled through POST /feedback)</h2>
{_performance_html(report["performance"])}
<h2>Distributions: reference (valid + test) vs window</h2>
<div id="figures">{"".join(_figures(report))}</div>
<p>Thresholds: {esc(json.dumps(t))}. Generated {esc(report["generated_at"])}.
Research software; not a medical device.</p>
</body></html>
"""


def _signal_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for name, s in report["signals"].items():
        if not s.get("judged"):
            shown = "" if "psi" not in s else f"PSI {s['psi']:.3f}, p {s['p_value']:.3g}; "
            rows.append(
                f"<tr><td>{esc(name)}</td><td colspan=5>not judged: {esc(shown + s['why'])}"
                "</td></tr>"
            )
            continue
        mark = row_mark(s, report["thresholds"])
        rows.append(
            f"<tr class='{'drift' if s['drift'] else ''}'><td>{esc(name)}</td>"
            f"<td>{s['psi']:.3f}</td><td>{esc(s['test'])}</td><td>{s['p_value']:.3g}</td>"
            f"<td>{s['n']}</td><td>{esc(mark)}</td></tr>"
        )
    return rows


def _figures(report: dict[str, Any]) -> list[str]:
    signals = report["signals"]
    return [_figure(name, s) for name, s in signals.items() if "reference_fractions" in s]


def _figure(name: str, s: dict[str, Any]) -> str:
    """Reference and window fractions of one signal, drawn inline."""
    labels = s["categories"] if name == CLASS_SIGNAL else _bin_labels(BY_NAME[name].edges)
    png = _png_b64(labels, s["reference_fractions"], s["window_fractions"], f"{name}: {s['help']}")
    return (
        f"<figure><img alt='{esc(name)}: reference vs window' "
        f"src='data:image/png;base64,{png}'><figcaption>{esc(name)}: PSI {s['psi']:.3f}"
        f"</figcaption></figure>"
    )


def _rate_rows(report: dict[str, Any]) -> list[str]:
    rate_rows = []
    for flag, r in report["rates"].items():
        reasons = r.get("reasons")
        why = "" if not reasons else "; ".join(f"{k}: {v}" for k, v in reasons.items())
        if r.get("judged"):
            rate_rows.append(
                f"<tr class='{'drift' if r['drift'] else ''}'><td>{esc(flag)}</td>"
                f"<td>{r['observed']:.3f} ({r['count']} of {r['n']})</td>"
                f"<td>{r['expected']:.3f}</td><td>{r['p_value']:.3g}</td>"
                f"<td>{'DRIFT' if r['drift'] else 'ok'}</td><td>{esc(why)}</td></tr>"
            )
        else:
            rate_rows.append(
                f"<tr><td>{esc(flag)}</td><td colspan=4>not judged ({r['n']} counted)</td>"
                f"<td>{esc(why)}</td></tr>"
            )
    return rate_rows


def _performance_html(perf: dict[str, Any]) -> str:
    if not perf.get("live"):
        return "<p>No labelled predictions in the window (POST /feedback).</p>"
    rows = "".join(
        f"<tr><td>{k}</td><td>{perf['live'][k]:.3f}</td><td>{_fmt(perf['test'].get(k))}</td></tr>"
        for k in ("accuracy", "balanced_accuracy", "macro_f1")
    )
    return (
        f"<p>{perf['labelled']} labelled predictions"
        f"{'' if perf['judged'] else ' (too few to judge)'}"
        f"{'; DEGRADED' if perf.get('degraded') else ''}.</p>"
        f"<table><tr><th>metric</th><th>live</th><th>test (card)</th></tr>{rows}</table>"
    )
