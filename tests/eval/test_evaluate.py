"""`echo-ray evaluate`: systems on a tiny archive through Ray Data, every output written."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import ray
import torch
from helpers.prepared_shards import edit_first_shard, prepare_test_shards
from PIL import Image

from echo_ray.cli import main, run
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig, EvaluateConfig, ModelConfig
from echo_ray.data.dicom import decode_dicom
from echo_ray.data.shards import shard_files
from echo_ray.data.storage import resolve
from echo_ray.eval.job import actor_input
from echo_ray.eval.label_metrics import label_f1, labels_from_vectors
from echo_ray.eval.scoring import PAIRED_KEY, RESULT_KEYS, TrainingReference, score_systems
from echo_ray.eval.systems import System
from echo_ray.eval.tables import PLOT_FILE, REPORTS_FILE, RESULTS_FILE, RUN_FILE, TABLE_FILE
from echo_ray.model.checkpoint import CONFIG_FILE, save_checkpoint
from echo_ray.model.hf import build_model
from echo_ray.text.labeler import label_report
from echo_ray.text.labels import CHEXPERT_LABELS
from echo_ray.text.tokenizer import load_tokenizer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def archive_shards(ray_cluster, tmp_path_factory):
    """Shards of a 30-study archive, one test-split DICOM corrupted in storage."""
    out = prepare_test_shards(tmp_path_factory, num_studies=30, seed=5, image_size=64)

    def corrupt(rows):
        broken = next(r for r in rows if r["split"] == "test")
        broken["dicom"] = b"this is not a DICOM file" * 8
        return broken

    broken = edit_first_shard(out, corrupt)
    tests = [r for r in pq.read_table(out / "shards").to_pylist() if r["split"] == "test"]
    assert len(tests) >= 3, "the archive needs a few test images"
    return out, broken["dicom_id"], len(tests)


@pytest.fixture(scope="module")
def checkpoints(archive_shards, tmp_path_factory):
    """An untrained AR and an untrained RAD checkpoint on the shards' tokenizer: evaluation
    does not care whether the reports are good, only that every figure is computed."""
    shards = archive_shards[0]
    tokenizer = load_tokenizer(shards / "tokenizer")
    folders = {}
    for name, seed in (("ar", 0), ("rad", 1)):
        torch.manual_seed(seed)
        config = apply_overrides(EchoConfig(), [])
        config.model = ModelConfig(image_size=56, max_response_len=24, block_length=8)
        model = build_model(config.model, tokenizer)
        folders[name] = save_checkpoint(model, tmp_path_factory.mktemp(name) / "model", config)
    return folders


@pytest.fixture(scope="module")
def evaluated(archive_shards, checkpoints, tmp_path_factory):
    shards, broken, num_test = archive_shards
    out = tmp_path_factory.mktemp("eval")
    evaluation = run("evaluate", [
        "--data", str(shards), "--out", str(out),
        "--system", f"ar={checkpoints['ar']}:ar",
        "--system", f"teacher={checkpoints['rad']}:multistep",
        "--system", f"onestep={checkpoints['rad']}:one-step-fused",
        "--batch-size", "4", "--cpus-per-actor", "0.5", "--threads", "1",
        "--compare-to", "ar", "--bootstrap-samples", "200",
    ])
    return out, evaluation.results, broken, num_test


@pytest.fixture(scope="module")
def decoded_in_actors(archive_shards, checkpoints, tmp_path_factory):
    """The one-step system again, its actors decoding the DICOM bytes themselves
    (`--decode-in-actors`), fluency under the same AR checkpoint as `evaluated`."""
    shards = archive_shards[0]
    out = tmp_path_factory.mktemp("eval-in-actors")
    evaluation = run("evaluate", [
        "--data", str(shards), "--out", str(out),
        "--system", f"onestep={checkpoints['rad']}:one-step-fused",
        "--fluency-model", str(checkpoints["ar"]), "--decode-in-actors",
        "--batch-size", "4", "--cpus-per-actor", "0.5", "--threads", "1",
    ])
    return out, evaluation.results


def test_evaluate_writes_results_table_plot_and_reports(evaluated):
    out, results, broken, num_test = evaluated
    on_disk = json.loads((out / RESULTS_FILE).read_text())
    assert list(on_disk) == ["ar", "onestep", "teacher"]  # sorted keys, one object per system
    assert on_disk == json.loads(json.dumps(results))
    for name, figures in on_disk.items():
        missing = [k for k in RESULT_KEYS if k not in figures]
        assert not missing, f"{name} lacks {missing}"
        # The broken DICOM is one error row; every other test image has a report.
        assert figures["num_errors"] == 1
        assert figures["num_reports"] == num_test - 1
        for key in ("ce_f1_micro14", "ce_f1_macro14", "ce_f1_micro5", "semscore", "rouge_l",
                    "bleu4", "known_sentences"):
            assert 0.0 <= figures[key] <= 1.0, (name, key, figures[key])
        assert math.isfinite(figures["fluency_ppl"]) and figures["fluency_ppl"] > 1.0
        assert figures["tokens_per_s"] > 0 and figures["ms_per_report"] > 0
        assert figures["ratescore"] is None  # no weights here: skipped, see the notes
        # How the pass ran: DICOM decoded by one CPU task per CPU of the cluster, apart from
        # the model actors.
        assert figures["decode_cpus"] == int(ray.cluster_resources()["CPU"])
        assert figures["pass_wall_s"] > 0 and 0.0 < figures["actor_busy_fraction"] <= 1.0
        assert all(figures["peak_rss_mb"][p] > 0 for p in ("driver", "decode", "actor"))
        # Every quality figure has its 95% bootstrap interval; speed figures have none.
        for key in ("ce_f1_micro14", "semscore", "rouge_l", "bleu4", "fluency_ppl"):
            lo, hi = figures["ci95"][key]
            assert lo <= hi, (name, key)
        for key in ("semscore", "rouge_l"):  # means over reports: inside their interval
            lo, hi = figures["ci95"][key]
            assert lo - 1e-12 <= figures[key] <= hi + 1e-12, (name, key)
        assert "tokens_per_s" not in figures["ci95"]
        if name != "ar":  # --compare-to ar: the paired difference on the common images
            paired = figures[PAIRED_KEY]
            assert paired["vs"] == "ar" and paired["num_images"] == num_test - 1
            assert set(paired["figures"]["semscore"]) == {"diff", "ci95", "frac_le_0"}
    assert PAIRED_KEY not in on_disk["ar"]
    assert on_disk["ar"]["tokens_per_forward"] <= 1.0 + 1e-9  # one token per forward at most
    # One-step fused decoding writes a whole block per forward: far fewer forwards.
    assert on_disk["onestep"]["forwards_per_report"] < on_disk["ar"]["forwards_per_report"]
    assert on_disk["onestep"]["tokens_per_forward"] > 1.5

    table = (out / TABLE_FILE).read_text()
    for name in ("ar", "teacher", "onestep"):
        assert f"| {name} |" in table
    assert "SemScore" in table and "all-MiniLM-L6-v2" in table
    assert "ratescore: skipped:" in table  # the reason is shown, not a crash
    with Image.open(out / PLOT_FILE) as image:
        assert image.format == "PNG" and image.size[0] > 400

    run_info = json.loads((out / RUN_FILE).read_text())
    assert run_info["systems"]["teacher"]["mode"] == "multi-step"  # the alias was resolved
    # Fluency is scored under the AR system's checkpoint when no --fluency-model is given.
    assert run_info["fluency_model"] == run_info["systems"]["ar"]["path"]
    # The majority-class baseline (train split) is scored on the same images, shown last.
    baseline = run_info["majority_baseline"]
    assert 0.0 <= baseline["ce_f1_micro14"] <= 1.0 and set(baseline["per_label_f1"]) == set(
        CHEXPERT_LABELS)
    assert table.index("| onestep |") < table.index("| majority (train) |")
    assert "Paired bootstrap difference teacher - ar" in table
    assert "majority (train)" in table.split("Per-label CE F1")[1]


def test_a_plain_hugging_face_folder_is_scored_zero_shot(archive_shards, tmp_path):
    """`--system base=HF_FOLDER:ar`: no echo_config.json; the model section comes from the
    preset and --set (here max_response_len, which an untrained model runs up to)."""
    shards, broken, num_test = archive_shards
    tokenizer = load_tokenizer(shards / "tokenizer")
    torch.manual_seed(2)
    folder = save_checkpoint(build_model(ModelConfig(image_size=56), tokenizer), tmp_path / "hf")
    (folder / CONFIG_FILE).unlink()
    out = tmp_path / "eval"
    evaluation = run("evaluate", [
        "--data", str(shards), "--out", str(out), "--system", f"base={folder}:ar",
        "--batch-size", "4", "--cpus-per-actor", "0.5", "--threads", "1",
        "--set", "model.image_size=56", "--set", "model.max_response_len=12",
    ])
    figures = evaluation.results["base"]
    assert figures["num_reports"] == num_test - 1 and figures["num_errors"] == 1
    assert math.isfinite(figures["fluency_ppl"])  # scored under itself, the AR system
    rows = pq.read_table(out / REPORTS_FILE).to_pylist()
    lengths = {r["num_tokens"] for r in rows if r["error"] is None}
    assert lengths and max(lengths) <= 12 < ModelConfig().max_response_len


def test_reports_parquet_has_every_image_once_per_system_and_the_error_row(evaluated):
    out, results, broken, num_test = evaluated
    rows = pq.read_table(out / REPORTS_FILE).to_pylist()
    assert len(rows) == 3 * num_test
    for system in ("ar", "teacher", "onestep"):
        mine = [r for r in rows if r["system"] == system]
        assert len({r["dicom_id"] for r in mine}) == num_test
        bad = [r for r in mine if r["error"] is not None]
        assert [(r["dicom_id"], r["error"], r["report"]) for r in bad] == [
            (broken, "not_dicom", None)
        ]
        good = [r for r in mine if r["error"] is None]
        assert all(isinstance(r["report"], str) and r["reference"] for r in good)
        # The CE F1 in results.json is the labeler on these very texts.
        predicted = labels_from_vectors(r["labels"] for r in good)
        reference = [label_report(r["reference"]) for r in good]
        assert results[system]["ce_f1_micro14"] == pytest.approx(
            label_f1(predicted, reference)["f1_micro14"]
        )
        assert results[system]["ce_f1_micro14_uncertain_positive"] == pytest.approx(
            label_f1(predicted, reference, uncertain="positive")["f1_micro14"]
        )
        assert results[system]["fluency_ppl"] == pytest.approx(math.exp(
            sum(r["fluency_nll"] for r in good) / sum(r["fluency_tokens"] for r in good)
        ))


def test_a_missing_optional_metric_is_skipped_with_its_reason(evaluated):
    out, _, _, _ = evaluated
    table = pq.read_table(out / REPORTS_FILE)
    tables = {"ar": table.filter(pc.equal(table.column("system"), "ar"))}
    options = EvaluateConfig(semscore_model="no-such-org/no-such-encoder")
    train = TrainingReference(sentences=set(), labels=[])
    results, notes, baseline = score_systems([System("ar", "unused", "ar")], tables, options, train)
    assert baseline is None  # no training labels, no majority baseline
    assert results["ar"]["semscore"] is None
    assert notes["semscore"].startswith("skipped:") and "no-such-encoder" in notes["semscore"]
    assert notes["ratescore"].startswith("skipped:")
    assert notes["fluency_ppl"].startswith("skipped:")  # no AR checkpoint named
    assert results["ar"]["rouge_l"] is not None  # the rest is still computed


@pytest.mark.parametrize("spec, message", [
    ("ar-no-mode=/some/path", "NAME=PATH:MODE"),
    ("ar=/some/path:sideways", "unknown decoding mode 'sideways'"),
])
def test_bad_system_spec_is_a_clear_error(tmp_path, capsys, spec, message):
    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "--data", str(tmp_path), "--out", str(tmp_path / "e"),
              "--system", spec])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_system_spec_accepts_the_short_mode_names():
    assert System.parse("echo=s3://bucket/runs/dcd:fused") == System(
        "echo", "s3://bucket/runs/dcd", "one-step-fused"
    )
    assert System.parse("t=runs/rad:onestep").mode == "one-step"


def test_the_decode_stage_gives_the_same_reports_as_actors_that_decode(
    evaluated, decoded_in_actors
):
    """The CPU decode stage changes where DICOM is decoded, not what the model reads: the
    same rows, reports, labels, fluency and batches (the same images per batch), the broken
    DICOM the same error row."""
    staged = pq.read_table(evaluated[0] / REPORTS_FILE)
    staged = staged.filter(pc.equal(staged.column("system"), "onestep"))
    in_actors = pq.read_table(decoded_in_actors[0] / REPORTS_FILE)
    timing = {"batch_id", "batch_latency_ms"}  # a fresh id and a clock per batch
    keep = [n for n in staged.column_names if n not in timing]
    assert staged.select(keep).to_pylist() == in_actors.select(keep).to_pylist()
    errors = [r for r in in_actors.to_pylist() if r["error"] is not None]
    assert [(r["dicom_id"], r["error"]) for r in errors] == [(evaluated[2], "not_dicom")]
    figures = decoded_in_actors[1]["onestep"]
    assert figures["decode_cpus"] is None and figures["peak_rss_mb"]["decode"] is None
    assert 0.0 < figures["actor_busy_fraction"] <= 1.0
    for key in ("num_reports", "num_errors", "ce_f1_micro14", "fluency_ppl", "rouge_l"):
        assert figures[key] == evaluated[1]["onestep"][key]


def test_the_model_actors_receive_decoded_images_never_dicom_bytes(archive_shards,
                                                                   checkpoints):
    """What streams into the actors: the model's (S, S) float32 images, exactly
    `decode_dicom`'s, and the decode errors; no `dicom` column."""
    shards, broken, num_test = archive_shards
    src = resolve(str(shards))
    config = apply_overrides(EchoConfig(), ["evaluate.batch_size=4"])
    rows = actor_input(shard_files(src), src, config, resolve(str(checkpoints["rad"])),
                       decode_cpus=1).take_all()
    assert len(rows) == num_test
    assert "dicom" not in rows[0] and "image" in rows[0]
    dicoms = {r["dicom_id"]: r["dicom"] for r in pq.read_table(shards / "shards").to_pylist()}
    for row in rows:
        if row["dicom_id"] == broken:
            assert row["image"] is None and row["decode_error"] == "not_dicom"
            assert row["decode_message"]
            continue
        assert row["decode_error"] is None
        expected = decode_dicom(dicoms[row["dicom_id"]], size=56).pixels  # the model's side
        image = np.frombuffer(row["image"], np.float32).reshape(56, 56)
        assert np.array_equal(image, expected)


def test_the_decode_stage_imports_no_torch():
    """The CPU decode tasks load the job's module (their function is pickled by reference):
    it must not pull torch into every decode worker."""
    code = ("import sys, echo_ray.eval.job; "
            "sys.exit('torch' in sys.modules or 'transformers' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
