"""Bulk reporting's consolidation at archive scale: time and peak memory vs number of studies.

Every night `echo-ray report` reads its whole ledger (`parts/`) and rewrites the final files
from it (`echo_ray.batch.ledger.consolidate`), so their cost grows with the archive, not with the
night's new studies. This bench writes a ledger of N synthetic report rows (part files of
`--unit-size` rows, realistic text and column sizes, no model involved), then times reading
the ledger (`read_ledger`: which studies are done) and the consolidation, each size in a fresh
process so that its peak memory (max RSS) is its own. Sizes run one after the other on the
same machine; the ratios (largest vs smallest) show how time and memory scale.

Prints a table, then one JSON line with every figure.

    python bench/consolidate.py [--studies 10000,100000] [--unit-size 64] [--fhir]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import resource
import shutil
import tempfile
import time

import pyarrow as pa

from echo_ray.batch.ledger import PART_SCHEMA, PARTS_DIR, consolidate, read_ledger
from echo_ray.config.schema import ReportConfig
from echo_ray.data.storage import resolve
from echo_ray.text.labels import CHEXPERT_LABELS

REPORT = (
    "FINDINGS: The heart size is normal. The mediastinal and hilar contours are unremarkable. "
    "No pleural effusion or pneumothorax. The lungs are clear. "
    "IMPRESSION: No acute cardiopulmonary process."
)


def _part(first: int, n: int, total: int) -> pa.Table:
    """n report rows, studies first .. first+n-1, every column filled as a real part is."""
    ids = range(first, first + n)
    uid = "1.2.826.0.1.3680043.8.498."
    rows = {
        "study_id": [f"s{50_000_000 + i}" for i in ids],
        "study_instance_uid": [f"{uid}{i}" for i in ids],
        "series_instance_uid": [f"{uid}{i}.1" for i in ids],
        "sop_instance_uid": [f"{uid}{i}.1.1" for i in ids],
        "accession_number": [f"A{70_000_000 + i}" for i in ids],
        "study_date": ["2026-11-23T22:41:07"] * n,
        "report": [REPORT] * n,
        "findings": [REPORT[10:170]] * n,
        "impression": [REPORT[-42:]] * n,
        "labels": [{name: 0.1 for name in CHEXPERT_LABELS}] * n,
        "sentences": [[{"section": "findings", "text": REPORT[10:50], "confidence": 0.93,
                        "low_confidence": False},
                       {"section": "impression", "text": REPORT[-42:], "confidence": 0.41,
                        "low_confidence": True}]] * n,
        "model_id": ["dcd"] * n,
        "model_version": ["0.1.0"] * n,
        "decoding": ["one-step-fused"] * n,
        "num_tokens": [96] * n,
        "num_forwards": [13] * n,
        "tokens_per_forward": [7.4] * n,
        "latency_ms": [40.0] * n,
        "view_position": ["PA"] * n,
        "source_file": [f"s{50_000_000 + i}/a.dcm" for i in ids],
        "num_files": [2] * n,
        "files": [[f"s{50_000_000 + i}/a.dcm", f"s{50_000_000 + i}/b.dcm"] for i in ids],
        "file_keys": [[f"{i:032x}", f"{i + total:032x}"] for i in ids],
        "file_sizes": [[1_843_216, 1_790_004]] * n,
        "file_mtimes_ns": [[1_764_000_000_000_000_000 + i, 1_764_000_000_000_000_001 + i]
                           for i in ids],
        "unit": [f"{first:016x}"] * n,
        "run_id": ["20261124T000000Z-000000"] * n,
        "reported_at": ["2026-11-24T00:00:00+00:00"] * n,
    }
    for name in ("patient_name", "patient_id", "patient_birth_date", "file_errors", "error",
                 "message", "fhir"):
        rows[name] = [None] * n
    return pa.Table.from_pydict(rows, schema=PART_SCHEMA)


def _measure(studies: int, unit_size: int, fhir: bool, queue) -> None:
    out = tempfile.mkdtemp(prefix="echo-ray-consolidate-")
    try:
        dst = resolve(out)
        parts = dst.join(PARTS_DIR)
        for first in range(0, studies, unit_size):
            n = min(unit_size, studies - first)
            parts.join(f"part-{first:010d}.parquet").write_parquet(_part(first, n, studies))
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        done = read_ledger(parts).done
        ledger_s = time.perf_counter() - start
        start = time.perf_counter()
        summary = consolidate(dst, include_phi=False, fhir=fhir)
        consolidate_s = time.perf_counter() - start
        assert len(done) == summary["reports"] == studies
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        queue.put({
            "studies": studies,
            "parts": -(-studies // unit_size),
            "ledger_s": round(ledger_s, 2),
            "consolidate_s": round(consolidate_s, 2),
            "studies_per_s": round(studies / (ledger_s + consolidate_s)),
            "peak_rss_mb": round(peak / 1024),
            "rss_before_mb": round(base_rss / 1024),
            "reports_jsonl_mb": round(dst.join("reports.jsonl").fs.get_file_info(
                dst.join("reports.jsonl").path).size / 2**20, 1),
        })
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", default="10000,100000", help="comma-separated sizes")
    p.add_argument("--unit-size", type=int, default=ReportConfig().unit_size)
    p.add_argument("--fhir", action="store_true", help="also write fhir.ndjson")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.studies.split(",")]
    ctx = multiprocessing.get_context("spawn")  # a fresh process: its own peak RSS
    rows = []
    for studies in sizes:
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure, args=(studies, args.unit_size, args.fhir, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    print(f"{'studies':>10}{'parts':>8}{'ledger s':>10}{'consol. s':>11}{'studies/s':>11}"
          f"{'peak RSS MB':>13}")
    for r in rows:
        print(f"{r['studies']:>10}{r['parts']:>8}{r['ledger_s']:>10.2f}{r['consolidate_s']:>11.2f}"
              f"{r['studies_per_s']:>11}{r['peak_rss_mb']:>13}")
    small, large = rows[0], rows[-1]
    scale = large["studies"] / small["studies"]
    time_ratio = (large["ledger_s"] + large["consolidate_s"]) / (
        small["ledger_s"] + small["consolidate_s"])
    memory_ratio = (large["peak_rss_mb"] - large["rss_before_mb"]) / max(
        1, small["peak_rss_mb"] - small["rss_before_mb"])
    print(f"{scale:.0f}x the studies: {time_ratio:.1f}x the time, {memory_ratio:.1f}x the memory "
          "above the process's own")
    result = {
        "bench": "consolidate",
        "unit_size": args.unit_size,
        "fhir": args.fhir,
        "machine": platform.machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "scale": scale,
        "time_ratio": round(time_ratio, 2),
        "memory_ratio": round(memory_ratio, 2),
        "peak_rss_mb_largest": large["peak_rss_mb"],
        "rows": rows,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
