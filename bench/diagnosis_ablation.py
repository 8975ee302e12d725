"""What do a model's diagnosis tokens do? The same checkpoint, the same test images, the
prompt's 14 finding slots filled four ways:

- `head`: the label head's decisions (what decoding always does; reproduces the model's
  figures in the evaluation's results);
- `oracle`: the reference labels (present = 1.0): how faithfully the language model writes
  what the slots say, the ceiling a better label head would reach;
- `absent`: every finding absent: what the language model writes when told nothing;
- and the head alone, no language model: its decisions scored as if they were the report's
  labels.

Each is scored as `echo-ray evaluate` scores a system (the project's labeler on the generated
text against the evaluation's reference labels, CE F1 micro-14, per label, uncertain =
negative). Prints a table, then one JSON line with every figure.

    python bench/diagnosis_ablation.py --model quickstart/runs/ar/model \
        --shards quickstart/shards --eval quickstart/eval/reports.parquet [--decoding ar]
        [--conditions head oracle absent]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from echo_ray.data.shards import SHARDS_DIR
from echo_ray.decode.predictor import ReportGenerator
from echo_ray.decode.studies import decode_images, image_from_bytes
from echo_ray.eval.label_metrics import label_f1, labels_from_vectors
from echo_ray.text.labels import CHEXPERT_LABELS, POSITIVE

CONDITIONS = ("head", "oracle", "absent")


def _test_images(shards: Path, dicom_ids: list[str], size: int) -> dict[str, np.ndarray]:
    """The evaluation's images, decoded as its decode stage decodes them."""
    wanted, images = set(dicom_ids), {}
    for file in sorted((shards / SHARDS_DIR).glob("*.parquet")):
        table = pq.read_table(file, columns=["dicom_id", "dicom"])
        keep = [i for i, d in enumerate(table.column("dicom_id").to_pylist()) if d in wanted]
        if not keep:
            continue
        decoded = decode_images(table.take(pa.array(keep)), size=size)
        for d, blob in zip(decoded.column("dicom_id").to_pylist(),
                           decoded.column("image").to_pylist(), strict=True):
            if blob is not None:
                images[d] = image_from_bytes(blob, size)
    return images


def _scores(predicted: list[dict], reference: list[dict], labels: list[str]) -> dict:
    f1 = label_f1(predicted, reference)
    return {"f1_micro14": f1["f1_micro14"], "f1_macro14": f1["f1_macro14"],
            **{name: f1["per_label"][name]["f1"] for name in labels}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model directory with diagnosis tokens")
    p.add_argument("--shards", required=True, help="the prepared shards it was evaluated on")
    p.add_argument("--eval", required=True, help="that evaluation's reports.parquet")
    p.add_argument("--decoding", default=None, help="default: the model's trained mode")
    p.add_argument("--batch", type=int, default=16, help="images per generate call")
    p.add_argument("--limit", type=int, default=0, help="images (0: all)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the head's decision threshold (default: the model's "
                        "model.diagnosis_threshold)")
    p.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS),
                   help="which slot fillings to decode (the head alone is always scored)")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    generator = ReportGenerator.from_checkpoint(
        args.model, **({"decoding": args.decoding} if args.decoding else {}))
    model = generator.model
    if model.diagnosis is None:
        raise SystemExit(f"{args.model} has no diagnosis tokens (model.diagnosis_prompt)")
    if args.threshold is not None:
        model.diagnosis.threshold = args.threshold
    rows, seen = [], set()
    for row in pq.read_table(args.eval, columns=["dicom_id", "reference_labels"]).to_pylist():
        if row["dicom_id"] not in seen and row["reference_labels"] is not None:
            seen.add(row["dicom_id"])  # one row per system: each image once
            rows.append(row)
    rows = rows[: args.limit or None]
    images = _test_images(Path(args.shards), [r["dicom_id"] for r in rows],
                          model.config.image_size)
    rows = [r for r in rows if r["dicom_id"] in images]
    reference = labels_from_vectors([r["reference_labels"] for r in rows])
    oracle = torch.tensor([[v == POSITIVE for v in (r["reference_labels"])] for r in rows])
    # the labels with >= 30 positive test images, most frequent first (issue 20's list)
    support = {k: sum(ref.get(k) == POSITIVE for ref in reference) for k in CHEXPERT_LABELS}
    frequent = sorted((k for k in CHEXPERT_LABELS if support[k] >= 30), key=lambda k: -support[k])

    decide = model.diagnosis.decide
    results: dict[str, dict] = {}
    head_calls: list[torch.Tensor] = []
    for condition in dict.fromkeys(["head", *args.conditions]):  # head first: its calls
        predicted = []
        for start in range(0, len(rows), args.batch):
            batch = rows[start: start + args.batch]
            pixels = np.stack([images[r["dicom_id"]] for r in batch])
            given = {"oracle": oracle[start: start + len(batch)],
                     "absent": torch.zeros(len(batch), len(CHEXPERT_LABELS), dtype=torch.bool)}
            if condition == "head":  # the head's own calls, kept as decoding makes them
                def recorded(feats):
                    calls = decide(feats)
                    head_calls.append(calls.cpu())
                    return calls
                model.diagnosis.decide = recorded
            else:
                model.diagnosis.decide = lambda feats, d=given[condition]: d.to(feats.device)
            try:
                predicted += [r["labels"] for r in generator.generate(pixels)]
            finally:
                model.diagnosis.decide = decide
        results[condition] = _scores(predicted, reference, frequent)
    calls = torch.cat(head_calls)
    if len(calls) != len(rows):
        raise RuntimeError(f"recorded {len(calls)} head calls for {len(rows)} images")
    head_labels = [{k: (POSITIVE if bool(c) else None) for k, c in zip(CHEXPERT_LABELS, row,
                                                                       strict=True)}
                   for row in calls]
    results["head alone"] = _scores(head_labels, reference, frequent)

    print(f"{args.model} ({generator.decoding}), {len(rows)} test images, head threshold "
          f"{model.diagnosis.threshold}; CE F1 with the prompt's finding slots filled from:")
    header = ["slots", "CE F1 mi14", "CE F1 ma14", *[f"{k} ({support[k]})" for k in frequent]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, figures in results.items():
        cells = [f"{figures[k]:.3f}" for k in ("f1_micro14", "f1_macro14", *frequent)]
        print("| " + " | ".join([name, *cells]) + " |")
    out = {"model": args.model, "decoding": generator.decoding, "images": len(rows),
           "threshold": model.diagnosis.threshold,
           "support": {k: support[k] for k in frequent}, "results": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
