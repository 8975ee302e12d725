"""Does a sentence's confidence say when it is wrong? Sentence confidence (the geometric mean
of the decoder's commit probabilities of its tokens, `ReportGenerator`) against sentence
correctness, on an evaluation's studies.

A sentence is scored when the labeler finds at least one of the 13 finding labels in it ("No
Finding" is a statement about the whole report, not a sentence); it is right
when every label it states agrees with the study's reference labels (present or uncertain
count as positive; the reference's positives are its 1.0 labels), else wrong. Prints the
AUROC of (1 - confidence) for finding wrong sentences, and per threshold what share of
sentences is flagged and how many of the flagged are wrong (precision) and of the wrong are
flagged (recall); then one JSON line with every figure.

    python bench/sentence_confidence.py --model quickstart/runs/dcd/model \
        --eval quickstart/eval/reports.parquet --archive quickstart/archive [--limit 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from echo_ray.decode.predictor import ReportGenerator
from echo_ray.decode.studies import report_studies
from echo_ray.text.labeler import label_report
from echo_ray.text.labels import CHEXPERT_LABELS

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (Mann-Whitney)."""
    pos, neg = scores[positive], scores[~positive]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (a run's model/)")
    p.add_argument("--eval", required=True, help="an evaluation's reports.parquet")
    p.add_argument("--archive", required=True, help="the archive its studies come from")
    p.add_argument("--decoding", default=None, help="default: the model's preferred mode")
    p.add_argument("--limit", type=int, default=0, help="studies (0: all)")
    p.add_argument("--batch", type=int, default=16, help="studies per generate call")
    args = p.parse_args(argv)

    rows = pq.read_table(args.eval, columns=["dicom_id", "reference_labels"]).to_pylist()
    seen, studies = set(), []
    for row in rows:  # one row per system: each image once
        if row["dicom_id"] not in seen:
            seen.add(row["dicom_id"])
            studies.append(row)
    studies = studies[: args.limit or None]
    paths = {f.stem: f for f in Path(args.archive).rglob("*.dcm")}
    generator = ReportGenerator.from_checkpoint(args.model)
    decoding = args.decoding or generator.decoding  # the checkpoint's own mode by default
    confidence, wrong = [], []
    for lo in range(0, len(studies), args.batch):
        chunk = studies[lo : lo + args.batch]
        files = [[(s["dicom_id"], paths[s["dicom_id"]].read_bytes())] for s in chunk]
        for study, report in zip(chunk, report_studies(generator, files, decoding=decoding),
                                 strict=True):
            truth = dict(zip(CHEXPERT_LABELS, study["reference_labels"], strict=True))
            for sentence in report.get("sentences", []):
                said = {k: v for k, v in label_report(sentence["text"]).items()
                        if v is not None and k != "No Finding"}  # a report-level label
                if not said:
                    continue
                confidence.append(sentence["confidence"])
                wrong.append(any((v != 0) != (truth[k] == 1) for k, v in said.items()))
    conf, bad = np.asarray(confidence), np.asarray(wrong, dtype=bool)
    result = {
        "model": args.model, "decoding": decoding, "studies": len(studies),
        "sentences": int(len(conf)), "wrong": int(bad.sum()),
        "auroc_low_confidence_finds_wrong": round(auroc(1 - conf, bad), 4),
        "thresholds": {},
    }
    print(f"{result['studies']} studies, {result['sentences']} sentences with a label, "
          f"{result['wrong']} wrong; AUROC {result['auroc_low_confidence_finds_wrong']}")
    print(f"{'threshold':>9} {'flagged':>8} {'precision':>9} {'recall':>7}")
    for t in THRESHOLDS:
        flagged = conf < t
        n = int(flagged.sum())
        precision = float(bad[flagged].mean()) if n else float("nan")
        recall = float(flagged[bad].mean()) if bad.any() else float("nan")
        result["thresholds"][str(t)] = {"flagged": round(n / max(1, len(conf)), 4),
                                        "precision": round(precision, 4),
                                        "recall": round(recall, 4)}
        print(f"{t:>9} {n / max(1, len(conf)):>8.1%} {precision:>9.3f} {recall:>7.3f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
