"""`echo-ray quickstart`: the whole pipeline on the embedded default (local Ray, a synthetic
archive, the tiny preset), stage by stage, ending with example reports and the evaluation
table."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from echo_ray.config.overrides import apply_overrides, load_config

QUICKSTART_STAGES = 9
# The vision stage trains the tower alone (no language model in the loss): twice the
# rows per step of the others cost less than one of their steps.
VISION_BATCH_SIZE = 16


# Diagnosis tokens on, the head calling a finding from probability 0.4: on the validation
# split its calls' micro F1 ties at 0.35-0.45 and is 0.015 lower at 0.5 (docs/ARCHITECTURE.md
# section 5.14).
DIAGNOSIS_SETTINGS = ("model.diagnosis_prompt=true", "model.diagnosis_threshold=0.4")

# The student's loss: cross-entropy on the tokens the teacher committed (sequence-level
# distillation), each position weighing the same. On the same teacher and rollouts the
# paper's soft top-k KL left it 4 points of CE F1 micro-14 behind the teacher; 600 steps on
# hard targets weighted by commit step 1.4-1.9 points, weighted uniformly 0.8-1.5 (seeds
# differ; docs/ARCHITECTURE.md section 5.14).
DCD_SETTINGS = ("train.dcd_target=hard", "train.dcd_step_weighting=uniform")

# Training steps per stage (the CLI's --vision-steps, --ar-steps, ... defaults).
QUICKSTART_STEPS = {"vision": 400, "ar": 300, "rad": 300, "dcd": 600}


def run_quickstart(
    out: str | Path,
    *,
    preset: str = "tiny",
    config_file: str | None = None,
    overrides: list[str] | None = None,
    studies: int = 2000,
    image_size: int = 256,
    seed: int = 0,
    steps: dict[str, int] | None = None,
    examples: int = 3,
) -> dict:
    """synth -> prepare -> train vision -> train ar -> train rad -> trajectories -> train dcd
    -> evaluate.

    The vision stage pre-trains the vision tower on the train split's labels: it stands in
    for the pretrained tower a real checkpoint brings (docs/ARCHITECTURE.md), and is what
    makes the tiny models read the image.

    Args:
        overrides: `--set` overrides applied to every stage's config.
        steps: training steps per stage ("vision", "ar", "rad", "dcd"); 0 vision steps
            skips that stage (AR then trains its tower from scratch).
    """
    from echo_ray.data.prepare import prepare_shards, summarize_manifest
    from echo_ray.distill.rollout import generate_trajectories
    from echo_ray.eval.job import evaluate as run_evaluation
    from echo_ray.runtime.cluster import init_ray
    from echo_ray.synth.archive import synthesize_archive
    from echo_ray.train.driver import train as run_training

    out = Path(out)
    overrides = list(overrides or [])
    steps = {**QUICKSTART_STEPS, **(steps or {})}
    config = load_config(preset, overrides, config_file)
    # built before any stage runs: a config that cannot take it fails in seconds, not at
    # the end of the run
    eval_config = evaluation_config(config)
    start = time.perf_counter()

    def stage(number: int, text: str) -> None:
        print(f"[{number}/{QUICKSTART_STAGES}] {text} "
              f"({time.perf_counter() - start:.0f} s so far)", flush=True)

    # One local Ray for every stage, with the dashboard: Ray Train's placement-group cleaner
    # queries the state API, and warns every few seconds without it.
    init_ray(None, dashboard=True)
    stage(1, f"synth: {studies} synthetic studies -> {out / 'archive'}")
    summary = synthesize_archive(
        str(out / "archive"), num_studies=studies, seed=seed, image_size=image_size,
        lateral_fraction=0.3, lateral_only_fraction=0.0, workers=min(4, os.cpu_count() or 1),
    )
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    stage(2, f"prepare: DICOM shards -> {out / 'shards'}")
    manifest = prepare_shards(str(out / "archive"), str(out / "shards"), config)
    print(summarize_manifest(manifest))
    runs = {}

    def train_stage(number, name, data, init, extra=()):
        stage(number, f"train {name}: {steps[name]} steps -> {out / 'runs' / name}")
        stage_overrides = (*extra, *overrides, f"train.max_steps={steps[name]}")
        runs[name] = run_training(
            name, str(data), str(out / "runs" / name),
            load_config(preset, stage_overrides, config_file), init=init and str(init),
            overrides=stage_overrides,
        )

    if steps["vision"]:
        # Diagnosis tokens: the vision stage trains the label head the prompt's findings
        # come from (model/diagnosis.py; README: what made the models read the image).
        train_stage(3, "vision", out / "shards", None,
                    extra=(f"train.batch_size={VISION_BATCH_SIZE}", *DIAGNOSIS_SETTINGS))
        # AR keeps the pre-trained tower frozen: trained on by the report loss from the
        # start, it loses what the labels taught it (README: what made the models read).
        train_stage(4, "ar", out / "shards", out / "runs" / "vision",
                    extra=("train.freeze_vision=true",))
    else:
        stage(3, "train vision: skipped (0 steps): the AR stage trains its tower from scratch")
        train_stage(4, "ar", out / "shards", None)
    train_stage(5, "rad", out / "shards", out / "runs" / "ar")
    stage(6, f"trajectories: the RAD teacher's multi-step rollouts -> {out / 'trajectories'}")
    generate_trajectories(str(out / "runs" / "rad"), str(out / "shards"),
                          str(out / "trajectories"), config)
    # The student learns the tokens the teacher wrote, not its probabilities, every token
    # weighing the same (docs/ARCHITECTURE.md section 5.14).
    train_stage(7, "dcd", out / "trajectories", out / "runs" / "rad", extra=DCD_SETTINGS)
    systems = [f"ar={runs['ar'].model}:ar", f"teacher={runs['rad'].model}:multi-step",
               f"teacher_onestep={runs['rad'].model}:one-step-fused",
               f"echo={runs['dcd'].model}:one-step-fused"]
    stage(8, "evaluate on the test split: ar (autoregressive), teacher (RAD, multi-step), "
             "teacher_onestep (RAD forced to one step per block), echo (the DCD student, one "
             f"step per block, fused cache) -> {out / 'eval'}")
    evaluation = run_evaluation(str(out / "shards"), str(out / "eval"), systems, eval_config)
    stage(9, f"reports for {examples} test images, then the evaluation table")
    print(example_reports(out / "eval", examples))
    print()
    print(evaluation.table())
    if intervals := evaluation.intervals():
        print("\n" + intervals)
    print(f"(all figures: {out / 'eval' / 'results.md'}; plot: "
          f"{out / 'eval' / 'quality_vs_speed.png'}; {time.perf_counter() - start:.0f} s)")
    student = out / "runs" / "dcd" / "model"
    print(f"\nnext: serve the student over HTTP (README: Serving), or report an archive "
          f"(README: Bulk reporting):\n"
          f"  ECHO_RAY_API_KEYS=change-me echo-ray serve --checkpoint {student}\n"
          f"  echo-ray report --checkpoint {student} --archive {out / 'archive'} "
          f"--out {out / 'reports'}")
    return {"manifest": manifest, "runs": {k: v.model for k, v in runs.items()},
            "results": evaluation.results}


def evaluation_config(config):
    """The evaluation stage's config: `config`, comparing the systems to "teacher" (paired
    bootstrap differences in results.md: is the student the teacher's equal?) unless the
    caller compares to another system or turned the bootstrap off
    (`evaluate.bootstrap_samples=0`, which a comparison needs)."""
    if config.evaluate.compare_to is not None or config.evaluate.bootstrap_samples == 0:
        return config
    return apply_overrides(config, ["evaluate.compare_to=teacher"])


def example_reports(eval_dir: Path, count: int) -> str:
    """Reports each evaluated system wrote for the first `count` images (reports.parquet)."""
    import pyarrow.parquet as pq

    from echo_ray.eval.job import REPORTS_FILE

    rows = pq.read_table(eval_dir / REPORTS_FILE).to_pylist()
    systems = list(dict.fromkeys(r["system"] for r in rows))
    images = list(dict.fromkeys(r["dicom_id"] for r in rows))[:count]
    by_key = {(r["system"], r["dicom_id"]): r for r in rows}
    width = max(len("reference"), *(len(s) for s in systems))
    lines = []
    for dicom_id in images:
        first = by_key[(systems[0], dicom_id)]
        lines += ["", f"--- test image {dicom_id} ({first['view_position']})",
                  f"{'reference':>{width}}: {first['reference']}"]
        for system in systems:
            r = by_key[(system, dicom_id)]
            if r["error"] is not None:
                lines.append(f"{system:>{width}}: error: {r['error']}")
                continue
            lines.append(f"{system:>{width}}: {r['report']}")
            lines.append(f"{'':>{width}}  ({r['num_tokens']} tokens, {r['batch_forwards']} "
                         f"forwards for its batch of {r['batch_size']}, {r['decoding']})")
    return "\n".join(lines)
