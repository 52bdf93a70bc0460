"""`kdship report`: an HTML page (self-contained, plots embedded) and a Markdown twin, built afterwards from saved
artifacts only: accuracy and retention, per-class table, export parity, latency and throughput plots per backend,
an accuracy-vs-latency Pareto plot when several students exist, and the recipe of every model."""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path
from typing import Any

import yaml

from kdship.artifacts import atomic_write_bytes, atomic_write_text
from kdship.config import ReportConfig
from kdship.errors import ConfigError
from kdship.runs import Runs, collect, headline_metrics, is_lm_eval


MIN_ACCURACY_SPAN = 0.05

# ---- plots -----------------------------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 3.8), dpi=110)


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", bbox_inches="tight")  # long annotations and labels are not clipped
    plt.close(fig)
    return buffer.getvalue()


def bench_plots(bench: dict[str, Any]) -> dict[str, bytes]:
    """Per backend and sequence length: p50 latency vs batch, and throughput vs batch, one line per model."""
    rows = bench["results"]
    plots = {}
    for backend in sorted({r["backend"] for r in rows}):
        for seq in sorted({r["seq"] for r in rows if r["backend"] == backend}):
            points = [r for r in rows if r["backend"] == backend and r["seq"] == seq]
            for metric, label in (("p50_ms", "p50 latency (ms)"), ("sequences_per_s", "throughput (sequences/s)")):
                fig, ax = _figure()
                for model in dict.fromkeys(r["model"] for r in points):
                    line = sorted((r["batch"], r[metric]) for r in points if r["model"] == model)
                    ax.plot([b for b, _ in line], [v for _, v in line], marker="o", label=model)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch size")
                ax.set_ylabel(label)
                ax.set_title(f"{backend}, seq {seq} ({bench['device']})")
                ax.grid(alpha=0.3)
                ax.legend()
                kind = "latency" if metric == "p50_ms" else "throughput"
                plots[f"{kind}_{backend}_seq{seq}"] = _png(fig)
    return plots


def training_curves(runs: Runs) -> bytes | None:
    """Each trained model's evaluations over its steps (the history in its kdship.json), one line per model and
    metric that was evaluated more than once."""
    lines = []
    for folder, record in runs.models.items():
        history = record.get("history") or []
        for metric in ("accuracy", "agreement", "mlm_loss", "lm_loss", "recall_at_1"):
            points = [(h["step"], h[metric]) for h in history if metric in h]
            if len(points) > 1:
                lines.append((f"{Path(folder).name} {metric}", points))
    if not lines:
        return None
    fig, ax = _figure()
    for label, points in lines:
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("evaluation")
    ax.set_title("training curves (eval split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def pareto_points(runs: Runs) -> list[dict[str, Any]]:
    """(model, accuracy, p50 latency) for models that were both evaluated and benchmarked, at one common point."""
    accuracy = {}
    for folder, record in runs.models.items():
        value = (record.get("metrics") or {}).get("accuracy")
        if value is not None:
            accuracy[Path(folder).name] = value
    for ev in runs.evals.values():
        for role in ("teacher", "student"):
            if role in ev and "accuracy" in ev[role]:  # retrieval models (recall@1) are not on this plot
                accuracy[Path(ev[role]["source"]).name] = ev[role]["accuracy"]
    points = []
    for bench in runs.benches.values():
        rows = bench["results"]
        ref = max(rows, key=lambda r: (r["backend"] == rows[0]["backend"], r["batch"] == 1, -r["seq"]))
        for r in rows:
            same_point = (r["backend"], r["batch"], r["seq"]) == (ref["backend"], ref["batch"], ref["seq"])
            name = _accuracy_key(r, accuracy, bench)
            if same_point and name in accuracy:
                points.append({"model": r["model"], "accuracy": accuracy[name], "p50_ms": r["p50_ms"],
                               "at": f"{r['backend']} batch {r['batch']} seq {r['seq']}"})
    return points


def _accuracy_key(row: dict[str, Any], accuracy: dict[str, float], bench: dict[str, Any]) -> str | None:
    """A benchmarked artifact is known by the model it was exported from."""
    if row["model"] in accuracy:
        return row["model"]
    facts = next((m for m in bench["models"] if m["name"] == row["model"]), {})
    metrics = facts.get("metrics") or {}
    if "accuracy" in metrics:
        accuracy[row["model"]] = metrics["accuracy"]
        return row["model"]
    return None


def accuracy_axis(values: list[float]) -> tuple[float, float]:
    """An accuracy axis at least MIN_ACCURACY_SPAN tall, within [0, 1]: 0.9975 vs 0.9988 (one example in 800)
    must not fill the plot and look like a trade-off."""
    low, high = min(values), max(values)
    span = max(high - low, MIN_ACCURACY_SPAN) * 1.2
    bottom = max(0.0, min((low + high) / 2 - span / 2, 1.0 - span))
    return bottom, min(1.0, bottom + span)


def pareto_plot(points: list[dict[str, Any]]) -> bytes:
    fig, ax = _figure()
    ordered = sorted(points, key=lambda p: p["p50_ms"])
    frontier, best = [], -1.0
    for p in ordered:
        if p["accuracy"] > best:
            frontier.append(p)
            best = p["accuracy"]
    ax.scatter([p["p50_ms"] for p in points], [p["accuracy"] for p in points], zorder=3)
    ax.plot([p["p50_ms"] for p in frontier], [p["accuracy"] for p in frontier], linestyle="--", alpha=0.6,
            label="Pareto frontier")
    for p in points:
        ax.annotate(p["model"], (p["p50_ms"], p["accuracy"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"p50 latency (ms), {points[0]['at']}")
    ax.set_ylabel("accuracy")
    ax.set_ylim(*accuracy_axis([p["accuracy"] for p in points]))
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


# ---- tables ----------------------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)


def eval_tables(ev: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    roles = [r for r in ("teacher", "student") if r in ev]
    rows = [[metric, *(_fmt(ev[r][metric]) for r in roles)] for metric in headline_metrics(ev)]
    rows += [[k, *([""] * (len(roles) - 1)), _fmt(v)] for k, v in ev.get("comparison", {}).items()]
    tables = [(f"Teacher vs student on {ev['data']['source']} (n={ev['data']['n']})", ["metric", *roles], rows)]
    if "per_class" in ev["student"]:
        per_class = [[name, _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), str(c["support"])]
                     for name, c in ev["student"]["per_class"].items()]
        tables.append(("Student per class", ["label", "precision", "recall", "f1", "support"], per_class))
    if ev.get("generations", {}).get("samples"):
        generations = [[g["prompt"], *(g.get(r, "") for r in roles)] for g in ev["generations"]["samples"]]
        tables.append((f"Greedy generations (at most {ev['generations']['max_new_tokens']} new tokens)",
                       ["prompt", *roles], generations))
    return tables


def parity_table(folder: str, manifest: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for name, v in manifest["variants"].items():
        p = v["parity"]
        size = Path(folder, v["file"]).stat().st_size / 2**20 if Path(folder, v["file"]).exists() else None
        rows.append([name, v["file"], v["precision"], f"{p['max_abs']:.2e}", _fmt(p["agreement"]),
                     _fmt(p.get("accuracy")), _fmt(p.get("accuracy_drop")), _tolerance(p.get("tolerance") or {}),
                     f"{size:.2f}" if size else "", "✓" if p["passed"] else "✗"])
    header = ["variant", "file", "precision", "max abs", "agreement", "accuracy", "accuracy drop", "tolerance", "MB",
              ""]
    return f"Export parity: {Path(folder).name}", header, rows


def _tolerance(t: dict[str, Any]) -> str:
    """What the ✓ beside it was checked against."""
    parts = [f"max abs ≤ {t['max_abs']:.0e}"] if t.get("max_abs") is not None else []
    parts += [f"agreement ≥ {t['min_agreement']:.2f}"] if t.get("min_agreement") is not None else []
    return ", ".join(parts)


def gate_table(folder: str, verdict: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    rows = [["✓" if c["passed"] else "✗", c["name"], _fmt(c["measured"]), f"{c['op']} {_fmt(c['limit'])}"]
            for c in verdict["checks"]]
    passed = sum(c["passed"] for c in verdict["checks"])
    title = (f"Gate: {'passed' if verdict['passed'] else 'FAILED'} ({passed} of {len(verdict['checks'])} checks), "
             f"{Path(folder).name}/gate.json")
    return title, ["", "check", "measured", "limit"], rows


def _speedup(r: dict[str, Any]) -> str:
    if not r["speedup_vs_baseline"]:
        return ""
    low, high = r.get("speedup_ci95") or (r["speedup_vs_baseline"],) * 2
    return f"{r['speedup_vs_baseline']:.2f}x ({low:.2f}-{high:.2f})"


def _settled(r: dict[str, Any]) -> str:
    return "yes" if r.get("stable", True) else "⚠ not settled: " + "; ".join(r.get("unstable_reasons", []))


def bench_table(bench: dict[str, Any]) -> tuple[str, list[str], list[list[str]]]:
    """Every measured point; a figure that did not settle is marked where it is read (its speedup too)."""
    rows = [[r["model"], r.get("file", ""), r["backend"], str(r["batch"]), str(r["seq"]), f"{r['p50_ms']:.3f}",
             f"{r['p90_ms']:.3f}" if "p90_ms" in r else "", f"{r['p99_ms']:.3f}", str(r.get("runs", "")),
             f"{r['sequences_per_s']:.1f}", _speedup(r) + ("" if r.get("stable", True) or not _speedup(r) else " ⚠"),
             _settled(r)]
            for r in bench["results"]]
    title = f"Latency and throughput on {bench['device']} ({bench['threads']} threads), speedup vs {bench['baseline']}"
    return title, ["model", "file", "backend", "batch", "seq", "p50 ms", "p90 ms", "p99 ms", "runs", "seq/s",
                   "speedup (95% interval)", "settled"], rows


def exit_items(bench: dict[str, Any]) -> list[Any]:
    """Per model with early exits: the accuracy at each threshold with where rows stop and the mean latency there
    (real eval texts one at a time, interleaved with all layers), and the accuracy/latency curve."""
    items: list[Any] = []
    for name, curve in bench.get("early_exit", {}).items():
        if "curve" not in curve:
            continue
        timing = curve["latency_over_inputs"]
        at = {p["threshold"]: p for p in timing["thresholds"]}
        table = [[f"{p['threshold']:g}", f"{p['accuracy']:.4f}", f"{p['mean_exit_layer']:.2f}",
                  f"{p['layers_saved']:.0%}", f"{at[p['threshold']]['mean_ms']:.3f}",
                  f"{at[p['threshold']]['speedup_vs_all_layers']:.2f}x",
                  " ".join(f"{k}:{v:.0%}" for k, v in p["exit_distribution"].items())] for p in curve["curve"]]
        table.append(["all layers", f"{curve['final_accuracy']:.4f}", str(curve["num_layers"]), "0%",
                      f"{timing['all_layers_mean_ms']:.3f}", "1.00x", ""])
        where = f"mean over {timing['inputs']} eval texts, batch 1, {bench['device']}"
        items.append((f"{name}: early exit ({curve['criterion']}, accuracy on {curve['n']} eval rows; latency: "
                      f"{where})", ["threshold", "accuracy", "mean exit layer", "layers saved", "mean ms",
                                    "speedup", "stops per layer"], table))
        measured = [(at[p["threshold"]]["mean_ms"], p["accuracy"], f"{p['threshold']:g}") for p in curve["curve"]]
        items.append(("plot", f"early_exit_{name}", exit_plot(name, measured, timing["all_layers_mean_ms"], curve,
                                                              where)))
    return items


def exit_plot(name: str, measured: list[tuple[float, float, str]], full_ms: float, curve: dict[str, Any],
              where: str) -> bytes:
    fig, ax = _figure()
    ax.plot([m[0] for m in measured], [m[1] for m in measured], marker="o", label="early exit")
    for latency, accuracy, threshold in measured:
        ax.annotate(threshold, (latency, accuracy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.scatter([full_ms], [curve["final_accuracy"]], marker="s", color="black", label="all layers")
    accuracies = [m[1] for m in measured] + [curve["final_accuracy"]]
    ax.set_ylim(bottom=min(accuracies) - 0.005, top=max(min(accuracies) + MIN_ACCURACY_SPAN, max(accuracies)) + 0.005)
    ax.margins(x=0.1)
    ax.set_xlabel(f"mean latency (ms), {where}")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name}: accuracy vs latency by exit threshold")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def model_table(runs: Runs) -> tuple[str, list[str], list[list[str]]]:
    rows = []
    for folder, r in runs.models.items():
        if r.get("command") == "distill-students":  # an index of the student folders, which are listed themselves
            continue
        params = (r.get("student") or r.get("model") or {}).get("parameters")
        training = r.get("training", {})
        metrics = r.get("metrics") or {}
        best = next((f"{k} {_fmt(metrics[k])}" for k in BEST_METRICS if k in metrics), "")
        rows.append([Path(folder).name, r.get("command", ""), _fmt(params), best, str(training.get("steps", "")),
                     _fmt(training.get("samples_per_second"))])
    return "Training runs", ["model", "made by", "parameters", "at its best eval", "steps", "train samples/s"], rows


BEST_METRICS = ("accuracy", "recall_at_1", "perplexity", "mlm_loss")  # what a record's best step is shown by


# ---- rendering -------------------------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.25rem .6rem;text-align:right}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:.5rem 0}
pre{background:#f7f7f7;padding:.8rem;overflow:auto;font-size:.85rem}h2{border-bottom:1px solid #ddd}"""
# Marks the page once every plot has decoded (checked by the browser test; harmless for readers).
ONLOAD = """<script>window.addEventListener('load',()=>{const i=[...document.images];
document.body.dataset.plotsRendered=i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length;});</script>"""


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<h3>{html.escape(title)}</h3><table><tr>{head}</tr>{body}</table>"


def _md_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def build_sections(runs: Runs) -> list[tuple[str, list[Any]]]:
    """(heading, [table tuples and ("plot", name, png) items]) in reading order."""
    sections = []
    ev = runs.main_eval()
    if ev:
        sections.append(("Quality" if is_lm_eval(ev) else "Accuracy", eval_tables(ev)))
    for folder, verdict in runs.gates.items():
        sections.append(("Gate", [gate_table(folder, verdict)]))
    if runs.models:
        curves = training_curves(runs)
        sections.append(("Models", [model_table(runs), *([("plot", "training_curves", curves)] if curves else [])]))
    if runs.artifacts:
        sections.append(("Export", [parity_table(f, m) for f, m in runs.artifacts.items()]))
    for folder, bench in runs.benches.items():
        items: list[Any] = [bench_table(bench)]
        items += [("plot", name, png) for name, png in bench_plots(bench).items()]
        items += exit_items(bench)
        sections.append((f"Speed: {Path(folder).name}", items))
    points = pareto_points(runs)
    if len(points) >= 2:
        sections.append(("Accuracy vs latency", [("plot", "pareto", pareto_plot(points))]))
    recipes = [(Path(f).name, yaml.safe_dump(r.get("config", {}), sort_keys=False)) for f, r in runs.models.items()]
    if recipes:
        sections.append(("Recipes", [("recipe", name, text) for name, text in recipes]))
    return sections


def render(sections: list[tuple[str, list[Any]]], title: str, assets: str) -> tuple[str, str, dict[str, bytes]]:
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><p>Built {created} from saved "
             "artifacts by kdship report.</p>"]
    md = [f"# {title}", "", f"Built {created} from saved artifacts by kdship report.", ""]
    images: dict[str, bytes] = {}
    for heading, items in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        md.append(f"## {heading}\n")
        for item in items:
            if item[0] == "plot":
                _, name, png = item
                images[f"{name}.png"] = png
                parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,"
                             f"{base64.b64encode(png).decode()}'>")
                md.append(f"![{name}]({assets}/{name}.png)\n")
            elif item[0] == "recipe":
                _, name, text = item
                parts.append(f"<h3>{html.escape(name)}</h3><pre>{html.escape(text)}</pre>")
                md.append(f"### {name}\n\n```yaml\n{text}```\n")
            else:
                parts.append(_html_table(*item))
                md.append(_md_table(*item))
    parts.append(ONLOAD + "</body></html>")
    return "".join(parts), "\n".join(md), images


def report(cfg: ReportConfig) -> dict[str, Any]:
    from kdship.manifest import verify

    out = Path(cfg.output)
    for path in (out, out.with_suffix(".md")):
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give the report's file path, e.g. {path / 'report.html'}")
    runs = collect(cfg.runs)
    if cfg.verify:  # parity figures are only worth showing for the files that were checked
        for folder, manifest in runs.artifacts.items():
            verify(Path(folder), manifest, None)
    assets = out.with_suffix("").name + "_assets"
    page, markdown, images = render(build_sections(runs), cfg.title, assets)
    for name, png in images.items():
        atomic_write_bytes(out.parent / assets / name, png)
    atomic_write_text(out.with_suffix(".md"), markdown)
    atomic_write_text(out, page)
    return {"output": str(out), "markdown": str(out.with_suffix(".md")), "plots": sorted(images)}
