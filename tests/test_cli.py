import argparse
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from echo_ray import cli
from echo_ray.cli import COMMANDS, FLAGS, build_parser, main
from echo_ray.config.flags import default_text
from echo_ray.runtime.job import JOB_CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]


def test_synth_command_writes_an_archive(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path / "a"), "--studies", "3", "--image-size", "64",
          "--seed", "7", "--workers", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_studies"] == 3
    assert len(list((tmp_path / "a" / "files").rglob("*.dcm"))) == summary["num_images"]
    assert len(list((tmp_path / "a" / "files").rglob("s*.txt"))) == 3


def test_every_command_has_help():
    for name in COMMANDS:
        assert build_parser(name).format_help().startswith(f"usage: echo-ray {name}")


def test_console_script_lists_commands():
    out = subprocess.run([sys.executable, "-m", "echo_ray.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for name in COMMANDS:
        assert name in out


def test_unknown_preset_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path), "--out", str(tmp_path / "o"),
              "--preset", "gigantic"])
    assert exc.value.code == 2
    assert "unknown preset 'gigantic'" in capsys.readouterr().err


def test_missing_archive_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--archive" in err and "no such folder" in err and "echo-ray synth" in err


def test_cli_rejects_unknown_config_key(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["prepare", "--archive", str(tmp_path), "--out", str(tmp_path / "o"),
                  "--set", "data.image_sise=3"])
    assert exc.value.code == 2
    assert "unknown config key 'data.image_sise'" in capsys.readouterr().err


# ---------------------------------------------------------------------- up-front path checks


def _folders(root: Path) -> Path:
    """One folder of each kind the commands read and write, with only their marker files."""
    (root / "afile").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "archive" / "files").mkdir(parents=True)
    for name, fmt in (("shards", "echo-ray-shards/1"), ("traj", "echo-ray-trajectories/1")):
        (root / name / "shards").mkdir(parents=True)
        (root / name / "manifest.json").write_text(json.dumps({"format": fmt}))
    (root / "unfinished" / "shards").mkdir(parents=True)  # prepare killed before its manifest
    (root / "run" / "model").mkdir(parents=True)
    (root / "run" / "model" / "config.json").write_text("{}")
    (root / "run" / "model" / "echo_config.json").write_text("{}")
    (root / "run" / "checkpoint_0000002").mkdir()
    (root / "run" / "checkpoint_0000002" / "config.json").write_text("{}")
    (root / "run" / "checkpoint_0000002" / "echo_config.json").write_text("{}")
    (root / "run" / "train_summary.json").write_text("{}")
    (root / "running").mkdir()  # a run without its final model yet
    (root / "running" / "metrics.jsonl").write_text("")
    (root / "reports" / "parts").mkdir(parents=True)
    (root / "reports" / "summary.json").write_text(
        json.dumps({"format": "echo-ray-archive-report/1"}))
    (root / "eval").mkdir()
    (root / "eval" / "results.json").write_text("{}")
    return root


@pytest.fixture
def reached(monkeypatch):
    """Replaces every command's function: records the commands that got past their checks
    (so a test never starts Ray, and fails if a check let a bad path through)."""
    calls = []
    for name, (_, add_args, help_text) in list(COMMANDS.items()):
        monkeypatch.setitem(COMMANDS, name, (lambda args, n=name: calls.append(n), add_args,
                                             help_text))
    return calls


def _refused(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line
    return err


def _hf_folder(path: Path, *, model_type="qwen2_5_vl", tokens=("<|vision_start|>",
               "<|vision_end|>", "<|image_pad|>"), tokenizer=True, weights=True) -> str:
    """A plain Hugging Face model folder (no echo_config.json) with only what the folder
    check reads: config.json's model_type, the tokenizer's token strings, a weights file."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    if tokenizer:
        added = [{"id": 151643 + i, "content": t} for i, t in enumerate(tokens)]
        (path / "tokenizer.json").write_text(json.dumps(
            {"added_tokens": added, "model": {"type": "BPE", "vocab": {"a": 0}}}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return str(path)


@pytest.mark.parametrize("kind, folder, message", [
    ("llava", dict(model_type="llava"), "holds a 'llava' model (config.json model_type), not a "
     "Qwen2.5-VL checkpoint ('qwen2_5_vl', e.g. Qwen2.5-VL-7B-Instruct or Lingshu-7B)"),
    ("notok", dict(tokenizer=False), "has no tokenizer (tokenizer.json, or vocab.json + "
     "merges.txt)"),
    ("novision", dict(tokens=("<|vision_start|>",)), "lacks the vision token(s) "
     "<|vision_end|>, <|image_pad|>: it is not a Qwen2.5-VL tokenizer"),
    ("noweights", dict(weights=False), "has no weights (model.safetensors or "
     "pytorch_model.bin)"),
])
@pytest.mark.parametrize("command", ["train", "evaluate", "report", "serve"])
def test_a_plain_hf_folder_that_is_no_qwen2_5_vl_checkpoint_is_refused(
        tmp_path, capsys, reached, command, kind, folder, message):
    t = _folders(tmp_path)
    hf = _hf_folder(t / kind, **folder)
    argv = {
        "train": ["train", "--stage", "ar", "--data", f"{t}/shards", "--out", f"{t}/r",
                  "--init", hf],
        "evaluate": ["evaluate", "--data", f"{t}/shards", "--out", f"{t}/e", "--system",
                     f"base={hf}:ar"],
        "report": ["report", "--checkpoint", hf, "--archive", f"{t}/archive", "--out",
                   f"{t}/x"],
        "serve": ["serve", "--checkpoint", hf],
    }[command]
    err = _refused(capsys, argv)
    flag = {"train": "--init", "evaluate": "--system base:"}.get(command, "--checkpoint")
    assert err.startswith(f"echo-ray {command}: {flag} {hf}: ")
    assert message in err
    assert reached == []


def test_a_plain_qwen2_5_vl_folder_passes_the_checks(tmp_path, capsys, reached):
    t = _folders(tmp_path)
    hf = _hf_folder(t / "qwen")
    main(["train", "--stage", "ar", "--data", f"{t}/shards", "--out", f"{t}/r", "--init", hf])
    main(["evaluate", "--data", f"{t}/shards", "--out", f"{t}/e", "--system", f"base={hf}:ar"])
    main(["serve", "--checkpoint", hf])
    assert reached == ["train", "evaluate", "serve"], capsys.readouterr().err


# (argv with {t} for the folders of _folders, what the line must say)
BAD_PATHS = [
    (["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out", "{t}/afile"],
     "--out {t}/afile is an existing file"),
    (["report", "--checkpoint", "{t}/nope", "--archive", "{t}/archive", "--out", "{t}/o"],
     "--checkpoint {t}/nope: no such folder; pass a run folder of `echo-ray train`"),
    (["report", "--checkpoint", "{t}/shards", "--archive", "{t}/archive", "--out", "{t}/o"],
     "--checkpoint {t}/shards is an `echo-ray prepare` output; pass a run folder"),
    (["report", "--checkpoint", "{t}/run", "--archive", "{t}/run", "--out", "{t}/o"],
     "--archive {t}/run is an `echo-ray train` run folder, not a DICOM archive"),
    (["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out", "{t}/run"],
     "--out {t}/run is an `echo-ray train` run folder; writing here would mix outputs"),
    (["train", "--stage", "ar", "--data", "{t}/nope", "--out", "{t}/r"],
     "--data {t}/nope: no such folder; run `echo-ray prepare --archive ARCHIVE --out {t}/nope`"),
    (["train", "--stage", "ar", "--data", "{t}/empty", "--out", "{t}/r"],
     "--data {t}/empty is not an `echo-ray prepare` output (no manifest.json)"),
    (["train", "--stage", "ar", "--data", "{t}/afile", "--out", "{t}/r"],
     "--data {t}/afile is a file, not a folder"),
    (["train", "--stage", "ar", "--data", "{t}/archive", "--out", "{t}/r"],
     "is a DICOM archive, not a prepared dataset: run `echo-ray prepare --archive {t}/archive"),
    (["train", "--stage", "ar", "--data", "{t}/unfinished", "--out", "{t}/r"],
     "has shards but no manifest.json (written last)"),
    (["train", "--stage", "rad", "--data", "{t}/traj", "--out", "{t}/r", "--init", "{t}/run"],
     "--data {t}/traj is an `echo-ray trajectories` output"),
    (["train", "--stage", "dcd", "--data", "{t}/shards", "--out", "{t}/r", "--init", "{t}/run"],
     "run `echo-ray trajectories --teacher RUN_RAD --data {t}/shards --out TRAJECTORIES`"),
    (["train", "--stage", "rad", "--data", "{t}/shards", "--out", "{t}/r", "--init",
      "{t}/running"], "--init {t}/running is a training run without its final model/"),
    (["train", "--stage", "rad", "--data", "{t}/shards", "--out", "{t}/r", "--init", "{t}/empty"],
     "--init {t}/empty is not a model (no config.json"),
    (["train", "--stage", "ar", "--data", "{t}/shards", "--out", "{t}/shards"],
     "--out {t}/shards is an `echo-ray prepare` output; writing here would mix outputs"),
    (["train", "--stage", "ar", "--data", "{t}/shards", "--out", "{t}/afile/run"],
     "--out {t}/afile/run cannot be created: {t}/afile is a file"),
    (["trajectories", "--teacher", "{t}/empty", "--data", "{t}/shards", "--out", "{t}/x"],
     "--teacher {t}/empty is not a model"),
    (["trajectories", "--teacher", "{t}/run", "--data", "{t}/shards", "--out", "{t}/eval"],
     "--out {t}/eval is an `echo-ray evaluate` output"),
    (["evaluate", "--data", "{t}/shards", "--out", "{t}/e", "--system", "a={t}/run:ar",
      "--system", "b={t}/nope:fused"], "--system b: {t}/nope: no such folder"),
    (["evaluate", "--data", "{t}/archive", "--out", "{t}/e", "--system", "a={t}/run:ar"],
     "--data {t}/archive is a DICOM archive"),
    (["prepare", "--archive", "{t}/archive", "--out", "{t}/reports"],
     "--out {t}/reports is an `echo-ray report` output"),
    (["serve", "--checkpoint", "{t}/run", "--api-keys-file", "{t}/keys"],
     "--api-keys-file {t}/keys: no such file; pass a file with one API key a line"),
    (["serve", "--checkpoint", "{t}/run", "--api-keys-file", "{t}/empty"],
     "--api-keys-file {t}/empty is a folder, not a file; pass a file with one API key"),
    (["synth", "--out", "{t}/afile"], "--out {t}/afile is an existing file"),
    (["quickstart", "--out", "{t}/run"], "--out {t}/run is an `echo-ray train` run folder"),
    (["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out", "{t}/o",
      "--store-sr"], "--store-sr stores SRs back to a dicomweb:// --archive; with a folder or "
     "s3:// archive also pass --sr-destination"),
    (["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out", "{t}/o",
      "--sr-destination", "dimse://PACS@127.0.0.1:4242"],
     "report.sr_destination is used only with report.store_sr"),
    (["report", "--checkpoint", "{t}/run", "--archive",
      "dicomweb://u:s3cret@127.0.0.1:1/dicom-web", "--out", "{t}/o"],
     "echo-ray report: dicomweb://127.0.0.1:1/dicom-web: credentials in the URI are refused"),
    (["report", "--checkpoint", "{t}/run", "--archive", "dicomweb://127.0.0.1:1/dicom-web",
      "--out", "{t}/o"], "dicomweb://127.0.0.1:1/dicom-web: connection refused: is the PACS "
     "running and is the port right?"),
    (["listen", "--checkpoint", "{t}/run", "--spool", "{t}/spool"],
     "--allowed-callers is required"),
    (["listen", "--checkpoint", "{t}/nope", "--spool", "{t}/spool", "--allowed-callers", "A"],
     "--checkpoint {t}/nope: no such folder"),
]


@pytest.mark.parametrize("argv, message", BAD_PATHS, ids=[" ".join(a[:3]) + "|" + m[:30]
                                                          for a, m in BAD_PATHS])
def test_bad_paths_are_refused_up_front_with_one_line(tmp_path, capsys, reached, argv, message):
    t = str(_folders(tmp_path))
    err = _refused(capsys, [a.format(t=t) for a in argv])
    assert message.format(t=t) in err
    assert err.startswith(f"echo-ray {argv[0]}: ")
    assert reached == []  # the command (and so Ray) never started


GOOD_PATHS = [
    ["prepare", "--archive", "{t}/archive", "--out", "{t}/new/shards"],
    ["prepare", "--archive", "{t}/archive", "--out", "{t}/shards"],  # prepare again
    ["train", "--stage", "ar", "--data", "{t}/shards", "--out", "{t}/new"],
    ["train", "--stage", "ar", "--data", "{t}/shards", "--out", "{t}/run"],  # resume
    ["train", "--stage", "ar", "--data", "{t}/shards", "--out", "{t}/running"],
    ["train", "--stage", "rad", "--data", "{t}/shards", "--out", "{t}/r", "--init",
     "{t}/run/checkpoint_0000002"],
    ["train", "--stage", "dcd", "--data", "{t}/traj", "--out", "{t}/r", "--init", "{t}/run"],
    ["trajectories", "--teacher", "{t}/run", "--data", "{t}/shards", "--out", "{t}/traj"],
    ["evaluate", "--data", "{t}/shards", "--out", "{t}/eval", "--system", "a={t}/run:ar",
     "--fluency-model", "{t}/run/model"],
    ["report", "--checkpoint", "{t}/run/model", "--archive", "{t}/empty", "--out",
     "{t}/reports"],  # continue the ledger; a flat folder is an archive
    ["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out",
     "{t}/archive/reports"],
    ["serve", "--checkpoint", "{t}/run"],
    ["synth", "--out", "{t}/archive"],
    ["quickstart", "--out", "{t}/empty"],
    ["report", "--checkpoint", "{t}/run", "--archive", "{t}/archive", "--out", "{t}/reports",
     "--sr", "--store-sr", "--sr-destination", "dimse://PACS@127.0.0.1:4242"],
    ["listen", "--checkpoint", "{t}/run", "--spool", "{t}/spool", "--allowed-callers", "A,B"],
]


@pytest.mark.parametrize("argv", GOOD_PATHS, ids=[" ".join(a[:3]) for a in GOOD_PATHS])
def test_good_paths_pass_the_checks(tmp_path, capsys, reached, argv):
    t = str(_folders(tmp_path))
    main([a.format(t=t) for a in argv])
    assert reached == [argv[0]], capsys.readouterr().err


def test_config_errors_still_come_first(tmp_path, capsys, reached):
    err = _refused(capsys, ["train", "--stage", "ar", "--data", str(tmp_path / "nope"),
                            "--out", str(tmp_path / "r"), "--set", "train.nope=1"])
    assert "unknown config key 'train.nope'" in err


def test_unwritable_output_is_refused(tmp_path, capsys, reached, monkeypatch):
    t = _folders(tmp_path)
    real_access = os.access
    locked = str(t / "empty")
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == locked
                        else real_access(p, mode))  # root may write anywhere: simulate a user
    err = _refused(capsys, ["prepare", "--archive", str(t / "archive"), "--out", locked])
    assert f"--out {locked} is not writable by this user" in err
    err = _refused(capsys, ["prepare", "--archive", str(t / "archive"), "--out",
                            f"{locked}/deeper/shards"])
    assert f"cannot be created: {locked} is not writable" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_is_refused_for_real(tmp_path, capsys, reached):
    t = _folders(tmp_path)
    (t / "empty").chmod(0o500)
    err = _refused(capsys, ["synth", "--out", str(t / "empty" / "a")])
    assert "is not writable" in err


def _in_ray_job(monkeypatch, working_dir: str | None = "gcs://_ray_pkg_0123.zip") -> None:
    """The environment Ray's job supervisor gives an entrypoint."""
    runtime_env = {"working_dir": working_dir} if working_dir else {}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_relative_paths_inside_a_ray_job_are_explained(tmp_path, capsys, reached, monkeypatch):
    t = _folders(tmp_path)
    monkeypatch.chdir(t)  # the unpacked working dir
    _in_ray_job(monkeypatch)
    err = _refused(capsys, ["train", "--stage", "ar", "--data", "quickstart/shards", "--out",
                            str(t / "r")])
    assert "--data quickstart/shards is relative to this Ray job's working dir" in err
    assert "git-ignored folders such as quickstart/ are not uploaded" in err
    assert 'pass an absolute path' in err and '"$PWD/quickstart/shards"' in err
    assert "s3://" in err
    err = _refused(capsys, ["train", "--stage", "ar", "--data", "shards", "--out", "runs/ar"])
    assert "--out runs/ar is relative" in err and "would be deleted with it" in err
    main(["train", "--stage", "ar", "--data", "shards", "--out", str(t / "r")])
    assert reached == ["train"]  # a relative input inside the uploaded copy is fine
    _in_ray_job(monkeypatch, working_dir=None)
    err = _refused(capsys, ["prepare", "--archive", "archive", "--out", "shards2"])
    assert "relative to this Ray job's folder on the head node" in err


def test_outside_a_ray_job_relative_paths_are_plain_paths(tmp_path, capsys, reached,
                                                         monkeypatch):
    monkeypatch.chdir(_folders(tmp_path))
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    err = _refused(capsys, ["train", "--stage", "ar", "--data", "quickstart/shards", "--out",
                            "r"])
    assert "--data quickstart/shards: no such folder; run `echo-ray prepare" in err
    main(["train", "--stage", "ar", "--data", "shards", "--out", "runs/ar"])
    assert reached == ["train"]


def test_s3_paths_are_checked_with_a_request_or_left_to_the_job(s3_endpoint, tmp_path, capsys,
                                                                reached):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="cli")
    s3.put_object(Bucket="cli", Key="data/shards/manifest.json",
                  Body=json.dumps({"format": "echo-ray-shards/1"}).encode())
    s3.put_object(Bucket="cli", Key="runs/ar/model/config.json", Body=b"{}")
    s3.put_object(Bucket="cli", Key="out/taken", Body=b"a file")
    ep = ["--s3-endpoint", s3_endpoint]
    err = _refused(capsys, ["train", "--stage", "ar", "--data", "s3://cli/data/nope", "--out",
                            "s3://cli/runs/x", *ep])
    assert "--data s3://cli/data/nope: no such folder" in err
    err = _refused(capsys, ["train", "--stage", "ar", "--data", "s3://cli/data/shards",
                            "--out", "s3://cli/out/taken", *ep])
    assert "--out s3://cli/out/taken is an existing file" in err
    err = _refused(capsys, ["train", "--stage", "rad", "--data", "s3://cli/data/shards",
                            "--out", "s3://cli/runs/rad", "--init", "s3://cli/data/shards", *ep])
    assert "--init s3://cli/data/shards is an `echo-ray prepare` output" in err
    main(["train", "--stage", "rad", "--data", "s3://cli/data/shards", "--out",
          "s3://cli/runs/rad", "--init", "s3://cli/runs/ar", *ep])
    assert reached == ["train"]
    # S3 unreachable: nothing can be checked up front; the job reports it
    main(["report", "--checkpoint", "s3://cli/runs/ar", "--archive", "s3://cli/pacs", "--out",
          "s3://cli/reports", "--s3-endpoint", "http://127.0.0.1:9"])
    assert reached == ["train", "report"]


def test_job_script_refuses_early_with_one_line_and_no_traceback(tmp_path):
    t = _folders(tmp_path)
    done = subprocess.run(
        [sys.executable, "jobs/report_archive.py", "--checkpoint", str(t / "run"), "--archive",
         str(t / "archive"), "--out", str(t / "afile")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"echo-ray report: --out {t / 'afile'} is an existing file, not a folder: pass a new "
        "folder (or this command's earlier output folder, to continue it)"]


def test_job_entry_names_a_python_without_echo_rays_environment(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(SystemExit) as exc:
        cli.job_entry("prepare")(["--archive", "a", "--out", "b"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "has no torch" in err and "source .venv/bin/activate" in err


def test_folder_kinds_match_the_files_the_stages_write():
    """cli._KINDS names the stages' files and formats; they must be the stages' own."""
    from echo_ray.batch import job as batch_job
    from echo_ray.batch.ledger import PARTS_DIR
    from echo_ray.data import prepare
    from echo_ray.data.shards import MANIFEST
    from echo_ray.distill import rollout
    from echo_ray.eval.tables import RESULTS_FILE
    from echo_ray.train import driver, worker

    kinds = {(kind, marker): fmt for kind, marker, fmt, _ in cli._KINDS}
    assert kinds[("shards", MANIFEST)] == "echo-ray-shards"
    assert '"format": "echo-ray-shards/' in inspect.getsource(prepare._manifest)
    assert rollout.FORMAT.startswith(kinds[("trajectories", MANIFEST)] + "/")
    assert batch_job.FORMAT.startswith(kinds[("report", batch_job.SUMMARY_FILE)] + "/")
    assert ("report", PARTS_DIR) in kinds
    assert ("run", driver.SUMMARY_FILE) in kinds and ("run", worker.METRICS_FILE) in kinds
    assert ("evaluation", RESULTS_FILE) in kinds


# ---------------------------------------------------------------------- --help


def _options(command: str) -> list[argparse.Action]:
    return [a for a in build_parser(command)._actions
            if a.option_strings and a.help != argparse.SUPPRESS and a.dest != "help"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_documents_every_flag_and_shows_defaults(command):
    def squeeze(text: str) -> str:  # argparse wraps lines, also at hyphens
        return "".join(text.split())

    text = squeeze(build_parser(command).format_help())
    for action in _options(command):
        assert action.help and len(action.help.split()) >= 2, (command, action.option_strings)
        flag = action.option_strings[0]
        if action.dest.startswith("cfg__"):
            key = action.dest[len("cfg__"):].replace("__", ".")
            assert squeeze(f"({key}; {default_text(key)})") in text, (command, flag)
        elif action.default not in (None, [], argparse.SUPPRESS):
            assert squeeze(f"(default: {action.default})") in text, (command, flag)


def test_config_flags_show_the_default_presets_value_and_other_presets():
    text = " ".join(build_parser("train").format_help().split())
    assert "(train.max_steps; default 500; base-7b, base-3b: 5000)" in text
    assert "(train.use_gpu; default false; base-7b, base-3b: true)" in text
    assert set(FLAGS) >= {"prepare", "train", "trajectories", "evaluate", "report", "serve"}


# ---------------------------------------------------------------------- README recipes


def _readme_block(marker: str) -> str:
    """The fenced bash block that follows `<!-- recipe: MARKER -->` in README.md."""
    text = (REPO / "README.md").read_text()
    start = text.index(f"<!-- recipe: {marker} -->")
    body = text[text.index("```bash\n", start) + len("```bash\n"):]
    return body[:body.index("```\n")]


def _session_pids(sid: int) -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                pids.append(proc.pid)
        except (ProcessLookupError, PermissionError):
            continue
    return pids


def _stop_session(sid: int, timeout: float = 90.0) -> None:
    """Stop the head this test started: SIGTERM its process group, then SIGKILL whatever of
    its session is left (its workers run in groups of their own). Never `ray stop`."""
    import signal
    import time

    try:
        os.killpg(sid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(2)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ECHO_RAY_TEST_RECIPES"),
                    reason="starts its own Ray head and submits two jobs (about 2 min): "
                           "`make cluster-recipe`, or set ECHO_RAY_TEST_RECIPES=1")
def test_readme_recipe_local_head(tmp_path):
    """README "On a Ray cluster": the local-head block runs as written (only its ports, temp
    dir and data folder are this test's), then a relative path fails early and clearly."""
    import socket
    import tempfile

    block = _readme_block("local-head")
    socks = [socket.socket() for _ in range(5)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    gcs, dash, client, agent, metrics = (s.getsockname()[1] for s in socks)
    for s in socks:
        s.close()
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths
    data = tmp_path / "demo"
    for literal, ours in (("6390", str(gcs)), ("8266", str(dash)),
                          ("/tmp/echo-ray-head", temp_dir), ("$PWD/runs/demo", str(data))):
        assert literal in block, f"README recipe no longer has {literal!r}: update this test"
        block = block.replace(literal, ours)
    pid_file, head_log = tmp_path / "head.pid", tmp_path / "head.log"
    # `ray start --head` keeps the README's arguments and gets --block (so the head is this
    # script's child, in its own session, stoppable without `ray stop`) and loopback-only
    # ports of its own, beside other Rays on this machine.
    shim = f"""
set -euo pipefail
ray() {{
  if [ "${{1-}} ${{2-}}" = "start --head" ]; then
    shift 2
    setsid "$(command -v ray)" start --head --block "$@" --node-ip-address=127.0.0.1 \\
      --dashboard-host=127.0.0.1 --ray-client-server-port={client} \\
      --dashboard-agent-listen-port={agent} --metrics-export-port={metrics} \\
      > {head_log} 2>&1 &
    echo $! > {pid_file}
    for _ in $(seq 90); do
      command ray job list --address http://127.0.0.1:{dash} > /dev/null 2>&1 && return 0
      kill -0 "$(cat {pid_file})" || {{ cat {head_log}; return 1; }}
      sleep 2
    done
    return 1
  fi
  command ray "$@"
}}
"""
    relative = f"""
ray job submit --address http://127.0.0.1:{dash} --working-dir . -- \\
    python jobs/prepare.py --archive quickstart/archive --out {data}/shards2 \\
    > {tmp_path}/relative.log 2>&1 && echo relative=0 || echo "relative=$?"
"""
    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p != venv_bin)  # a fresh shell: the README activates the venv
    env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")},
           "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_AUTH_MODE", None)
    try:
        done = subprocess.run(["bash", "-c", shim + block + relative], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=900)
    finally:
        if pid_file.exists():
            _stop_session(int(pid_file.read_text()))
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)
    log = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, log
    assert "Job 'raysubmit_" in done.stdout and "' succeeded" in done.stdout, log
    manifest = json.loads((data / "shards" / "manifest.json").read_text())
    assert manifest["format"].startswith("echo-ray-shards") and manifest["studies"] == 24
    assert "relative=0" not in done.stdout
    rel = (tmp_path / "relative.log").read_text()
    assert ("echo-ray prepare: --archive quickstart/archive is relative to this Ray job's "
            "working dir") in rel, rel[-3000:]
    assert "git-ignored folders such as quickstart/ are not uploaded" in rel
    assert "Traceback" not in rel


def test_report_refuses_a_decoding_mode_the_checkpoint_was_not_trained_for(
        tmp_path, capsys, reached):
    t = _folders(tmp_path)
    argv = ["report", "--checkpoint", str(t / "run"), "--archive", str(t / "archive"),
            "--out", str(t / "o")]
    (t / "run" / "model" / "echo_config.json").write_text(json.dumps({"train": {"stage": "ar"}}))
    err = _refused(capsys, argv)  # the default decoding is one-step-fused
    assert (f"--checkpoint {t}/run was trained by `--stage ar`: it decodes with ar, not "
            "one-step-fused; pass --decoding ar") in err
    main([*argv, "--decoding", "ar"])
    assert reached == ["report"]
    (t / "run" / "model" / "echo_config.json").write_text(json.dumps({"train": {"stage": "dcd"}}))
    main(argv)  # a DCD student's own mode
    assert reached == ["report", "report"]
    # a vision pre-training run writes no reports in any mode: refused with the way out
    (t / "run" / "model" / "echo_config.json").write_text(
        json.dumps({"train": {"stage": "vision"}}))
    err = _refused(capsys, [*argv, "--decoding", "ar"])
    assert f"--checkpoint {t}/run: a checkpoint of `--stage vision`" in err
    assert "writes no reports: it is the --init of `echo-ray train --stage ar`" in err
    assert reached == ["report", "report"]
