"""`kdship gate`: accuracy and speed budgets checked against saved runs, for CI. Exit 0 when every budget holds,
1 when any fails, 2 on bad input. A ✓/✗ line per budget, JSON, JUnit XML, and an optional committed baseline."""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdship.artifacts import atomic_write_json, atomic_write_text, read_json
from kdship.config import Budgets, GateConfig, SpeedBudget, build_config
from kdship.errors import CheckFailed, ConfigError
from kdship.runs import Runs, collect, headline_metrics, is_lm_eval


@dataclass
class Check:
    name: str
    measured: float
    limit: float
    op: str  # ">=" or "<="
    passed: bool

    @staticmethod
    def of(name: str, measured: float, op: str, limit: float) -> "Check":
        return Check(name, measured, limit, op, measured >= limit if op == ">=" else measured <= limit)


def _eval_checks(budgets: Budgets, runs: Runs) -> list[Check]:
    wanted = {"min_accuracy": budgets.min_accuracy, "min_recall_at_1": budgets.min_recall_at_1,
              "min_retention": budgets.min_retention, "min_agreement": budgets.min_agreement}
    if all(v is None for v in wanted.values()):
        return []
    ev = runs.main_eval()
    if ev is None:
        raise ConfigError("accuracy budgets need an eval.json (kdship eval) among the run folders")
    if is_lm_eval(ev):
        raise ConfigError("this evaluation is of a causal LM, which has no accuracy or retention; budget it with "
                          "max_perplexity, max_perplexity_ratio and min_token_agreement")
    headline = headline_metrics(ev)[0]
    measured = {f"min_{headline}": ev["student"][headline],
                **{f"min_{k}": v for k, v in ev.get("comparison", {}).items()}}
    checks = []
    for key, limit in wanted.items():
        if limit is None:
            continue
        if key in ("min_accuracy", "min_recall_at_1") and key not in measured:
            raise ConfigError(f"budget {key} does not fit this evaluation, which measures {headline}; use "
                              f"min_{headline}")
        if key not in measured:
            raise ConfigError(f"budget {key} needs a teacher in the evaluation; run kdship eval --teacher ...")
        checks.append(Check.of(f"student {key.removeprefix('min_')}", measured[key], ">=", limit))
    return checks


def _lm_checks(budgets: Budgets, runs: Runs) -> list[Check]:
    """Causal-LM budgets on the evaluation: the student's perplexity, its ratio to the teacher's, and how often
    its top next token is the teacher's."""
    wanted = {"max_perplexity": budgets.max_perplexity, "max_perplexity_ratio": budgets.max_perplexity_ratio,
              "min_token_agreement": budgets.min_token_agreement}
    if all(v is None for v in wanted.values()):
        return []
    ev = runs.main_eval()
    if ev is None or not is_lm_eval(ev):
        raise ConfigError("causal-LM budgets (max_perplexity, max_perplexity_ratio, min_token_agreement) need the "
                          "eval.json of a causal LM (kdship eval STUDENT --teacher TEACHER --data TEXT) among the runs")
    measured = {"max_perplexity": ev["student"]["perplexity"], **{
        f"{'max' if k == 'perplexity_ratio' else 'min'}_{k}": v for k, v in ev.get("comparison", {}).items()}}
    checks = []
    for key, limit in wanted.items():
        if limit is None:
            continue
        if key not in measured:
            raise ConfigError(f"budget {key} needs a teacher in the evaluation; run kdship eval --teacher ...")
        checks.append(Check.of(f"student {key.split('_', 1)[1]}", measured[key], "<=" if key.startswith("max")
                               else ">=", limit))
    return checks


def _export_checks(budgets: Budgets, runs: Runs) -> list[Check]:
    checks = []
    if (budgets.max_accuracy_drop is not None or budgets.max_model_mb is not None) and not runs.artifacts:
        raise ConfigError("export budgets need an artifact folder (kdship export) among the run folders")
    for folder, manifest in runs.artifacts.items():
        for name, variant in manifest["variants"].items():
            drop = variant["parity"].get("accuracy_drop")
            if budgets.max_accuracy_drop is not None and drop is not None:
                checks.append(Check.of(f"{Path(folder).name} {name} accuracy drop", drop, "<=", budgets.max_accuracy_drop))
            if budgets.max_model_mb is not None:
                file = Path(folder) / variant["file"]
                if not file.exists():
                    raise ConfigError(f"{file} is listed in the manifest but missing; re-export the artifact")
                size = file.stat().st_size / 2**20
                checks.append(Check.of(f"{Path(folder).name} {variant['file']} size MB", size, "<=", budgets.max_model_mb))
    return checks


def _collapse_checks(runs: Runs) -> list[Check]:
    """One check per evaluated model whose record says whether it collapsed (kdship.sanity): a model that learned
    nothing fails the gate whatever the budgets say."""
    checks = []
    judged = {}  # folder -> (its checks, its metrics): kdship eval's verdict where there is one, else the record's
    for folder, record in runs.models.items():
        judged[folder] = (record.get("checks") or {}, record.get("metrics", {}))
    for folder, report in runs.evals.items():
        judged[folder] = (report.get("checks") or {}, report["student"])
    for folder, (found, metrics) in judged.items():
        if "collapsed" not in found:
            continue
        floor = max(found["baseline"]["majority_rate"], found["baseline"]["chance"])
        checks.append(Check(f"{Path(folder).name} not collapsed (accuracy above the majority-class rate)",
                            metrics.get("accuracy", 0.0), floor, ">", not found["collapsed"]))
    return checks


def _integrity_checks(runs: Runs) -> list[Check]:
    """One check per artifact: every file it lists is present and has the sha256 the export recorded."""
    from kdship.manifest import changed_files

    return [Check.of(f"{Path(folder).name} files changed since export", len(changed_files(Path(folder), manifest, None)),
                     "<=", 0) for folder, manifest in runs.artifacts.items()]


def _point(runs: Runs, budget: SpeedBudget) -> dict[str, Any]:
    for bench in runs.benches.values():
        model = budget.model or bench["results"][-1]["model"]
        for row in bench["results"]:
            if (row["backend"], row["batch"], row["seq"], row["model"]) == (budget.backend, budget.batch, budget.seq,
                                                                              model):
                return row
    have = sorted({(r["model"], r["backend"], r["batch"], r["seq"]) for b in runs.benches.values() for r in b["results"]})
    raise ConfigError(f"no bench result for {budget.model or 'the student'} on {budget.backend} batch {budget.batch} "
                      f"seq {budget.seq}; measured points: {have[:6]}{' ...' if len(have) > 6 else ''}")


def _speed_checks(budgets: Budgets, runs: Runs, allow_unstable: bool = False) -> list[Check]:
    if budgets.speed and not runs.benches:
        raise ConfigError("speed budgets need a bench folder (kdship bench -o DIR) among the run folders")
    checks = []
    for b in budgets.speed:
        row = _point(runs, b)
        where = f"{row['model']} {b.backend} b{b.batch} s{b.seq}"
        trusted = row.get("stable", True) or allow_unstable
        if not trusted:  # a noisy measurement passes no speed budget: it would pass or fail by chance
            where += f" [unstable: {'; '.join(row['unstable_reasons'])}; rerun the bench or pass --allow-unstable]"
        for field, key, op in (("max_p99_ms", "p99_ms", "<="), ("max_p50_ms", "p50_ms", "<="),
                               ("min_sequences_per_s", "sequences_per_s", ">="),
                               ("min_speedup", "speedup_vs_baseline", ">=")):
            limit = getattr(b, field)
            if limit is not None:
                check = Check.of(f"{where} {key}", row[key] or 0.0, op, limit)
                checks.append(check if trusted else Check(check.name, check.measured, limit, op, False))
    return checks


def _exit_checks(budgets: Budgets, runs: Runs) -> list[Check]:
    """Accuracy and layers saved at exit thresholds, from a bench's early_exit curves (or an eval.json's)."""
    if not budgets.early_exit:
        return []
    curves = {name: c for bench in runs.benches.values() for name, c in bench.get("early_exit", {}).items()
              if "curve" in c}
    curves |= {Path(folder).name: ev["student"]["early_exit"] for folder, ev in runs.evals.items()
               if "early_exit" in ev["student"]}
    if not curves:
        raise ConfigError("early-exit budgets need a curve: kdship bench --backend torch --exit-threshold ... -o DIR "
                          "(or kdship eval of the model with exits) among the run folders")
    checks = []
    for b in budgets.early_exit:
        name = b.model or list(curves)[-1]
        point = next((p for p in curves.get(name, {}).get("curve", []) if p["threshold"] == b.threshold), None)
        if point is None:
            raise ConfigError(f"no early-exit measurement of {name} at threshold {b.threshold:g}; measured: "
                              f"{ {n: [p['threshold'] for p in c['curve']] for n, c in curves.items()} }")
        for field, key in (("min_accuracy", "accuracy"), ("min_layers_saved", "layers_saved")):
            if getattr(b, field) is not None:
                checks.append(Check.of(f"{name} exit@{b.threshold:g} {key}", point[key], ">=", getattr(b, field)))
        if b.min_speedup is not None:
            timed = curves[name].get("latency_over_inputs")
            if timed is None:
                raise ConfigError(f"min_speedup at exit threshold {b.threshold:g} needs the bench's latency (kdship "
                                  "bench --backend torch --exit-threshold ... -o DIR), not an eval.json")
            speed = next(p for p in timed["thresholds"] if p["threshold"] == b.threshold)
            checks.append(Check.of(f"{name} exit@{b.threshold:g} speedup_vs_all_layers", speed["speedup_vs_all_layers"],
                                   ">=", b.min_speedup))
    return checks


def baseline_facts(runs: Runs) -> dict[str, float]:
    """What a baseline pins: the student's accuracy and every measured p99."""
    facts = {}
    ev = runs.main_eval()
    if ev:
        headline = headline_metrics(ev)[0]
        facts[f"student {headline}"] = ev["student"][headline]
    for bench in runs.benches.values():
        for r in bench["results"]:
            facts[f"{r['model']} {r['backend']} b{r['batch']} s{r['seq']} p99_ms"] = r["p99_ms"]
    return facts


def _baseline_checks(cfg: GateConfig, budgets: Budgets, facts: dict[str, float]) -> list[Check]:
    if not cfg.baseline or cfg.update_baseline:
        return []
    path = Path(cfg.baseline)
    if not path.is_file():
        raise ConfigError(f"baseline {path} not found; create it with --update-baseline")
    try:
        base = read_json(path)["facts"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"baseline {path} is not a kdship baseline (no facts); rewrite it with --update-baseline") from None
    checks = []
    tol = budgets.baseline_tolerance
    for key, value in facts.items():
        if key not in base:
            continue
        if key.endswith(("accuracy", "recall_at_1")):
            checks.append(Check.of(f"baseline: {key}", value, ">=", base[key] - tol.accuracy))
        elif key.endswith("perplexity"):
            checks.append(Check.of(f"baseline: {key}", value, "<=", base[key] * tol.perplexity_ratio))
        elif tol.latency_ratio is not None:
            checks.append(Check.of(f"baseline: {key}", value, "<=", base[key] * tol.latency_ratio))
    return checks


def junit_xml(checks: list[Check]) -> str:
    suite = ET.Element("testsuite", name="kdship.gate", tests=str(len(checks)),
                       failures=str(sum(not c.passed for c in checks)), timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname="kdship.gate", name=c.name)
        if not c.passed:
            ET.SubElement(case, "failure", message=f"measured {c.measured:.6g}, limit {c.op} {c.limit:.6g}")
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def gate(cfg: GateConfig) -> dict[str, Any]:
    budgets = build_config(Budgets, cfg.budgets, what="budgets file")
    runs = collect(cfg.runs)
    checks = (_eval_checks(budgets, runs) + _lm_checks(budgets, runs) + _export_checks(budgets, runs)
              + _exit_checks(budgets, runs) + _speed_checks(budgets, runs, cfg.allow_unstable))
    if checks and cfg.verify:  # an artifact changed after export passes no budget
        checks = _integrity_checks(runs) + checks
    facts = baseline_facts(runs)
    checks += _baseline_checks(cfg, budgets, facts)
    if not checks and not cfg.update_baseline:
        if budgets.model_fields_set - {"baseline_tolerance"}:
            raise ConfigError(f"the budgets in {cfg.budgets} found nothing to check in {', '.join(cfg.runs)}; give "
                              "the folders they measure (eval.json for accuracy, artifacts for export budgets, a "
                              "bench folder for speed)")
        raise ConfigError(f"budgets file {cfg.budgets} sets no budget; add e.g. min_accuracy: 0.8")
    checks = _collapse_checks(runs) + checks
    result = {"passed": all(c.passed for c in checks), "checks": [asdict(c) for c in checks], "facts": facts}
    if cfg.update_baseline:
        if not cfg.baseline:
            raise ConfigError("--update-baseline needs --baseline PATH to write")
        atomic_write_json(Path(cfg.baseline), {"kind": "kdship-baseline/1", "facts": facts})
    if cfg.json_out:
        atomic_write_json(Path(cfg.json_out), result)
    if cfg.junit:
        atomic_write_text(Path(cfg.junit), junit_xml(checks))
    return result


def print_gate(result: dict[str, Any]) -> None:
    from rich.markup import escape

    from kdship.ui import console

    out = console()
    for c in result["checks"]:
        mark = "[green]✓[/green]" if c["passed"] else "[red]✗[/red]"
        out.print(f"{mark} {escape(c['name'])}: {c['measured']:.6g} (limit {c['op']} {c['limit']:.6g})")
    failed = sum(not c["passed"] for c in result["checks"])
    out.print(f"{len(result['checks']) - failed} passed, {failed} failed")


def raise_if_failed(result: dict[str, Any]) -> None:
    failed = [c["name"] for c in result["checks"] if not c["passed"]]
    if failed:
        raise CheckFailed(f"{len(failed)} budget(s) failed: {', '.join(failed)}")
