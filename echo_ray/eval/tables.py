"""The outputs of an evaluation: the results table (Markdown), the per-label F1 table, the
quality-vs-speed plot, and write_outputs, which writes every file under `--out`.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from echo_ray.data.storage import Location
from echo_ray.eval.label_metrics import format_f1_table

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
    return "\n".join(parts) + "\n"


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
