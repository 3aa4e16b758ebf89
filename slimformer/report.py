"""The search report (markdown + self-contained HTML + Pareto plot) and the delivered model folder.

Every number in the report comes from the search's ``summary.json``: nothing is typed in by hand.
"""

from __future__ import annotations

import base64
import html
import shlex
import shutil
from pathlib import Path
from typing import Any

from slimformer import models
from slimformer.measure import hardware
from slimformer.pareto import Candidate
from slimformer.tasks import CARVED

COLUMNS = [("quality", "quality (tuning)", "{:.4f}"), ("quality_drop", "drop (pts)", "{:+.2f}"),
           ("latency_ms", "p50 ms", "{:.2f}"), ("speedup", "speed-up", "{:.2f}x"),
           ("size_mb", "size MB", "{:.2f}"), ("compression", "smaller", "{:.1f}x"),
           ("throughput", "items/s", "{:.0f}"), ("memory_mb", "model MB in RAM", "{:.0f}")]


def _is_lm(summary: dict[str, Any]) -> bool:
    return summary.get("task", {}).get("type") == "causal-lm"


def _columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The table columns; a language model's quality is perplexity (lower is better), its drop a % increase."""
    columns = COLUMNS if not _is_lm(summary) else [("quality", "perplexity (tuning)", "{:.2f}"),
                                                   ("quality_drop", "perplexity +%", "{:+.2f}")] + COLUMNS[2:]
    if summary.get("confidence") is not None:  # the bound the budget was held on, beside the measured drop
        bound = ("quality_drop_upper", f"drop bound ({100 * summary['confidence']:g}%)", "{:+.2f}")
        columns = [*columns[:2], bound, *columns[2:]]
    return columns


def _drop_words(summary: dict[str, Any], value: float) -> str:
    if _is_lm(summary):
        return f"its perplexity changes by {value:+.2f}% against the baseline's"
    return f"its quality drop is {value:+.2f} points"


def _drop_interval(conf: dict[str, Any]) -> str:
    ci = conf.get("quality_drop_on_eval_ci95")
    return "" if not ci else f" (paired 95% interval {ci[0]:+.2f} to {ci[1]:+.2f})"


def _confidence_words(summary: dict[str, Any]) -> str:
    if summary.get("confidence") is None:
        return ""
    return (f", quality drop held at {100 * summary['confidence']:g}% confidence (upper bound of a paired "
            "bootstrap against the baseline on the tuning split)")


def _fmt(c: Candidate, key: str, pattern: str) -> str:
    m = c.measurements.get(key)
    return "–" if m is None else pattern.format(m.value)


def candidate_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the candidates table, sorted by the objective; front and choice marked."""
    cands = [Candidate.from_dict(c) for c in summary["candidates"]]
    objective = summary["objective"]
    goal_max = objective == "throughput"
    cands.sort(key=lambda c: (-1 if goal_max else 1) * c.measurements[objective].value)
    chosen = (summary.get("chosen") or {}).get("name")
    columns = _columns(summary)
    header = ["candidate", "role"] + [title for _, title, _ in columns] + ["notes"]
    rows = []
    for c in cands:
        role = []
        if c.name == chosen:
            role.append("**chosen**")
        if c.name in summary["front"]:
            role.append("front")
        if c.name in summary.get("references", []):
            role.append("reference")
        rows.append([c.name, ", ".join(role)] + [_fmt(c, k, p) for k, _, p in columns] + ["; ".join(c.notes)])
    return header, rows


def side_by_side(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Baseline fp32, ONNX Runtime int8 of the baseline, and the chosen point, on tuning and eval; with the
    latencies re-timed side by side at the end of the search when it did that."""
    by_name = {c["name"]: Candidate.from_dict(c) for c in summary["candidates"]}
    conf = summary.get("confirmation") or {}
    timing = conf.get("timing") or {}
    refs = summary.get("references", [])
    picks = []
    for name in refs:
        fp32 = name.endswith("-fp32")
        label = "baseline fp32 (PyTorch)" if fp32 else "baseline, ONNX Runtime dynamic int8"
        key = "baseline" if fp32 else "ort_int8_baseline"
        picks.append((label, by_name.get(name), conf.get(key), key))
    if summary.get("chosen"):
        picks.append(("**chosen**: " + summary["chosen"]["name"], Candidate.from_dict(summary["chosen"]),
                      conf.get("chosen"), "chosen"))
    columns = _columns(summary)
    header = ["model", f"eval {'perplexity' if _is_lm(summary) else 'metric'} (95% CI)"]
    header += [title for _, title, _ in columns]
    if timing:
        header += [f"p50 ms, side by side ({timing['rounds']} rounds)", "speed-up, side by side"]
    rows = []
    for label, c, q, key in picks:
        if c is None:
            continue
        ev = "–" if not q else f"{q['value']:.4f} ({q['ci95'][0]:.4f}–{q['ci95'][1]:.4f})"
        row = [label, ev] + [_fmt(c, k, p) for k, _, p in columns]
        if timing:
            p50, up = timing["latency_ms_median"].get(key), timing["speedup"].get(key)
            row += ["–" if p50 is None else f"{p50:.2f}", "–" if up is None else f"{up:.2f}x"]
        rows.append(row)
    return header, rows


def _timing_note(summary: dict[str, Any]) -> str:
    timing = (summary.get("confirmation") or {}).get("timing")
    if not timing:
        return ""
    return (f"The side-by-side columns re-time these three models in {timing['rounds']} interleaved rounds after "
            "the search, so load that came and went during it hits them alike; the search's own columns timed "
            "the baseline first and each candidate once. Quote the side-by-side speed-ups.")


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    def cell(x: str, tag: str) -> str:
        text = html.escape(x).replace("**", "")
        return f"<{tag}><b>{text}</b></{tag}>" if x.startswith("**") or "**chosen**" in x else f"<{tag}>{text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(x, "td") for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def pareto_plot(summary: dict[str, Any], path: Path) -> Path:
    """Quality against the objective for every candidate; the front as a line; the choice starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objective = summary["objective"]
    cands = [Candidate.from_dict(c) for c in summary["candidates"]]
    front = [c for c in cands if c.name in summary["front"]]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = {"fp32": "#1f77b4", "bf16": "#9467bd", "torch-dynamic-int8": "#8c564b", "ort-fp32": "#17becf",
              "ort-dynamic-int8": "#ff7f0e", "ort-static-int8": "#d62728", "ort-dynamic-int8-emb4": "#bcbd22"}
    for prec, color in colors.items():
        pts = [c for c in cands if c.params.get("precision") == prec]
        if pts:
            ax.scatter([c.value(objective) for c in pts], [c.value("quality") for c in pts], s=28, alpha=0.75,
                       color=color, label=prec)
    front.sort(key=lambda c: c.value(objective))
    ax.plot([c.value(objective) for c in front], [c.value("quality") for c in front], "--", color="grey",
            lw=1, label="Pareto front")
    for name in summary.get("references", []):
        c = next((x for x in cands if x.name == name), None)
        if c:
            ax.annotate("baseline" if name.endswith("-fp32") else "baseline ORT int8",
                        (c.value(objective), c.value("quality")), textcoords="offset points", xytext=(6, -12),
                        fontsize=8)
    if summary.get("chosen"):
        c = Candidate.from_dict(summary["chosen"])
        ax.scatter([c.value(objective)], [c.value("quality")], marker="*", s=260, color="gold", edgecolor="black",
                   zorder=5, label="chosen")
    base_q = summary["baseline"]["quality"]["value"]
    for b in summary["budget"]:
        if "<" not in b:
            continue
        bound = float(b.split("=")[-1].split("<")[-1].rstrip("%"))
        if b.startswith("perplexity_increase") or (_is_lm(summary) and b.startswith("quality_drop")):
            line = base_q * (1 + bound / 100)
        elif b.startswith("perplexity_ratio"):
            line = base_q * bound
        elif "drop" in b:
            line = base_q - bound / 100
        else:
            continue
        ax.axhline(line, color="green", lw=0.8, ls=":", label=f"budget ({b})")
    if objective in ("latency_ms", "size_mb", "memory_mb"):
        ax.set_xscale("log")
    unit = {"latency_ms": "p50 latency (ms, log)", "size_mb": "size on disk (MB, log)", "throughput": "items/s",
            "memory_mb": "peak memory (MB, log)"}[objective]
    ax.set_xlabel(unit)
    if _is_lm(summary):
        ax.set_ylabel("perplexity on the tuning split (lower is better)")
        ax.invert_yaxis()  # better stays up, as for accuracy
    else:
        ax.set_ylabel(f"{summary['task']['type']} metric on the tuning split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("slimformer search: every candidate, measured on this machine")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def reproduce_command(config, model: str, data: str, out: str, tuning_source: str | None = None) -> str:
    parts = ["slimformer", "search", "--model", model, "--data", data, "--objective", config.objective,
             "--budget", config.budget, "--trials", str(config.trials), "--seed", str(config.seed), "--out", out]
    if config.time_budget_s:
        parts += ["--time-budget", f"{int(config.time_budget_s)}s"]
    if config.confidence is not None:
        parts += ["--confidence", f"{config.confidence:g}"]
    if config.tie_tolerance != type(config).model_fields["tie_tolerance"].default:
        parts += ["--tie-tolerance", f"{config.tie_tolerance:g}"]
    if tuning_source not in (None, CARVED):
        parts += ["--tuning-split", "dev"]
    for student in config.students:
        parts += ["--student", student]
    return shlex.join(parts)


def write_report(out: Path, summary: dict[str, Any], config, *, model: str) -> Path:
    """report.md, report.html (self-contained, plot embedded) and pareto.png in ``out``."""
    png = pareto_plot(summary, out / "pareto.png")
    hw = hardware()
    cand_h, cand_r = candidate_rows(summary)
    side_h, side_r = side_by_side(summary)
    conf = summary.get("confirmation") or {}
    chosen = summary.get("chosen")
    if chosen:
        holds = conf.get("budget_holds_on_eval")
        verdict = (f"Chosen: `{chosen['name']}`. On the eval split ({summary['task']['eval_source']}), which "
                   f"training and search never saw, {_drop_words(summary, conf.get('quality_drop_on_eval', 0))}"
                   f"{_drop_interval(conf)}: "
                   f"the budget **{'holds' if holds else 'does NOT hold'}** there.")
    else:
        verdict = "No candidate met the budget on the tuning split. The frontier below shows what is reachable."
    students = summary.get("students") or {}
    given = "".join([" Students given, used instead of distilling at their depths: ",
                     ", ".join(f"depth {d} `{p}`" for d, p in sorted(students.items())), "."]) if students else ""
    cmd = reproduce_command(config, model, summary["task"]["source"].rsplit("/", 1)[0], summary["out"],
                            summary["task"].get("tuning_source"))
    md = "\n\n".join([
        "# slimformer search report",
        f"Model `{model}`, task {summary['task']['type']}, data `{summary['task']['source']}`; objective "
        f"**{summary['objective']}**, budget `{', '.join(summary['budget'])}`"
        f"{_confidence_words(summary)}; {len(summary['candidates'])} "
        f"candidates ({summary.get('failed_trials', 0)} failed trials) in {summary['seconds'] / 60:.1f} min.{given}",
        verdict,
        "## Side by side",
        _md_table(side_h, side_r),
        _timing_note(summary),
        "![Pareto plot](pareto.png)",
        "## All candidates",
        f"Quality on the tuning split ({summary['task'].get('tuning_source', CARVED)}); latency at batch "
        f"{config.batch}, sequence {config.seq}, {config.threads or 'all'} threads, {config.runs} timed runs; "
        f"throughput at batch {config.throughput_batch}.",
        _md_table(cand_h, cand_r),
        "## Hardware and versions",
        f"CPU: {hw['cpu']} ({hw['logical_cpus']} logical CPUs), flags: {' '.join(hw['cpu_flags']) or 'none'}. "
        "int8 and bf16 speed depends on these flags (VNNI, AMX): re-measure on the target machine.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in hw["versions"].items()),
        "## Reproduce",
        f"```bash\n{cmd}\n```",
    ])
    (out / "report.md").write_text(md + "\n")
    img = base64.b64encode(png.read_bytes()).decode()
    body = [
        "<h1>slimformer search report</h1>",
        f"<p>{html.escape(md.split(chr(10) * 2)[1])}</p>",
        f"<p>{html.escape(verdict).replace('**', '')}</p>",
        "<h2>Side by side</h2>", _html_table(side_h, side_r), f"<p>{html.escape(_timing_note(summary))}</p>",
        f'<p><img alt="Pareto plot" src="data:image/png;base64,{img}"></p>',
        "<h2>All candidates</h2>", _html_table(cand_h, cand_r),
        "<h2>Hardware and versions</h2>",
        f"<p>CPU: {html.escape(hw['cpu'])}, flags: {html.escape(' '.join(hw['cpu_flags']))}</p>",
        f"<p>{html.escape(', '.join(f'{k} {v}' for k, v in hw['versions'].items()))}</p>",
        f"<h2>Reproduce</h2><pre>{html.escape(cmd)}</pre>",
    ]
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
             "font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>slimformer report"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n")
    return out / "report.md"


def deliver_best(chosen: Candidate, best: Path, task, confirmation: dict[str, Any], config, *, model: str,
                 data: str) -> Path:
    """Copy the chosen model to ``best/`` (reloadable), add its ONNX export and a model card."""
    from slimformer.export import export_onnx, is_onnx_folder

    src = Path(chosen.path)

    def write(tmp: Path) -> None:
        shutil.copytree(src, tmp)
        if not is_onnx_folder(src):
            slim = models.load(src)
            try:
                export_onnx(slim, tmp / "onnx")
            except Exception as e:  # some PyTorch quantized kernels have no ONNX form; say so in the card
                (tmp / "onnx-export-failed.txt").write_text(f"{type(e).__name__}: {e}\n")
        record = models.read_record(tmp)
        record["measurements"] = {k: vars(v) for k, v in chosen.measurements.items()}
        record["search"] = {"params": chosen.params, "confirmation": confirmation}
        models.write_record(tmp, record)
        (tmp / "README.md").write_text(model_card(chosen, confirmation, config, model=model, data=data,
                                                  tuning_source=task.describe().get("tuning_source")))

    return models.atomic_dir(best, write)


def model_card(chosen: Candidate, confirmation: dict[str, Any], config, *, model: str, data: str,
               tuning_source: str | None = None) -> str:
    m = chosen.measurements
    hw = hardware()
    ev = confirmation.get("chosen", {})
    base = confirmation.get("baseline", {})
    lines = [
        f"# {chosen.name}",
        f"A compressed version of `{model}` made by slimformer for the data `{data}`.",
        "",
        "| quantity | value |", "| --- | --- |",
        f"| eval {ev.get('metric', 'metric')} | {ev.get('value', float('nan')):.4f} "
        f"(95% CI {ev.get('ci95', [0, 0])[0]:.4f}–{ev.get('ci95', [0, 0])[1]:.4f}, n={ev.get('n')}) |",
        f"| baseline eval {base.get('metric', 'metric')} | {base.get('value', float('nan')):.4f} |",
        f"| quality drop on eval | {confirmation.get('quality_drop_on_eval', float('nan')):+.2f} "
        f"{'% (perplexity increase)' if ev.get('metric') == 'perplexity' else 'points'}"
        f"{_drop_interval(confirmation)} |",
        f"| p50 latency (b{config.batch}, s{config.seq}) | {m['latency_ms'].value:.2f} ms |",
        f"| speed-up vs fp32 | {m['speedup'].value:.2f}x |" if "speedup" in m else "",
        f"| speed-up vs fp32, re-timed side by side ({confirmation['timing']['rounds']} interleaved rounds) | "
        f"{confirmation['timing']['speedup']['chosen']:.2f}x |" if confirmation.get("timing") else "",
        f"| size on disk | {m['size_mb'].value:.2f} MB |",
        f"| smaller than fp32 | {m['compression'].value:.1f}x |" if "compression" in m else "",
        f"| throughput (b{config.throughput_batch}) | {m['throughput'].value:.0f} items/s |",
        "",
        f"Recipe: {chosen.params}.",
        f"Measured on {hw['cpu']} with flags {' '.join(hw['cpu_flags'])}; timings depend on the CPU.",
        "",
        "Reproduce:",
        "",
        "```bash",
        reproduce_command(config, model, data.rsplit("/", 1)[0], "runs/search", tuning_source),
        "```",
    ]
    return "\n".join(x for x in lines if x is not None) + "\n"
