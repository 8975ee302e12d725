"""The synthetic archive (echo_ray.synth): MIMIC layout, determinism, DICOM variety, findings
that are visible in the pixels, and labels/reports that agree with the ground truth."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from echo_ray.data.dicom import decode_dicom, read_header
from echo_ray.synth.archive import (
    METADATA_COLUMNS,
    SPLITS,
    plan_archive,
    study_dir,
    synthesize_archive,
)
from echo_ray.synth.chest import heart_width
from echo_ray.synth.findings import (
    DEVICE_TYPES,
    FINDING_TYPES,
    LUNG_OPACITY_TYPES,
    MM_PER_UNIT,
    Anatomy,
    Finding,
    StudySpec,
    chexpert_labels,
)
from echo_ray.synth.grammar import (
    FINDING_KEYWORDS,
    FINDING_TEMPLATES,
    IMPRESSION_TEMPLATES,
    SLOT_VALUES,
    is_well_formed,
    report_templates,
)
from echo_ray.synth.render import render_view
from echo_ray.synth.report import _fill, _sentence, report_sentences, write_report
from echo_ray.synth.sampling import sample_finding, sample_study
from echo_ray.text.labels import CHEXPERT_LABELS, NEGATIVE, POSITIVE

SIZE = 256  # renderer tests
NEGATION_CUES = ("no ", "normal", "unremarkable", "within normal limits", "without")


# ----------------------------------------------------------------------------- helpers


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def split_sections(text: str) -> dict[str, str]:
    """Upper-case 'TITLE:' headers -> their text, whitespace collapsed."""
    out: dict[str, str] = {}
    for m in re.finditer(r"^ ([A-Z]+):(.*?)(?=^ [A-Z]+:|\Z)", text, re.S | re.M):
        out[m.group(1)] = " ".join(m.group(2).split())
    return out


def sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=\.)\s+", text) if s.strip()]


def base_spec(view: str = "PA", **anatomy) -> StudySpec:
    """A study with no findings and a pose-free anatomy, so canonical (u, v) map to pixels
    as ((u + 1) / 2 * SIZE, (v + 1) / 2 * SIZE)."""
    spec = sample_study(5, 0, normal_fraction=1.0, lateral_fraction=0.0)
    return dataclasses.replace(spec, anatomy=Anatomy(**anatomy), views=(view,), findings=[])


def render(spec: StudySpec, findings: list[Finding], view: str | None = None) -> np.ndarray:
    return render_view(spec.with_findings(findings), view or spec.views[0], SIZE)


def box(img: np.ndarray, u0: float, u1: float, v0: float, v1: float) -> np.ndarray:
    c0, c1 = (int(round((x + 1) / 2 * SIZE)) for x in (u0, u1))
    r0, r1 = (int(round((x + 1) / 2 * SIZE)) for x in (v0, v1))
    return img[r0:r1, c0:c1]


def diff_centroid_u(d: np.ndarray, thr: float = 0.03) -> float:
    """Canonical u of the centroid of the pixels a finding changed."""
    ys, xs = np.nonzero(np.abs(d) > thr)
    assert len(xs), "the finding changed no pixel"
    return float((xs + 0.5).mean() / SIZE * 2 - 1)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth")
    summary = synthesize_archive(root, num_studies=30, seed=3, image_size=128,
                                   lateral_fraction=0.5, lateral_only_fraction=0.1)
    return root, summary


@pytest.fixture(scope="module")
def normal_pa() -> tuple[StudySpec, np.ndarray]:
    spec = base_spec()
    return spec, render(spec, [])


# ----------------------------------------------------------------------------- layout


def test_archive_has_mimic_layout(archive):
    root, summary = archive
    dcm_re = re.compile(r"files/p(\d{2})/p(\d{8})/s(\d{8})/([0-9a-f]{8}(?:-[0-9a-f]{8}){4})\.dcm")
    dcms = sorted(str(p.relative_to(root)) for p in root.rglob("*.dcm"))
    meta = read_csv(root / "metadata.csv")
    assert len(dcms) == len(meta) == summary["num_images"]
    by_id = {r["dicom_id"]: r for r in meta}
    studies_of_subject: dict[str, set[str]] = defaultdict(set)
    for rel in dcms:
        m = dcm_re.fullmatch(rel)
        assert m, rel
        xx, subject, study, dicom_id = m.groups()
        assert xx == subject[:2] and subject.startswith("1") and study.startswith("5")
        assert (root / f"files/p{xx}/p{subject}/s{study}.txt").is_file()
        row = by_id[dicom_id]
        assert (row["subject_id"], row["study_id"]) == (subject, study)
        studies_of_subject[subject].add(study)
    assert all(1 <= len(s) <= 3 for s in studies_of_subject.values())
    assert any(len(s) > 1 for s in studies_of_subject.values())
    assert sum(len(s) for s in studies_of_subject.values()) == 30 == summary["num_studies"]
    assert list(meta[0]) == list(METADATA_COLUMNS)
    assert list(read_csv(root / "split.csv")[0]) == ["dicom_id", "study_id", "subject_id",
                                                     "split"]
    chex = read_csv(root / "chexpert.csv")
    assert list(chex[0]) == ["subject_id", "study_id", *CHEXPERT_LABELS]
    assert len(chex) == 30
    gt = [json.loads(line) for line in (root / "ground_truth.jsonl").read_text().splitlines()]
    assert len(gt) == 30 and all((root / g["report"]).is_file() for g in gt)
    assert {v["dicom_id"] for g in gt for v in g["views"]} == set(by_id)


def test_split_is_by_subject_and_covers_all_splits(archive):
    root, _ = archive
    split_of: dict[str, set[str]] = defaultdict(set)
    for row in read_csv(root / "split.csv"):
        split_of[row["subject_id"]].add(row["split"])
    assert all(len(s) == 1 for s in split_of.values()), "a subject is in two splits"
    counts = {name: sum(s == {name} for s in split_of.values()) for name in SPLITS}
    assert all(counts[name] >= 1 for name in SPLITS)
    assert counts["train"] >= 0.6 * len(split_of)


def test_split_fractions_on_a_large_plan():
    plan = plan_archive(2000, seed=1)
    per_subject = {subject.subject_id: split for _, subject, split in plan}
    frac = {k: list(per_subject.values()).count(k) / len(per_subject) for k in SPLITS}
    assert abs(frac["train"] - 0.8) < 0.05 and abs(frac["test"] - 0.1) < 0.04
    assert len({spec.study_id for spec, _, _ in plan}) == 2000  # unique ids
    assert len(per_subject) == len({s.subject_id for _, s, _ in plan})


def test_plans_are_prefix_stable():
    small = plan_archive(12, seed=4)
    large = plan_archive(40, seed=4)
    for (a, _, _), (b, _, _) in zip(small[:9], large[:9], strict=True):
        assert (a.subject_id, a.study_id, a.views) == (b.subject_id, b.study_id, b.views)
        assert [f.to_dict() for f in a.findings] == [f.to_dict() for f in b.findings]


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    kw = dict(num_studies=6, image_size=64, lateral_fraction=0.5)
    synthesize_archive(tmp_path / "a", seed=7, **kw)
    synthesize_archive(tmp_path / "b", seed=7, **kw)
    synthesize_archive(tmp_path / "c", seed=8, **kw)
    assert tree_hash(tmp_path / "a") == tree_hash(tmp_path / "b")
    assert tree_hash(tmp_path / "a") != tree_hash(tmp_path / "c")


def test_workers_give_the_same_bytes(tmp_path):
    kw = dict(num_studies=5, image_size=64, seed=2)
    synthesize_archive(tmp_path / "serial", **kw)
    synthesize_archive(tmp_path / "parallel", workers=2, **kw)
    assert tree_hash(tmp_path / "serial") == tree_hash(tmp_path / "parallel")


def test_a_previous_archive_is_replaced_and_other_folders_refused(tmp_path):
    kw = dict(num_studies=3, image_size=48, seed=1)
    synthesize_archive(tmp_path / "a", **kw)
    first = tree_hash(tmp_path / "a")
    synthesize_archive(tmp_path / "a", **{**kw, "num_studies": 5})
    synthesize_archive(tmp_path / "a", **kw)  # nothing stale remains
    assert tree_hash(tmp_path / "a") == first
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not a synthetic archive"):
        synthesize_archive(tmp_path / "other", **kw)
    assert (tmp_path / "other" / "keep.txt").is_file()


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_studies"):
        synthesize_archive(tmp_path, num_studies=0)
    with pytest.raises(ValueError, match="lateral_fraction"):
        synthesize_archive(tmp_path, num_studies=2, lateral_fraction=1.5)
    with pytest.raises(ValueError, match="unknown finding type"):
        Finding("tumour")
    with pytest.raises(ValueError, match="side"):
        Finding("pleural_effusion", side="up", grade="small")


# ----------------------------------------------------------------------------- DICOM


def test_dicom_variety(archive):
    root, summary = archive
    meta = read_csv(root / "metadata.csv")
    syntaxes = {r["TransferSyntax"] for r in meta}
    assert len(syntaxes) >= 3, syntaxes
    assert {r["PhotometricInterpretation"] for r in meta} == {"MONOCHROME1", "MONOCHROME2"}
    bits = {int(r["BitsStored"]) for r in meta}
    assert {12, 16} <= bits
    views = {r["ViewPosition"] for r in meta}
    assert {"PA", "AP"} <= views and views & {"LATERAL", "LL"}
    assert summary["transfer_syntaxes"] == dict(sorted(
        {s: sum(r["TransferSyntax"] == s for r in meta) for s in syntaxes}.items()))
    # lateral-only studies exist when asked for
    views_of_study = defaultdict(set)
    for r in meta:
        views_of_study[r["study_id"]].add(r["ViewPosition"])
    assert any(v <= {"LATERAL", "LL"} for v in views_of_study.values())


def test_dicom_decodes_to_the_rendered_image(archive):
    root, _ = archive
    plan = {spec.study_id: spec for spec, _, _ in plan_archive(
        30, seed=3, lateral_fraction=0.5, lateral_only_fraction=0.1)}
    meta = read_csv(root / "metadata.csv")
    for row in meta:
        path = root / study_dir(int(row["subject_id"]), int(row["study_id"])) / (
            row["dicom_id"] + ".dcm")
        image = decode_dicom(path.read_bytes(), size=None)
        assert image.meta["view_position"] == row["ViewPosition"]
        assert image.meta["photometric_interpretation"] == row["PhotometricInterpretation"]
        assert image.meta["bits_stored"] == int(row["BitsStored"])
        spec = plan[int(row["study_id"])]
        rendered = render_view(spec, row["ViewPosition"], 128)
        cols = image.pixels.shape[1]
        off = (128 - cols) // 2
        rendered = rendered[:, off:off + cols]
        # every mapping on the way (bits, rescale, window, MONOCHROME1) is monotone, and all
        # but the lossy JPEG 2000 are lossless: the decoded image tracks the rendered one
        r = np.corrcoef(image.pixels.ravel(), rendered.ravel())[0, 1]
        assert r > 0.97, (row["TransferSyntax"], r)


def test_dicom_headers_carry_fake_phi(archive):
    root, _ = archive
    meta = read_csv(root / "metadata.csv")
    identity: dict[str, tuple] = {}
    reports = " ".join(p.read_text() for p in root.rglob("*.txt"))
    for row in meta:
        path = root / study_dir(int(row["subject_id"]), int(row["study_id"])) / (
            row["dicom_id"] + ".dcm")
        h = read_header(path.read_bytes(), include_phi=True)
        name = h["patient_name"]
        assert re.fullmatch(r"[A-Z][a-z]+\^[A-Z][a-z]+", name), name
        assert re.fullmatch(r"\d{8}", h["patient_id"])
        assert re.fullmatch(r"\d{8}", h["patient_birth_date"])
        ident = (name, h["patient_id"], h["patient_birth_date"])
        assert identity.setdefault(row["subject_id"], ident) == ident  # one per subject
        assert name.split("^")[0] not in reports  # PHI never leaks into the text
        assert h["study_instance_uid"].startswith("2.25.")
    assert len({i[0] for i in identity.values()}) >= len(identity) - 1


# ----------------------------------------------------------------------------- visibility


def test_cardiomegaly_widens_the_cardiac_silhouette_monotonically(normal_pa):
    spec, img0 = normal_pa
    lung = np.median(box(img0, -0.6, -0.45, 0.0, 0.2))
    heart = np.median(box(img0, 0.0, 0.1, 0.2, 0.3))
    assert heart - lung > 0.25
    thr = (lung + heart) / 2
    widths, drawn = [], []
    for grade in (None, "mild", "moderate", "severe"):
        findings = [Finding("cardiomegaly", grade=grade)] if grade else []
        img = render(spec, findings)
        widths.append(float((box(img, -0.75, 0.75, 0.25, 0.38) > thr).sum(1).mean()))
        drawn.append(heart_width(spec.with_findings(findings)))
    assert widths == sorted(widths) and widths[-1] - widths[0] > 0.25 * SIZE * 0.5, widths
    assert drawn == sorted(drawn)
    # the drawn transverse diameter is the CT ratio times the inner thoracic width
    ctr = Finding("cardiomegaly", grade="severe", params={"ctr": 0.7})
    assert heart_width(spec.with_findings([ctr])) == pytest.approx(0.7 * 2 * 0.78)


def test_effusion_brightens_its_own_base_and_grows_with_grade(normal_pa):
    spec, img0 = normal_pa
    left_base, right_base = (0.5, 0.72, 0.3, 0.62), (-0.72, -0.5, 0.3, 0.62)
    gains = []
    for grade in ("small", "moderate", "large"):
        img = render(spec, [Finding("pleural_effusion", side="left", grade=grade)])
        gain_left = box(img, *left_base).mean() - box(img0, *left_base).mean()
        gain_right = box(img, *right_base).mean() - box(img0, *right_base).mean()
        assert abs(gain_right) < 0.005
        gains.append(gain_left)
    assert 0.002 < gains[0] < gains[1] < gains[2] and gains[2] > 0.15, gains
    both = render(spec, [Finding("pleural_effusion", side="bilateral", grade="moderate")])
    assert box(both, *right_base).mean() - box(img0, *right_base).mean() > 0.05


def test_pneumothorax_darkens_the_periphery_with_a_pleural_line(normal_pa):
    spec, img0 = normal_pa
    periphery = (-0.72, -0.62, -0.2, 0.1)  # lateral right lung
    darkening = []
    for grade in ("small", "moderate", "large"):
        img = render(spec, [Finding("pneumothorax", side="right", grade=grade)])
        d = img - img0
        assert np.abs(d[:, SIZE // 2 + 8:]).max() < 0.02  # the other lung is untouched
        darkening.append(-float(d[:, : SIZE // 2].mean()))
        if grade == "large":
            region = box(d, *periphery)
            assert region.mean() < -0.02 and (region < 0).mean() > 0.85
            assert d.max() > 0.02  # the visceral pleural line is brighter than both sides
        if grade == "small":  # apical
            assert box(d, -0.5, -0.3, -0.7, -0.58).mean() < -0.01
    assert darkening == sorted(darkening) and darkening[0] >= 0.0, darkening


def test_nodule_is_a_local_bright_blob_growing_with_size(normal_pa):
    spec, img0 = normal_pa
    totals = []
    for mm, grade in ((8, "small"), (15, "medium"), (25, "large")):
        f = Finding("nodule", side="right", grade=grade, size_mm=mm, location="upper",
                      params={"x": 0.45, "v": -0.3})
        d = render(spec, [f]) - img0
        r = mm / 2 / MM_PER_UNIT
        assert box(d, -0.45 - r, -0.45 + r, -0.3 - r, -0.3 + r).mean() > 0.05
        assert np.abs(d[:, SIZE // 2:]).max() < 0.01  # nothing changes in the other lung
        totals.append(float(d.sum()))
    assert totals == sorted(totals)


@pytest.mark.parametrize("type_, grades, region", [
    ("consolidation", ("small", "moderate", "large"), (-0.6, -0.12, -0.6, -0.1)),
    ("edema", ("mild", "moderate", "severe"), (-0.5, 0.5, -0.3, 0.3)),
    ("atelectasis", ("mild", "moderate", "severe"), (-0.75, -0.05, 0.1, 0.45)),
    ("enlarged_cardiomediastinum", ("mild", "moderate", "severe"), (-0.3, 0.3, -0.7, -0.1)),
])
def test_graded_opacities_are_monotone(normal_pa, type_, grades, region):
    spec, img0 = normal_pa
    gains = []
    for grade in grades:
        side = "right" if FINDING_SIDES[type_] else None
        f = Finding(type_, side=side, grade=grade, location="rul" if side else None)
        gains.append(float(box(render(spec, [f]) - img0, *region).mean()))
    assert gains == sorted(gains) and gains[0] > 0.001, gains


FINDING_SIDES = {n: t.sides for n, t in FINDING_TYPES.items()}


@pytest.mark.parametrize("type_", sorted(FINDING_TYPES))
def test_every_finding_is_visible_on_its_side(normal_pa, type_):
    spec, img0 = normal_pa
    rng = np.random.default_rng(11)
    ft = FINDING_TYPES[type_]
    for side in [s for s in ft.sides if s != "bilateral"] or [None]:
        grade = ft.grades[-1] if ft.grades else None  # the most obvious grade
        if type_ == "pleural_other":
            grade = "plaques"
        f = sample_finding(type_, rng, side=side, grade=grade)
        d = render(spec, [f]) - img0
        assert np.abs(d).max() > 0.08, (type_, side)
        if side is not None and type_ not in ("central_line",):
            u = diff_centroid_u(d)
            assert (u > 0.05) if side == "left" else (u < -0.05), (type_, side, u)


@pytest.mark.parametrize("type_", sorted(DEVICE_TYPES))
def test_devices_add_bright_lines(normal_pa, type_):
    spec, img0 = normal_pa
    ft = FINDING_TYPES[type_]
    f = sample_finding(type_, np.random.default_rng(3), side="left" if ft.sides else None)
    d = render(spec, [f]) - img0
    assert (d > 0.1).sum() > 40 and d.min() > -0.1  # bright, at most faint processing halos


def test_rib_fracture_grades_go_from_subtle_to_obvious(normal_pa):
    spec, img0 = normal_pa
    changed = []
    for grade in ("nondisplaced", "displaced", "healing"):
        f = Finding("fracture", side="right", grade=grade, location="rib6",
                      params={"rib": 6, "t": 0.6})
        d = render(spec, [f]) - img0
        changed.append(int((np.abs(d) > 0.03).sum()))
        assert diff_centroid_u(d, 0.02) < -0.2  # the patient's right is the image left
        ys, xs = np.nonzero(np.abs(d) > 0.02)
        assert np.ptp(xs) < 0.15 * SIZE and np.ptp(ys) < 0.15 * SIZE  # local
    assert changed[0] < changed[1] and changed[0] < changed[2], changed


@pytest.mark.parametrize("type_", ["cardiomegaly", "pleural_effusion", "consolidation", "mass",
                                   "edema", "endotracheal_tube", "pacemaker", "sternotomy"])
def test_findings_show_on_the_lateral_view(type_):
    spec = base_spec("LATERAL")
    img0 = render(spec, [])
    ft = FINDING_TYPES[type_]
    f = sample_finding(type_, np.random.default_rng(2), side="left" if ft.sides else None,
                         grade=ft.grades[-1] if ft.grades else None)
    assert np.abs(render(spec, [f]) - img0).max() > 0.08


def test_views_differ_and_are_plausible(normal_pa):
    spec, pa = normal_pa
    ap = render(spec, [], "AP")
    lat = render(spec, [], "LATERAL")
    for img in (pa, ap, lat):
        assert img.dtype == np.float32 and img.shape == (SIZE, SIZE)
        assert 0.0 <= img.min() and img.max() <= 1.0
        assert img[: SIZE // 8, :8].mean() < 0.25  # air outside the body is dark
    # lungs darker than the mediastinum, abdomen bright
    assert box(pa, -0.5, -0.3, -0.4, 0.0).mean() + 0.2 < box(pa, -0.04, 0.04, 0.1, 0.3).mean()
    assert np.abs(ap - pa).mean() > 0.01 and np.abs(lat - pa).mean() > 0.05


def test_rendering_is_deterministic_and_independent_of_other_findings(normal_pa):
    spec, img0 = normal_pa
    assert np.array_equal(render(spec, []), img0)
    nodule = Finding("nodule", side="left", grade="medium", size_mm=15, location="upper",
                       params={"x": 0.45, "v": -0.35})
    device = Finding("sternotomy")
    a = render(spec, [nodule])
    b = render(spec, [nodule, device])
    # only the detector's image-wide processing couples distant findings, faintly
    assert np.abs(box(a - b, 0.3, 0.6, -0.5, -0.2)).max() < 0.005


# ----------------------------------------------------------------------------- labels, reports


def test_labels_follow_the_true_findings(archive):
    root, _ = archive
    chex = {r["study_id"]: r for r in read_csv(root / "chexpert.csv")}
    for line in (root / "ground_truth.jsonl").read_text().splitlines():
        gt = json.loads(line)
        row = chex[str(gt["study_id"])]
        types = {f["type"] for f in gt["findings"]}
        labels = {name: float(row[name]) for name in CHEXPERT_LABELS}
        assert labels == gt["labels"]
        expected = {FINDING_TYPES[t].label for t in types}
        if types & LUNG_OPACITY_TYPES:
            expected.add("Lung Opacity")
        if "cardiomegaly" in types:
            expected.add("Enlarged Cardiomediastinum")
        if not types - set(DEVICE_TYPES):
            expected.add("No Finding")
        assert {n for n, v in labels.items() if v == POSITIVE} == expected
        assert all(v in (POSITIVE, NEGATIVE) for v in labels.values())


def test_no_finding_only_for_normal_or_devices_only():
    assert chexpert_labels([])["No Finding"] == POSITIVE
    devices = [Finding("sternotomy"), Finding("picc", side="left", grade="mid_svc")]
    labels = chexpert_labels(devices)
    assert labels["No Finding"] == POSITIVE and labels["Support Devices"] == POSITIVE
    labels = chexpert_labels([Finding("atelectasis", side="left", grade="mild")])
    assert labels["No Finding"] == NEGATIVE and labels["Lung Opacity"] == POSITIVE
    labels = chexpert_labels([Finding("cardiomegaly", grade="mild")])
    assert labels["Enlarged Cardiomediastinum"] == POSITIVE  # CheXpert's hierarchy


def test_project_labeler_reads_the_synthetic_reports_as_their_true_labels():
    """The labeler of echo_ray.text.labeler, run on the synthetic reports, recovers the labels
    of chexpert.csv (so the CE F1 of a perfect report generator is 1)."""
    from echo_ray.text.labeler import label_report

    for i in range(300):
        spec = sample_study(21, i)
        truth = chexpert_labels(spec.findings)
        labels = label_report(write_report(spec))
        got = {k: POSITIVE if labels.get(k) == POSITIVE else NEGATIVE for k in CHEXPERT_LABELS}
        assert got == truth, (spec.findings, report_sentences(spec))


def check_report(text: str, findings: list[Finding]) -> None:
    sec = split_sections(text)
    assert "IMPRESSION" in sec and "EXAMINATION" in sec and "INDICATION" in sec
    body = [s for key in ("FINDINGS", "IMPRESSION", "ADDENDUM") for s in
            sentences(sec.get(key, ""))]
    for s in body:
        assert is_well_formed(s), s
    lower = [s.lower() for s in body]
    present = {f.type for f in findings}
    for type_, keywords in FINDING_KEYWORDS.items():
        mentions = [s for s in lower if any(k in s for k in keywords)]
        if type_ in present:
            assert any(not any(c in s for c in NEGATION_CUES) for s in mentions), (type_, text)
        else:  # reporting by exception: absent findings only in negative statements
            for s in mentions:
                assert any(c in s for c in NEGATION_CUES), (type_, s)


def test_reports_mention_every_finding_and_nothing_absent(archive):
    root, _ = archive
    for line in (root / "ground_truth.jsonl").read_text().splitlines():
        gt = json.loads(line)
        findings = [Finding(f["type"], side=f["side"], grade=f["grade"], size_mm=f["size_mm"],
                              location=f["location"], params=f["params"])
                    for f in gt["findings"]]
        check_report((root / gt["report"]).read_text(), findings)


def test_reports_over_many_sampled_studies_are_consistent_and_varied():
    texts = set()
    normal_impressions = 0
    for i in range(400):
        spec = sample_study(9, i, lateral_fraction=0.3, lateral_only_fraction=0.05)
        text = write_report(spec)
        check_report(text, spec.findings)
        texts.add(split_sections(text).get("FINDINGS", ""))
        if not [f for f in spec.findings if not FINDING_TYPES[f.type].device]:
            normal_impressions += 1
            impression = split_sections(text)["IMPRESSION"].lower()
            assert "no acute" in impression or "normal chest" in impression
    assert len(texts) > 300  # paraphrase variety
    assert 60 < normal_impressions < 250  # ~35% normal or devices only


def test_every_finding_variant_has_templates():
    rng = np.random.default_rng(0)
    for type_, ft in FINDING_TYPES.items():
        for side in ft.sides or (None,):
            for grade in ft.grades or (None,):
                f = sample_finding(type_, rng, side=side, grade=grade)
                sentence = _sentence(f, FINDING_TEMPLATES, rng)
                assert sentence and is_well_formed(sentence), (type_, side, grade)


def test_templates_name_their_finding_and_no_other():
    first = {k: v[0] if isinstance(v, tuple) else "10" for k, v in SLOT_VALUES.items()}
    for table in (FINDING_TEMPLATES, IMPRESSION_TEMPLATES):
        for type_, variants in table.items():
            for templates in variants.values():
                for t in templates:
                    low = _fill(t, first).lower()
                    assert t.endswith(".") and (t[0].isupper() or t[0] == "{"), t
                    assert any(k in low for k in FINDING_KEYWORDS[type_]), t
                    for other, kws in FINDING_KEYWORDS.items():
                        if other != type_:
                            assert not any(k in low for k in kws), (type_, other, t)


def test_grammar_accepts_the_templates_and_rejects_mean_field_mixtures():
    assert is_well_formed("Moderate left pleural effusion.")
    assert is_well_formed("There is a small right apical pneumothorax.")
    assert is_well_formed("A 12 mm nodule in the right upper lung zone.")
    assert is_well_formed("Endotracheal tube terminates 4 cm above the carina.")
    assert is_well_formed("Heart size is normal.")
    assert not is_well_formed("the heart size within normal . .")
    assert not is_well_formed("Moderate left pleural pneumothorax.")
    assert not is_well_formed("Moderate up pleural effusion.")
    assert len(report_templates()) > 150
