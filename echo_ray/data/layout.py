"""Archive layouts: where the images, reports, splits and labels of an archive are (MIMIC-CXR's
`files/pXX/pSUBJECT/sSTUDY/<dicom_id>.dcm` tree with `metadata.csv`, `split.csv`,
`chexpert.csv`, or a flat folder of .dcm files). Driver side: file names and CSV tables only,
no DICOM reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from typing import Any

from echo_ray.data.storage import Location
from echo_ray.text.labels import CHEXPERT_LABELS

# MIMIC-CXR: files/p10/p10000032/s50414267/<dicom_id>.dcm, report at .../s50414267.txt
MIMIC_IMAGE = re.compile(
    r"(?:^|/)p\d+/p(?P<subject>\d+)/s(?P<study>\d+)/(?P<dicom>[^/]+)\.dcm$", re.IGNORECASE
)


def discover_archive(src: Location) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """List the images of an archive as work items.

    Returns (items, info): one item per .dcm file with its ids, report path, split and
    ground-truth labels when the archive provides them; info describes the layout.
    """
    files = src.list_files()
    dicoms = [f for f in files if f.lower().endswith(".dcm")]
    file_set = set(files)
    splits = _read_csv_index(src, "split.csv", ("dicom_id",), "split")
    views = _read_csv_index(src, "metadata.csv", ("dicom_id",), "ViewPosition")
    chexpert = _read_labels_csv(src)

    items = []
    mimic = 0
    for rel in dicoms:
        m = MIMIC_IMAGE.search(rel)
        item = {
            "path": rel, "dicom_id": posixpath.basename(rel)[:-4], "subject_id": "",
            "study_id": "", "report_path": "", "split": "", "view_hint": "", "labels_json": "",
        }
        if m:
            mimic += 1
            subject, study = m.group("subject"), m.group("study")
            report = posixpath.join(posixpath.dirname(posixpath.dirname(rel)), f"s{study}.txt")
            item.update(
                subject_id=subject,
                study_id=study,
                report_path=report if report in file_set else "",
                split=splits.get(item["dicom_id"], ""),
                view_hint=views.get(item["dicom_id"], ""),
            )
            if (subject, study) in chexpert:
                item["labels_json"] = json.dumps(chexpert[(subject, study)])
        items.append(item)
    layout = "mimic" if dicoms and mimic == len(dicoms) else ("mixed" if mimic else "flat")
    info = {
        "layout": layout,
        "num_files": len(files),
        "num_dicom_files": len(dicoms),
        "has_split_csv": bool(splits),
        "has_metadata_csv": bool(views),
        "has_chexpert_csv": bool(chexpert),
    }
    return items, info


def _read_csv(src: Location, name: str) -> list[dict[str, str]]:
    loc = src.join(name)
    if not loc.exists():
        return []
    return list(csv.DictReader(io.StringIO(loc.read_text())))


def _read_csv_index(src: Location, name: str, key: tuple[str, ...], value: str) -> dict:
    out = {}
    for row in _read_csv(src, name):
        if value in row and all(k in row for k in key):
            out[row[key[0]] if len(key) == 1 else tuple(row[k] for k in key)] = row[value]
    return out


def _read_labels_csv(src: Location) -> dict[tuple[str, str], list[float | None]]:
    """chexpert.csv (MIMIC-CXR-JPG style): subject_id, study_id, 14 label columns."""
    out = {}
    for row in _read_csv(src, "chexpert.csv"):
        labels = []
        for name in CHEXPERT_LABELS:
            raw = (row.get(name) or "").strip()
            labels.append(float(raw) if raw else None)
        out[(row.get("subject_id", ""), row.get("study_id", ""))] = labels
    return out


def assign_split(key: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> str:
    """Deterministic split from a stable key (subject id, else study id)."""
    u = int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) / float(16**12)
    if u < fractions[0]:
        return "train"
    return "validate" if u < fractions[0] + fractions[1] else "test"
