"""The outputs of an evaluation: the results table (Markdown), the per-label F1 table, the
95% intervals and paired differences (format_intervals), the quality-vs-speed plot, and
write_outputs, which writes every file under `--out`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from echo_ray.data.storage import Location
from echo_ray.eval.bootstrap import INTERVAL_KEYS, UNIT_WORDS
from echo_ray.eval.label_metrics import format_f1_table
from echo_ray.eval.scoring import PAIRED_KEY
from echo_ray.text.labels import CHEXPERT_LABELS

RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.json", "results.md", "quality_vs_speed.png"
REPORTS_FILE, RUN_FILE = "reports.parquet", "run.json"
MAJORITY_ROW = "majority (train)"


_TABLE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (key, header, format)
    ("mode", "decoding", "s"),
    ("num_reports", "reports", "d"),
    ("ce_f1_micro14", "CE F1 mi14", ".3f"),
    ("ce_f1_macro14", "CE F1 ma14", ".3f"),
    ("ce_f1_micro5", "CE F1 mi5", ".3f"),
    ("ce_f1_micro14_uncertain_positive", "mi14 (u=1)", ".3f"),
    ("semscore", "SemScore", ".3f"),
    ("rouge_l", "ROUGE-L", ".3f"),
    ("bleu4", "BLEU-4", ".3f"),
    ("fluency_ppl", "fluency PPL", ".2f"),
    ("ratescore", "RaTEScore", ".3f"),
    ("known_sentences", "known sent.", ".1%"),
    ("tokens_per_forward", "tok/fwd", ".2f"),
    ("tokens_per_s", "tok/s", ".0f"),
    ("ms_per_report", "ms/report", ".1f"),
    ("forwards_per_report", "fwd/report", ".1f"),
)


def format_results_table(
    results: dict[str, dict[str, Any]], baseline: dict[str, Any] | None = None
) -> str:
    """The systems x figures table, as Markdown (readable as plain text too); the
    majority-class baseline's CE F1 as a last row when given."""
    header = ["system"] + [title for _, title, _ in _TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    rows = dict(results)
    if baseline is not None:
        rows[MAJORITY_ROW] = {"mode": "-", **baseline}
    for name, fig in rows.items():
        cells = [name]
        for key, _, fmt in _TABLE_COLUMNS:
            value = fig.get(key)
            cells.append("n/a" if value is None else format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_results_markdown(results: dict[str, dict[str, Any]], run: dict[str, Any]) -> str:
    baseline = run.get("majority_baseline")
    columns = {**results, **({MAJORITY_ROW: baseline} if baseline else {})}
    per_label = {n: {"per_label": {k: {"f1": v} for k, v in f["per_label_f1"].items()},
                     **{f"f1_{k}": f[f"ce_f1_{k}"] for k in ("micro14", "macro14", "micro5",
                                                             "macro5")}}
                 for n, f in columns.items() if f.get("per_label_f1")}
    parts = [
        f"# echo-ray evaluation: {run['split']} split of {run['data']}",
        "",
        format_results_table(results, baseline),
        "",
        "Notes:",
        *(f"- {key}: {text}" for key, text in run["notes"].items()),
        "- systems: " + "; ".join(f"{n} = {s['path']} ({s['mode']})"
                                  for n, s in run["systems"].items()),
    ]
    if per_label:
        parts += ["", "Per-label CE F1 (uncertain = negative):", "", "```",
                  format_f1_table(per_label), "```"]
    intervals = format_intervals(results, run)
    if intervals:
        parts += ["", intervals]
    return "\n".join(parts) + "\n"


# Titles and formats of the figures with an interval: the results table's where it has them.
_FIGURE_TITLES: dict[str, tuple[str, str]] = {
    **{key: (title, fmt) for key, title, fmt in _TABLE_COLUMNS},
    "ce_f1_macro5": ("CE F1 ma5", ".3f"),
    "ce_f1_macro14_uncertain_positive": ("ma14 (u=1)", ".3f"),
    "ce_f1_micro5_uncertain_positive": ("mi5 (u=1)", ".3f"),
    "ce_f1_macro5_uncertain_positive": ("ma5 (u=1)", ".3f"),
}
# The per-label table's summary rows: (key, title), as format_f1_table names them.
_SUMMARY_ROWS = (("ce_f1_micro14", "micro F1 (14)"), ("ce_f1_macro14", "macro F1 (14)"),
                 ("ce_f1_micro5", "micro F1 (5)"), ("ce_f1_macro5", "macro F1 (5)"))


def _with_interval(value: float | None, interval: list[float] | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    if interval is None:
        return format(value, fmt)
    lo, hi = interval
    return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(row) + " |" for row in rows)]


def format_intervals(results: dict[str, dict[str, Any]], run: dict[str, Any]) -> str:
    """The 95% bootstrap intervals as Markdown: every quality figure (rows) of every system
    and the majority baseline (columns), "value [lo, hi]"; the per-label CE F1 the same
    way; then, with evaluate.compare_to, one table per other system of its paired
    differences. Empty when the evaluation ran without bootstrap resamples."""
    options = run.get("options", {})
    samples = options.get("bootstrap_samples")
    columns = {n: f for n, f in results.items() if f.get("ci95")}
    baseline = run.get("majority_baseline")
    if baseline and baseline.get("ci95"):
        columns[MAJORITY_ROW] = baseline
    if not samples or not columns:
        return ""
    units = UNIT_WORDS[options.get("bootstrap_unit", "study")]
    parts = [f"95% bootstrap intervals, [2.5th, 97.5th] percentile of {samples} resamples of "
             f"the {units} (seed {options.get('bootstrap_seed')}); speed figures have none:",
             ""]
    rows = []
    for key in INTERVAL_KEYS:
        if not any(f.get(key) is not None for f in columns.values()):
            continue
        title, fmt = _FIGURE_TITLES[key]
        rows.append([title, *(_with_interval(f.get(key), (f["ci95"] or {}).get(key), fmt)
                              for f in columns.values())])
    parts += _markdown(["figure", *columns], rows)
    label_rows = [[name, *(_with_interval(f["per_label_f1"][name],
                                          f["ci95"]["per_label_f1"][name], ".3f")
                           for f in columns.values())] for name in CHEXPERT_LABELS]
    label_rows += [[title, *(_with_interval(f.get(key), f["ci95"].get(key), ".3f")
                             for f in columns.values())] for key, title in _SUMMARY_ROWS]
    parts += ["", "Per-label CE F1 (uncertain = negative) with 95% bootstrap intervals:", "",
              *_markdown(["label", *columns], label_rows)]
    compared = {n: f[PAIRED_KEY] for n, f in results.items() if f.get(PAIRED_KEY)}
    for name, paired in compared.items():
        vs = paired["vs"]
        parts += ["", f"Paired bootstrap difference {name} - {vs} on the {paired['num_images']} "
                      f"images both scored ({paired['num_units']} {units}, resampled together); "
                      "P(diff <= 0) is the share of resamples where the difference is <= 0:",
                  ""]
        figures = paired["figures"]
        rows = [[_FIGURE_TITLES[key][0], *_difference_cells(figures[key],
                                                            _FIGURE_TITLES[key][1])]
                for key in INTERVAL_KEYS if key in figures]
        rows += [[label, *_difference_cells(figures["per_label_f1"][label], ".3f")]
                 for label in CHEXPERT_LABELS if "per_label_f1" in figures]
        parts += _markdown(["figure", f"{name} - {vs}", "95% interval", "P(diff <= 0)"], rows)
    return "\n".join(parts)


def _difference_cells(difference: dict[str, Any], fmt: str) -> list[str]:
    value, interval, share = difference["diff"], difference["ci95"], difference["frac_le_0"]
    return ["n/a" if value is None else format(value, "+" + fmt),
            "n/a" if interval is None else f"[{interval[0]:+{fmt}}, {interval[1]:+{fmt}}]",
            "n/a" if share is None else f"{share:.3f}"]


def plot_quality_vs_speed(results: dict[str, dict[str, Any]], path: str) -> None:
    """Two panels, CE F1 (micro, 14 labels) and SemScore against tokens/s (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    shown = {n: f for n, f in results.items() if f.get("tokens_per_s")}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, key, title in ((axes[0], "ce_f1_micro14", "CE F1, micro over 14 labels"),
                           (axes[1], "semscore", "SemScore")):
        points = {n: (f["tokens_per_s"], f[key]) for n, f in shown.items()
                  if f.get(key) is not None}
        for name, (x, y) in points.items():
            ax.scatter(x, y, s=50)
            # Systems of similar speed sit close: the lower one is labelled below its point.
            lower = any(y < y2 for n2, (x2, y2) in points.items()
                        if n2 != name and max(x, x2) / min(x, x2) < 1.3)
            ax.annotate(f"{name}\n({shown[name]['tokens_per_forward']:.1f} tok/fwd)", (x, y),
                        textcoords="offset points", xytext=(6, -22 if lower else 4), fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.margins(x=0.3)  # room for the labels of the outermost points
        ax.set_xlabel("tokens/s (log scale)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs speed")
        ax.grid(True, which="both", alpha=0.3)
        values = [f[key] for f in shown.values() if f.get(key) is not None]
        if values:
            ax.set_ylim(0, max(1.0, max(values) * 1.1) if key == "semscore"
                        else max(0.1, max(values) * 1.25))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(dst: Location, results: dict[str, dict[str, Any]],
                  tables: dict[str, pa.Table], run: dict[str, Any]) -> None:
    """results.json, results.md, the plot, reports.parquet and run.json under `dst`."""
    dst.fs.create_dir(dst.path, recursive=True)
    dst.join(RESULTS_FILE).write_text(json.dumps(results, indent=2, sort_keys=True))
    dst.join(TABLE_FILE).write_text(format_results_markdown(results, run))
    dst.join(RUN_FILE).write_text(json.dumps(run, indent=2, sort_keys=True, default=str))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, PLOT_FILE)
        plot_quality_vs_speed(results, local)
        with open(local, "rb") as f:
            dst.join(PLOT_FILE).write_bytes(f.read())
    reports = pa.concat_tables([
        t.append_column("system", pa.array([name] * t.num_rows, pa.string()))
        .append_column("decoding", pa.array([run["systems"][name]["mode"]] * t.num_rows,
                                            pa.string()))
        for name, t in tables.items()
    ])
    with dst.fs.open_output_stream(dst.join(REPORTS_FILE).path) as f:
        pq.write_table(reports, f)
