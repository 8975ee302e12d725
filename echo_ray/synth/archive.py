"""The synthetic archive writer: `synthesize_archive` writes a MIMIC-CXR-shaped archive::

    files/pXX/pSUBJECT/sSTUDY/<dicom_id>.dcm   real DICOM (mixed syntaxes, MONOCHROME1/2, ...)
    files/pXX/pSUBJECT/sSTUDY.txt              the free-text report (reporting by exception)
    metadata.csv  split.csv  chexpert.csv      as MIMIC-CXR(-JPG), labels = the TRUE findings
    ground_truth.jsonl                         per study: every finding with side/grade/size/...
    synth_config.json                          the options the archive was made with

`plan_archive` draws its subjects, studies and splits without pixels.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import multiprocessing
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echo_ray.synth.encode import encode_view
from echo_ray.synth.findings import StudySpec, _round, chexpert_labels
from echo_ray.synth.grammar import EXAMINATION_TEXT
from echo_ray.synth.render import render_view
from echo_ray.synth.report import _exam_key, write_report
from echo_ray.synth.sampling import Subject, _date, _sample_subject, sample_study
from echo_ray.synth.streams import _int_key, _pick, _rng
from echo_ray.text.labels import CHEXPERT_LABELS, POSITIVE

METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                    "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                    "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                    "PatientOrientationCodeSequence_CodeMeaning", "Modality",
                    "PhotometricInterpretation", "BitsStored", "TransferSyntax")
SPLIT_COLUMNS = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_COLUMNS = ("subject_id", "study_id", *CHEXPERT_LABELS)
SPLITS = ("train", "validate", "test")
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral",
              "LL": "left lateral"}


def dicom_id_for(seed: int, study_id: int, view_index: int) -> str:
    """MIMIC-style dicom_id: 40 hex digits in five groups of eight."""
    h = hashlib.sha1(f"echo-ray-synth/{seed}/{study_id}/{view_index}".encode()).hexdigest()
    return "-".join(h[i:i + 8] for i in range(0, 40, 8))


def study_dir(subject_id: int, study_id: int) -> Path:
    """files/pXX/pSUBJECT/sSTUDY (relative to the archive root)."""
    return Path("files") / f"p{str(subject_id)[:2]}" / f"p{subject_id}" / f"s{study_id}"


@dataclass(frozen=True)
class _Task:
    spec: StudySpec
    subject: Subject
    out_dir: str
    image_size: int


SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / validate / test, by subject


def _permute(i: int, n: int, seed: int) -> int:
    """A seeded bijection of range(n) (n <= 2**24): a 4-round Feistel network on 24 bits,
    cycle-walking until the value falls inside the range."""
    keys = [_int_key(f"feistel/{seed}/{r}") & 0xFFF for r in range(4)]
    x = i
    while True:
        left, right = x >> 12, x & 0xFFF
        for k in keys:
            left, right = right, left ^ (((right * 2654435761) ^ k) >> 7 & 0xFFF)
        x = (left << 12) | right
        if x < n:
            return x


def plan_archive(num_studies: int, *, seed: int = 0, lateral_fraction: float = 0.3,
                 lateral_only_fraction: float = 0.0, normal_fraction: float = 0.35
                 ) -> list[tuple[StudySpec, Subject, str]]:
    """Subjects (1-3 studies each), study specs and each subject's split; no pixels.

    Prefix-stable: a larger archive with the same seed and options starts with the same
    subjects and studies (ids, findings, splits) - only the last subject's study count and
    the small-archive split guarantee below can differ. Splits are by subject, ~80/10/10;
    from 3 subjects up, validate and test each get at least one.
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    rng = _rng(seed, "plan")
    counts: list[int] = []
    while sum(counts) < num_studies:
        counts.append(int(_pick(rng, (1, 2, 3), (0.45, 0.35, 0.2))))
    counts[-1] -= sum(counts) - num_studies
    n_sub = len(counts)
    # subject ids increase with random gaps; study ids permute the index: both unique
    subject_ids = 10_000_000 + np.cumsum(
        [int(_rng(seed, "subject-id", i).integers(1, 90)) for i in range(n_sub)])
    study_ids = [50_000_000 + _permute(k, 10**7, seed) for k in range(num_studies)]
    draws = [float(_rng(seed, "split", i).random()) for i in range(n_sub)]
    cuts = np.cumsum(SPLIT_FRACTIONS)
    split_of = {i: SPLITS[int(np.searchsorted(cuts, u, side="right"))] for i, u in
                enumerate(draws)}
    if n_sub >= 3:  # small archives: move the highest-drawn train subjects to empty splits
        for name in ("test", "validate"):
            if name not in split_of.values():
                train = [i for i in range(n_sub) if split_of[i] == "train"]
                split_of[max(train, key=lambda i: draws[i])] = name
    plan = []
    k = 0
    for i, n in enumerate(counts):
        subject = _sample_subject(seed, i, int(subject_ids[i]))
        day = subject.first_date
        srng = _rng(seed, "subject-dates", i)
        for j in range(n):
            age = subject.base_age + (day - subject.first_date) // 365
            spec = sample_study(seed, k, subject_id=subject.subject_id,
                                study_id=int(study_ids[k]), sex=subject.sex, age=int(age),
                                lateral_fraction=lateral_fraction,
                                lateral_only_fraction=lateral_only_fraction,
                                normal_fraction=normal_fraction, study_date=_date(day),
                                first_study=j == 0)
            plan.append((spec, subject, split_of[i]))
            day += int(srng.integers(1, 700))
            k += 1
    return plan


def _write_study(task: _Task) -> dict[str, Any]:
    """Render, encode and write one study; return its csv rows and ground truth."""
    spec, subject, root = task.spec, task.subject, Path(task.out_dir)
    sdir = study_dir(spec.subject_id, spec.study_id)
    (root / sdir).mkdir(parents=True, exist_ok=True)
    images = []
    render_s = encode_s = 0.0
    for vi, view in enumerate(spec.views):
        dicom_id = dicom_id_for(spec.seed, spec.study_id, vi)
        t0 = time.perf_counter()
        pixels = render_view(spec, view, task.image_size)
        t1 = time.perf_counter()
        data, facts = encode_view(pixels, spec, subject, view, vi, dicom_id)
        t2 = time.perf_counter()
        render_s += t1 - t0
        encode_s += t2 - t1
        (root / sdir / f"{dicom_id}.dcm").write_bytes(data)
        images.append({"dicom_id": dicom_id, "view": view, **facts})
    (root / sdir.parent / f"{sdir.name}.txt").write_text(write_report(spec))
    return {"images": images, "render_s": render_s, "encode_s": encode_s}


_ARCHIVE_FILES = ("metadata.csv", "split.csv", "chexpert.csv", "ground_truth.jsonl",
                  "synth_config.json")


def _prepare_out_dir(root: Path) -> None:
    """Create `root`, or empty it of a previous synthetic archive (so no stale study is left
    behind); refuse a non-empty directory that holds anything else."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"out_dir {root} is a file; give a directory for the archive")
    if root.is_dir() and any(root.iterdir()):
        if not (root / "synth_config.json").is_file():
            raise ValueError(f"out_dir {root} is not empty and holds no synth_config.json: it "
                             "is not a synthetic archive, so nothing in it is replaced; choose "
                             "a new or empty directory")
        shutil.rmtree(root / "files", ignore_errors=True)
        for name in _ARCHIVE_FILES:
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)


def synthesize_archive(out_dir: str | Path, *, num_studies: int, seed: int = 0,
                       image_size: int = 512, lateral_fraction: float = 0.3,
                       lateral_only_fraction: float = 0.0, normal_fraction: float = 0.35,
                       workers: int = 1) -> dict[str, Any]:
    """Write a synthetic MIMIC-CXR-layout archive and return a summary.

    Same arguments -> byte-identical files. Studies draw from their own random streams, so
    `workers` > 1 (processes) gives the same bytes as 1.

    Args:
        out_dir: archive root: created, or empty, or a previous synthetic archive (which is
            replaced whole); a directory holding anything else is refused.
        num_studies: number of studies (subjects have 1-3 each).
        seed: the archive's seed.
        image_size: rendered side in pixels (some detectors are then cropped non-square).
        lateral_fraction: probability that a study has a lateral view beside the frontal.
        lateral_only_fraction: probability that a study has only a lateral view.
        normal_fraction: probability that a study has no pathology (devices may remain).
        workers: processes rendering studies in parallel.

    Returns:
        {"num_subjects", "num_studies", "num_images", "views", "findings", "labels",
        "splits", "transfer_syntaxes", "photometric", "bits_stored", "modalities",
        "seconds", "ms_per_image_render", "ms_per_image_encode"} (counts are dicts).
    """
    if num_studies < 1:
        raise ValueError(f"num_studies must be >= 1, got {num_studies}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    for name, value in (("lateral_fraction", lateral_fraction),
                        ("lateral_only_fraction", lateral_only_fraction),
                        ("normal_fraction", normal_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    t_start = time.perf_counter()
    root = Path(out_dir)
    _prepare_out_dir(root)
    plan = plan_archive(num_studies, seed=seed, lateral_fraction=lateral_fraction,
                        lateral_only_fraction=lateral_only_fraction,
                        normal_fraction=normal_fraction)
    tasks = [_Task(spec, subject, str(root), image_size) for spec, subject, _ in plan]
    if workers > 1:
        # spawn: forking a process that holds threads (torch, Ray) can deadlock
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            results = list(pool.map(_write_study, tasks, chunksize=4))
    else:
        results = [_write_study(t) for t in tasks]

    meta_rows, split_rows, chex_rows, gt_lines = [], [], [], []
    summary: dict[str, Counter] = {k: Counter() for k in (
        "views", "findings", "labels", "splits", "transfer_syntaxes", "photometric",
        "bits_stored", "modalities")}
    render_s = encode_s = 0.0
    for (spec, subject, split), res in zip(plan, results, strict=True):
        render_s += res["render_s"]
        encode_s += res["encode_s"]
        labels = chexpert_labels(spec.findings)
        for img in res["images"]:
            view = img["view"]
            meta_rows.append({
                "dicom_id": img["dicom_id"], "subject_id": spec.subject_id,
                "study_id": spec.study_id,
                "PerformedProcedureStepDescription": EXAMINATION_TEXT[_exam_key(spec.views)],
                "ViewPosition": view, "Rows": img["Rows"], "Columns": img["Columns"],
                "StudyDate": spec.study_date, "StudyTime": spec.study_time,
                "ProcedureCodeSequence_CodeMeaning": EXAMINATION_TEXT[_exam_key(spec.views)],
                "ViewCodeSequence_CodeMeaning": _VIEW_CODE[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect" if view != "AP" else
                "Semi-erect",
                "Modality": img["Modality"],
                "PhotometricInterpretation": img["PhotometricInterpretation"],
                "BitsStored": img["BitsStored"], "TransferSyntax": img["TransferSyntax"],
            })
            split_rows.append({"dicom_id": img["dicom_id"], "study_id": spec.study_id,
                               "subject_id": spec.subject_id, "split": split})
            summary["views"][view] += 1
            summary["transfer_syntaxes"][img["TransferSyntax"]] += 1
            summary["photometric"][img["PhotometricInterpretation"]] += 1
            summary["bits_stored"][img["BitsStored"]] += 1
            summary["modalities"][img["Modality"]] += 1
        chex_rows.append({"subject_id": spec.subject_id, "study_id": spec.study_id,
                          **labels})
        gt_lines.append(json.dumps({
            "subject_id": spec.subject_id, "study_id": spec.study_id, "split": split,
            "report": str(study_dir(spec.subject_id, spec.study_id)) + ".txt",
            "views": [{"dicom_id": i["dicom_id"], "view": i["view"]} for i in res["images"]],
            "sex": spec.sex, "setting": spec.setting,
            "anatomy": {k: _round(v) for k, v in dataclasses.asdict(spec.anatomy).items()},
            "findings": [f.to_dict() for f in spec.findings],
            "labels": labels,
        }, sort_keys=True))
        summary["splits"][split] += 1
        for f in spec.findings:
            summary["findings"][f.type] += 1
        for name, value in labels.items():
            summary["labels"][name] += int(value == POSITIVE)

    def write_csv(name: str, columns: Sequence[str], rows: list[dict]) -> None:
        with open(root / name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(columns), lineterminator="\n")
            w.writeheader()
            w.writerows(rows)

    write_csv("metadata.csv", METADATA_COLUMNS, meta_rows)
    write_csv("split.csv", SPLIT_COLUMNS, split_rows)
    write_csv("chexpert.csv", CHEXPERT_COLUMNS, chex_rows)
    (root / "ground_truth.jsonl").write_text("\n".join(gt_lines) + "\n")
    config = {"generator": "echo_ray.synth", "num_studies": num_studies, "seed": seed,
              "image_size": image_size, "lateral_fraction": lateral_fraction,
              "lateral_only_fraction": lateral_only_fraction,
              "normal_fraction": normal_fraction}
    (root / "synth_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n_images = len(meta_rows)
    out: dict[str, Any] = {
        "num_subjects": len({s.subject_id for s, _, _ in plan}),
        "num_studies": len(plan),
        "num_images": n_images,
        **{k: dict(sorted(c.items())) for k, c in summary.items()},
        "seconds": round(time.perf_counter() - t_start, 3),
        "ms_per_image_render": round(1000 * render_s / max(1, n_images), 2),
        "ms_per_image_encode": round(1000 * encode_s / max(1, n_images), 2),
    }
    return out
