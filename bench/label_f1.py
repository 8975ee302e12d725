"""Do trained models write the right findings? Label F1 on a held-out split vs the majority.

Each system (a checkpoint and a decoding mode) writes a report for every image of the split;
the project's labeler reads the 14 CheXpert labels from the text, and they are scored
against the shard's reference labels (for a synthetic archive, the rendered truth). The
baseline predicts each label's majority class on the train split. Also printed: the share
of generated sentences that occur verbatim in training reports (incoherent parallel
decoding writes sentences no report contains), and a few example reports.

    python bench/label_f1.py --data SHARDS --system ar=RUN_AR:ar \
        --system teacher=RUN_RAD:multi-step [--split test] [--limit 0] [--batch-size 16]

Prints the table, then one JSON line: per system `f1_micro14`, `f1_macro14`, `f1_micro5`,
`f1_macro5`, `known_sentences`, `beats_majority` (macro-14 and micro-14 F1 both above the
baseline's), per-label F1; and the baseline's figures.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from echo_ray.metrics import format_f1_table, label_f1, labels_from_vectors, majority_baseline
from echo_ray.predictor import ReportGenerator
from echo_ray.reports import CHEXPERT_LABELS, split_sentences


def _rows(data: str, columns: list[str]) -> list[dict]:
    return pq.read_table(Path(data) / "shards", columns=columns).to_pylist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="`echo-ray prepare` output folder")
    p.add_argument("--system", action="append", required=True, metavar="NAME=PATH:MODE",
                   help="checkpoint or run folder and decoding mode (ar, multi-step, one-step, "
                        "one-step-fused); repeatable")
    p.add_argument("--split", default="test")
    p.add_argument("--limit", type=int, default=0, help="first N images of the split (0 = all)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--examples", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = _rows(args.data, ["split", "labels", "dicom", "report_normalized", "dicom_id"])
    train = [r for r in rows if r["split"] == "train" and r["labels"] is not None]
    test = [r for r in rows if r["split"] == args.split and r["labels"] is not None]
    if args.limit:
        test = test[: args.limit]
    reference = labels_from_vectors(r["labels"] for r in test)
    known = {s.strip().lower() for r in train for s in split_sentences(r["report_normalized"])}
    results = {"majority": majority_baseline(labels_from_vectors(r["labels"] for r in train),
                                             reference)}
    figures: dict[str, dict] = {}
    examples: dict[str, list[str]] = {}
    for spec in args.system:
        name, _, rest = spec.partition("=")
        path, _, mode = rest.rpartition(":")
        folder = Path(path)
        if (folder / "model" / "config.json").is_file():
            folder = folder / "model"
        generator = ReportGenerator.from_checkpoint(folder, decoding=mode)
        start = time.perf_counter()
        reports = []
        for i in range(0, len(test), args.batch_size):
            reports += generator.generate_dicom([r["dicom"] for r in test[i: i + args.batch_size]])
        seconds = time.perf_counter() - start
        failed = [r for r in reports if "error" in r]
        if failed:
            raise SystemExit(f"{name}: {len(failed)} images failed to decode: {failed[0]}")
        scores = label_f1([r["labels"] for r in reports], reference)
        results[name] = scores
        sentences = [s.strip().lower() for r in reports for s in split_sentences(r["report"])]
        figures[name] = {
            "mode": mode,
            "checkpoint": str(folder),
            "f1_micro14": scores["f1_micro14"],
            "f1_macro14": scores["f1_macro14"],
            "f1_micro5": scores["f1_micro5"],
            "f1_macro5": scores["f1_macro5"],
            "known_sentences": sum(s in known for s in sentences) / max(1, len(sentences)),
            "reports_per_s": len(reports) / seconds,
            "per_label_f1": {k: scores["per_label"][k]["f1"] for k in CHEXPERT_LABELS},
        }
        examples[name] = [r["report"] for r in reports[: args.examples]]
    base = results["majority"]
    for fig in figures.values():
        fig["beats_majority"] = (fig["f1_macro14"] > base["f1_macro14"]
                                 and fig["f1_micro14"] > base["f1_micro14"])

    print(f"{len(test)} {args.split} images, {len(train)} train images; uncertain = negative")
    print(format_f1_table(results))
    print()
    for name, fig in figures.items():
        print(f"{name:>10}: {fig['known_sentences']:.1%} of sentences occur in training reports, "
              f"{fig['reports_per_s']:.1f} reports/s, beats majority: {fig['beats_majority']}")
    for i in range(min(args.examples, len(test))):
        print(f"\n--- {test[i]['dicom_id']}\nreference: {test[i]['report_normalized']}")
        for name in figures:
            print(f"{name:>9}: {examples[name][i]}")
    print(json.dumps({
        "split": args.split,
        "num_images": len(test),
        "majority": {k: base[k] for k in ("f1_micro14", "f1_macro14", "f1_micro5", "f1_macro5")},
        "systems": figures,
    }))


if __name__ == "__main__":
    main()
