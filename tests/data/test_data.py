"""The prepare pipeline (Ray Data): archive -> shards + errors table + tokenizer + manifest."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig
from echo_ray.data.dicom import decode_dicom
from echo_ray.data.layout import assign_split
from echo_ray.data.prepare import decode_files_batch, prepare_shards, summarize_manifest
from echo_ray.data.shards import iter_shard_rows
from echo_ray.synth.archive import synthesize_archive
from echo_ray.text.labels import CHEXPERT_LABELS, REGIONS
from echo_ray.text.normalizer import sentence_region
from echo_ray.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray

# max_response_len=100: some of the synthetic reports (about 70 to 120 tokens) are cut
CONFIG = apply_overrides(EchoConfig.from_name("tiny"),
                         ["data.rows_per_shard=8", "model.max_response_len=100"])


def _load_job(name: str):
    path = Path(__file__).resolve().parents[2] / "jobs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"jobs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A small synthetic archive with three broken files planted in it."""
    root = tmp_path_factory.mktemp("archive")
    synthesize_archive(root, num_studies=14, seed=3, image_size=96)
    dcms = sorted(root.rglob("*.dcm"))
    broken = {}
    data = dcms[0].read_bytes()
    dcms[0].write_bytes(data[: len(data) - len(data) // 3])
    broken[dcms[0]] = "truncated"
    dcms[1].write_bytes(b"this is a text file, not a DICOM file\n" * 20)
    broken[dcms[1]] = "not_dicom"
    dcms[2].write_bytes(b"")
    broken[dcms[2]] = "not_dicom"
    return root, {p.relative_to(root).as_posix(): r for p, r in broken.items()}, len(dcms)


@pytest.fixture(scope="module")
def prepared(ray_cluster, archive, tmp_path_factory):
    root, broken, num_files = archive
    out = tmp_path_factory.mktemp("shards")
    manifest = prepare_shards(str(root), str(out), CONFIG)
    return out, manifest


def _rows(out):
    return list(iter_shard_rows(str(out)))


def test_every_file_is_a_shard_row_or_an_error_row(archive, prepared):
    root, broken, num_files = archive
    out, manifest = prepared
    rows = _rows(out)
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert len(rows) + len(errors) == num_files
    assert {e["path"]: e["reason"] for e in errors} == broken
    assert all(e["detail"] for e in errors)
    assert {r["path"] for r in rows}.isdisjoint(broken)
    assert manifest["images"] == len(rows) and manifest["errors"] == len(errors)
    assert manifest["errors_by_reason"] == {"not_dicom": 2, "truncated": 1}
    # The human-readable copy of the errors table says the same.
    assert (out / "errors.csv").read_text().count("\n") == len(errors) + 1


def test_shard_rows_keep_the_original_dicom_and_safe_metadata(archive, prepared):
    root, _, _ = archive
    out, manifest = prepared
    rows = _rows(out)
    for row in rows:
        original = (root / row["path"]).read_bytes()
        assert row["dicom"] == original
        assert row["sop_instance_uid"] == decode_dicom(original, size=16).meta["sop_instance_uid"]
        assert row["view_position"] in ("PA", "AP", "LATERAL", "LL")
        assert row["split"] in ("train", "validate", "test")
    # No patient identifiers anywhere in the shards' columns (the bytes are the archive's own).
    names = {c for c in pq.read_schema(next((out / "shards").glob("*.parquet"))).names}
    assert not names & {"patient_name", "patient_id", "patient_birth_date"}


def test_reports_are_normalized_and_labelled(prepared):
    out, _ = prepared
    rows = _rows(out)
    assert all(r["report"] and r["report_normalized"] for r in rows)
    for row in rows:
        assert len(row["labels"]) == len(CHEXPERT_LABELS)
        assert row["labels_source"] == "chexpert.csv"  # the synthetic archive ships ground truth
        findings = row["report_normalized"].split("IMPRESSION:")[0]
        regions = {sentence_region(s) for s in findings.replace("FINDINGS:", "").split(". ")}
        assert set(REGIONS) <= regions, row["report_normalized"]


def test_split_is_by_subject_and_manifest_counts_agree(prepared):
    out, manifest = prepared
    rows = _rows(out)
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["subject_id"], r["split"]) == r["split"]
    for split, counts in manifest["splits"].items():
        in_split = [r for r in rows if r["split"] == split]
        studies = {r["study_id"] for r in in_split}
        assert counts == {"images": len(in_split), "studies": len(studies)}
    assert sum(s["rows"] for s in manifest["shards"]) == len(rows)
    assert json.loads((out / "manifest.json").read_text())["images"] == len(rows)


def test_tokenizer_is_trained_on_normalized_train_reports(prepared):
    out, manifest = prepared
    tok = load_tokenizer(out / "tokenizer")
    train = next(r for r in _rows(out) if r["split"] == "train")
    text = train["report_normalized"]
    assert tok.decode(tok(text)["input_ids"]) == text
    assert manifest["tokenizer_info"]["num_reports"] >= 1


def test_manifest_counts_the_reports_training_will_cut(prepared):
    out, manifest = prepared
    tok = load_tokenizer(out / "tokenizer")
    expected, total = {}, 0
    for split in ("train", "validate", "test"):
        reports = {r["study_id"]: r["report_normalized"] for r in _rows(out)
                   if r["split"] == split}
        lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in reports.values()]
        expected[split] = sum(n > 99 for n in lengths)  # 99 report tokens + <eos> fit in 100
        total += len(lengths)
    assert manifest["reports_truncated"] == expected
    assert 0 < sum(expected.values()) < total  # the count separates long from short reports
    assert manifest["max_response_len"] == 100
    assert json.dumps(expected) in summarize_manifest(manifest)


def test_rerun_replaces_output_identically(archive, prepared):
    root, _, _ = archive
    out, manifest = prepared

    def fingerprint():
        files = sorted(p.name for p in (out / "shards").glob("*.parquet"))
        rows = sorted(
            (r["dicom_id"], hashlib.sha256(r["dicom"]).hexdigest(), r["report_normalized"])
            for r in _rows(out)
        )
        return files, rows

    before = fingerprint()
    # Through the `ray job submit` entry point, with the same arguments as the CLI.
    _load_job("prepare").main(
        ["--archive", str(root), "--out", str(out), "--set", "data.rows_per_shard=8"]
    )
    assert fingerprint() == before
    again = json.loads((out / "manifest.json").read_text())
    assert again["images"] == manifest["images"] and again["shards"] == manifest["shards"]


def test_flat_folder_without_reports(ray_cluster, archive, tmp_path):
    root, broken, _ = archive
    flat = tmp_path / "flat"
    flat.mkdir()
    good = [p for p in sorted(root.rglob("*.dcm")) if p.relative_to(root).as_posix() not in broken]
    for i, p in enumerate(good[:5]):
        (flat / f"img{i}.dcm").write_bytes(p.read_bytes())
    manifest = prepare_shards(str(flat), str(tmp_path / "out"), CONFIG)
    rows = _rows(tmp_path / "out")
    assert manifest["layout"] == "flat" and len(rows) == 5
    # Studies come from the DICOM header; no report, so no labels and no tokenizer.
    assert all(r["study_id"] == r["study_instance_uid"] for r in rows)
    assert all(r["report"] is None and r["labels"] is None for r in rows)
    assert manifest["tokenizer"] is None
    assert manifest["reports_truncated"] is None  # no tokenizer to count with


def test_empty_and_missing_archives(ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    manifest = prepare_shards(str(tmp_path / "empty"), str(tmp_path / "out"), CONFIG)
    assert manifest["images"] == 0 and manifest["errors"] == 0
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_shards(str(tmp_path / "nope"), str(tmp_path / "out2"), CONFIG)


def test_decode_files_batch_gives_pixels_and_flags_bad_files(archive):
    import numpy as np

    from echo_ray.data.storage import resolve

    root, broken, _ = archive
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.dcm"))[:5]
    assert len(set(paths) & set(broken)) == 3 and len(paths) == 5  # both kinds are exercised
    out = decode_files_batch({"path": np.array(paths)}, src=resolve(str(root)), image_size=32)
    assert out["pixels"].shape == (5, 32, 32) and out["pixels"].dtype == np.float32
    for path, ok, error, pixels in zip(paths, out["ok"], out["error"], out["pixels"],
                                       strict=True):
        if path in broken:
            assert not ok and error == broken[path] and not pixels.any()
        else:
            assert ok and error == "" and 0 <= pixels.min() and pixels.max() <= 1
            assert pixels.std() > 0.05  # a real radiograph, not a blank


def test_assign_split_is_deterministic_and_proportional():
    splits = [assign_split(str(i)) for i in range(3000)]
    assert splits == [assign_split(str(i)) for i in range(3000)]
    assert 0.75 < splits.count("train") / 3000 < 0.85
    assert 0.07 < splits.count("test") / 3000 < 0.13


# --- S3 (a real S3 API: moto server on loopback) ---------------------------------------------


def test_prepare_from_and_to_s3(ray_cluster, archive, s3_endpoint):
    import boto3

    root, broken, num_files = archive
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="cxr")
    for path in sorted(root.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), "cxr", f"archive/{path.relative_to(root).as_posix()}")
    manifest = prepare_shards("s3://cxr/archive", "s3://cxr/prepared", CONFIG,
                              s3_endpoint=s3_endpoint)
    assert manifest["errors"] == len(broken)
    assert manifest["images"] + manifest["errors"] == num_files
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="cxr", Prefix="prepared/")["Contents"]}
    assert {"prepared/manifest.json", "prepared/errors.parquet",
            "prepared/tokenizer/tokenizer.json"} <= keys
    rows = list(iter_shard_rows("s3://cxr/prepared", ["dicom_id", "split"],
                                s3_endpoint=s3_endpoint))
    assert len(rows) == manifest["images"]
