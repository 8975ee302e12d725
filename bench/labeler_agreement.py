"""Labeler vs truth: the CheXpert-style labeler on synthetic reports against the findings
that were rendered, per label; and the same on the normalized reports (normalization must
keep every label).

No pixels are rendered: the synthetic studies' specs give the truth, their reports the text.
Unmentioned observations count as negative (reporting by exception); an uncertain label is
scored both ways. The exact-match rate is the share of reports whose 14 labels all equal the
truth (uncertain counted as negative, u=0, or as positive, u=1). Prints a table, then one
JSON line with every figure.

    python bench/labeler_agreement.py [--studies 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

from echo_ray.synth.archive import plan_archive
from echo_ray.synth.findings import chexpert_labels
from echo_ray.synth.report import write_report
from echo_ray.text.labeler import label_report
from echo_ray.text.labels import CHEXPERT_LABELS, POSITIVE, UNCERTAIN
from echo_ray.text.normalizer import normalize_report


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


def score(truth: list[dict], predicted: list[dict], uncertain_positive: bool) -> dict:
    positive = {POSITIVE, UNCERTAIN} if uncertain_positive else {POSITIVE}
    out = {}
    for name in CHEXPERT_LABELS:
        tp = fp = fn = tn = 0
        for t, p in zip(truth, predicted, strict=True):
            actual, said = t[name] == POSITIVE, p[name] in positive
            tp += actual and said
            fp += said and not actual
            fn += actual and not said
            tn += not actual and not said
        out[name] = {"support": tp + fn, "tp": tp, "fp": fp, "fn": fn,
                     "f1": round(_f1(tp, fp, fn), 4), "accuracy": round((tp + tn) / len(truth), 4)}
    return out


def exact_match(truth: list[dict], predicted: list[dict], uncertain_positive: bool) -> float:
    """Share of reports whose 14 labels, binarised as in `score`, all equal the truth."""
    positive = {POSITIVE, UNCERTAIN} if uncertain_positive else {POSITIVE}
    same = sum(
        all((t[name] == POSITIVE) == (p[name] in positive) for name in CHEXPERT_LABELS)
        for t, p in zip(truth, predicted, strict=True)
    )
    return same / len(truth)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    truth, raw, normalized = [], [], []
    for spec, _, _ in plan_archive(args.studies, seed=args.seed):
        report = write_report(spec)
        truth.append(chexpert_labels(spec.findings))
        raw.append(label_report(report))
        normalized.append(label_report(normalize_report(report, seed=spec.study_id)))

    tables = {
        "raw_u0": score(truth, raw, uncertain_positive=False),
        "raw_u1": score(truth, raw, uncertain_positive=True),
        "normalized_u0": score(truth, normalized, uncertain_positive=False),
    }
    print(f"{args.studies} synthetic studies (seed {args.seed}); F1 of the labeler vs the truth")
    print(f"{'label':<28}{'support':>8}{'F1 u=0':>8}{'F1 u=1':>8}{'acc u=0':>9}{'F1 norm':>9}")
    for name in CHEXPERT_LABELS:
        r0, r1, n0 = (tables[k][name] for k in ("raw_u0", "raw_u1", "normalized_u0"))
        print(f"{name:<28}{r0['support']:>8}{r0['f1']:>8.3f}{r1['f1']:>8.3f}"
              f"{r0['accuracy']:>9.3f}{n0['f1']:>9.3f}")
    macro = {k: round(sum(v["f1"] for v in t.values()) / len(t), 4) for k, t in tables.items()}
    # Normalization turns unmentioned into stated negatives by design; what it must keep is
    # every positive and uncertain finding.
    def findings(labels: dict) -> dict:
        return {k: v for k, v in labels.items() if v in (POSITIVE, UNCERTAIN)}

    agree = sum(findings(a) == findings(b) for a, b in zip(raw, normalized, strict=True))
    agree /= len(raw)
    exact = {
        "raw_u0": exact_match(truth, raw, uncertain_positive=False),
        "raw_u1": exact_match(truth, raw, uncertain_positive=True),
        "normalized_u0": exact_match(truth, normalized, uncertain_positive=False),
    }
    print(f"{'exact match (all 14)':<28}{'':>8}{exact['raw_u0']:>8.3f}{exact['raw_u1']:>8.3f}"
          f"{'':>9}{exact['normalized_u0']:>9.3f}")
    print(f"macro F1: raw u=0 {macro['raw_u0']:.3f}, raw u=1 {macro['raw_u1']:.3f}, "
          f"normalized u=0 {macro['normalized_u0']:.3f}; normalized reports keep the "
          f"positive/uncertain labels of the raw report in {agree:.1%} of studies")
    result = {
        "studies": args.studies,
        "macro_f1_u0": macro["raw_u0"],
        "macro_f1_u1": macro["raw_u1"],
        "macro_f1_normalized_u0": macro["normalized_u0"],
        "normalized_label_agreement": round(agree, 4),
        "exact_match_u0": round(exact["raw_u0"], 4),
        "exact_match_u1": round(exact["raw_u1"], 4),
        "exact_match_normalized_u0": round(exact["normalized_u0"], 4),
        "per_label_f1_u0": {k: v["f1"] for k, v in tables["raw_u0"].items()},
        "per_label_f1_u1": {k: v["f1"] for k, v in tables["raw_u1"].items()},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
