"""The whole pipeline started from a plain Hugging Face Qwen2.5-VL folder on the real Qwen
vocabulary (`tests/helpers/qwen_folder.py`: the real tokenizer, chat template, ids, 151,936
embedding rows, RoPE and M-RoPE layout, at tiny depth and width): `train --init` AR, RAD
from it, trajectories, DCD, evaluate, the Serve endpoint and the bulk job. Checks what a real
checkpoint changes: the tokenizer's ids in every stage, the chat-template prompt, the
`<|mask|>` row, trajectory storage at a 152k vocabulary, banned ids, and saved folders that
other tools open.
"""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers.prepared_shards import edit_first_shard, prepare_test_shards
from helpers.qwen_folder import (
    BASE_VOCAB,
    QWEN_IDS,
    VARIANTS,
    cached_qwen_hf_folder,
    tokenizer_files_dir,
)
from safetensors.torch import load_file

from echo_ray.batch.job import report_archive
from echo_ray.cli import run
from echo_ray.config.overrides import apply_overrides
from echo_ray.config.schema import EchoConfig, ModelConfig
from echo_ray.data.dicom import decode_dicom
from echo_ray.decode.sampler import generate
from echo_ray.model.checkpoint import load_checkpoint
from echo_ray.model.hf import load_pretrained
from echo_ray.model.prompt import QWEN2_5_VL_CHAT_TEMPLATE
from echo_ray.synth.archive import synthesize_archive
from echo_ray.synth.dicom_writer import write_dicom
from echo_ray.text.tokenizer import MASK_TOKEN

pytestmark = [pytest.mark.ray, pytest.mark.slow]

IMAGE_SIZE = 56  # 4 image tokens
MAX_RESPONSE_LEN = 8
BLOCK_LENGTH = 4
# The training reports: 3 to 6 Qwen tokens, so <|im_end|> is in every target
SHORT_REPORTS = ("Normal chest.", "No acute findings.", "Small left effusion.", "Clear lungs.",
                 "Cardiomegaly.")
# The model section `--init` gives the plain folder (and evaluate its zero-shot run).
MODEL_SETTINGS = [
    f"model.image_size={IMAGE_SIZE}",
    f"model.max_response_len={MAX_RESPONSE_LEN}",
    f"model.block_length={BLOCK_LENGTH}",
]
# Small and quick on 2 cores: one worker (no all-reduce of the 152k-row embedding), batches
# of 4, a few steps per stage.
TRAIN_SETTINGS = [
    "train.num_workers=1",
    "train.batch_size=4",
    "train.warmup_steps=1",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "train.shuffle_buffer=0",
    "train.lr=3e-3",
]
POOL = ["pool.cpus_per_actor=0.5", "pool.threads=1"]
TOP_K = 4
# The trajectory columns a position costs (the DICOM bytes and the reference travel along).
TRAJECTORY_COLUMNS = ("tokens", "commit_step", "top_ids", "top_probs", "mass")


def _sets(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def _train(stage: str, data: Path, out: Path, init: Path, steps: int) -> Path:
    run("train", ["--stage", stage, "--data", str(data), "--out", str(out), "--init", str(init),
                  "--preset", "tiny",
                  *_sets([*MODEL_SETTINGS, *TRAIN_SETTINGS, f"train.max_steps={steps}",
                          f"train.checkpoint_every={steps}"])])
    return out / "model"


# ---------------------------------------------------------------------- the chain


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return cached_qwen_hf_folder(tmp_path_factory, variant="3b", image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> Path:
    """Prepared shards whose reports are then cut to a few words, so that `<|im_end|>` is in
    every target and the tiny teacher ends its rollouts after a few steps (one whose rollouts
    never end leaves DCD nothing). After so few steps it mostly ends them at once (empty
    reports): the chain proves ids, formats and plumbing; `test_decoding_never_writes_a_
    banned_id` proves the ban with a head that pushes every banned id."""
    out = prepare_test_shards(tmp_path_factory, num_studies=12, seed=18, image_size=64)

    def shorten(rows):
        for k, row in enumerate(rows):
            row["report_normalized"] = SHORT_REPORTS[k % len(SHORT_REPORTS)]

    edit_first_shard(out, shorten)
    assert len(list((out / "shards").glob("*.parquet"))) == 1
    return out


@pytest.fixture(scope="module")
def ar_model(qwen, shards, tmp_path_factory) -> Path:
    return _train("ar", shards, tmp_path_factory.mktemp("runs") / "ar", qwen, steps=4)


@pytest.fixture(scope="module")
def rad_model(ar_model, shards, tmp_path_factory) -> Path:
    return _train("rad", shards, tmp_path_factory.mktemp("runs") / "rad", ar_model.parent,
                  steps=8)


@pytest.fixture(scope="module")
def trajectories(rad_model, shards, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trajectories")
    manifest = run("trajectories", [
        "--teacher", str(rad_model.parent), "--data", str(shards), "--out", str(out),
        *_sets([f"trajectories.top_k={TOP_K}", "trajectories.batch_size=4",
                "trajectories.min_repeats=0", *POOL])])
    return out, manifest


@pytest.fixture(scope="module")
def dcd_model(trajectories, rad_model, tmp_path_factory) -> Path:
    return _train("dcd", trajectories[0], tmp_path_factory.mktemp("runs") / "dcd",
                  rad_model.parent, steps=2)


@pytest.fixture(scope="module")
def evaluated(qwen, shards, dcd_model, tmp_path_factory):
    """The student, and the plain folder zero-shot (its AR decoding also scores fluency)."""
    out = tmp_path_factory.mktemp("eval")
    evaluation = run("evaluate", [
        "--data", str(shards), "--out", str(out),
        "--system", f"student={dcd_model.parent}:one-step-fused",
        "--system", f"base={qwen}:ar",
        # the model section the plain folder is scored with (zero-shot)
        *_sets(["evaluate.batch_size=4", "evaluate.ratescore=false", *POOL, *MODEL_SETTINGS])])
    return out, evaluation


def _torchvision_missing() -> str | None:
    """Why `AutoProcessor` cannot open a Qwen2.5-VL folder here (its video processor needs
    torchvision; the CUDA wheel does not import on a CPU-only torch), or None."""
    try:
        import torchvision  # noqa: F401
    except Exception as e:  # ImportError, or RuntimeError from a CUDA build on CPU torch
        return f"torchvision does not import ({type(e).__name__}: {e})"
    return None


def _prompt_messages(instruction: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                            "text": instruction}]}]


def _processor_prompt_ids(folder: Path, instruction: str) -> list[int]:
    """The ids Qwen2.5-VL's processor gives a folder's one-image prompt: its chat template
    (chat_template.jinja, else chat_template.json, as `AutoProcessor` reads them) rendered
    with the generation prompt, `<|image_pad|>` repeated for the image processor's grid.
    `AutoProcessor` itself when torchvision imports; else the same steps from
    `AutoImageProcessor` and `AutoTokenizer` (the processor's other two parts)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    messages = _prompt_messages(instruction)
    if _torchvision_missing() is None:
        processor = AutoProcessor.from_pretrained(str(folder))
        text = processor.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        return processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]\
            .tolist()
    jinja, legacy = folder / "chat_template.jinja", folder / "chat_template.json"
    template = jinja.read_text() if jinja.is_file() else json.loads(legacy.read_text())[
        "chat_template"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    text = tokenizer.apply_chat_template(messages, chat_template=template,
                                         add_generation_prompt=True, tokenize=False)
    images = AutoImageProcessor.from_pretrained(str(folder))(images=[image],
                                                            return_tensors="pt")
    merge = json.loads((folder / "preprocessor_config.json").read_text())["merge_size"]
    num_image_tokens = int(images["image_grid_thw"][0].prod()) // merge**2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * num_image_tokens)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------- the fixture itself


def test_the_wheel_carries_qwen_tokenizer_files_at_the_qwen2_5_vl_ids():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_files_dir()))
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_IDS} == QWEN_IDS
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.bos_token is None
    assert min(tokenizer.added_tokens_decoder) == BASE_VOCAB  # BPE ids below, specials above
    assert len(tokenizer) < min(v["vocab_size"] for v in VARIANTS.values())  # spare rows
    assert MASK_TOKEN not in tokenizer.get_vocab()  # the project adds it
    # its own template is Qwen3's text-only one: the folder gets Qwen2.5-VL's
    assert "<|vision_start|>" not in (tokenizer.chat_template or "")
    assert "<|vision_start|><|image_pad|><|vision_end|>" in QWEN2_5_VL_CHAT_TEMPLATE


@pytest.mark.parametrize("variant", ["3b", "7b"])
def test_the_folder_is_a_real_format_qwen2_5_vl_checkpoint(tmp_path_factory, variant):
    from transformers import Qwen2_5_VLForConditionalGeneration

    folder = cached_qwen_hf_folder(tmp_path_factory, variant=variant, image_size=IMAGE_SIZE)
    flat = json.loads((folder / "config.json").read_text())
    assert flat["model_type"] == "qwen2_5_vl" and "text_config" not in flat  # the hub layout
    backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder))
    rows = backbone.get_input_embeddings().weight.shape[0]
    assert rows == VARIANTS[variant]["vocab_size"]
    tied = backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight
    assert tied == VARIANTS[variant]["tie_word_embeddings"]
    text = backbone.config.text_config
    assert text.rope_parameters["rope_theta"] == 1e6
    assert sum(text.rope_parameters["mrope_section"]) == text.hidden_size // \
        text.num_attention_heads // 2
    assert backbone.config.image_token_id == QWEN_IDS["<|image_pad|>"]
    weights = load_file(folder / "model.safetensors")
    assert "model.embed_tokens.weight" in weights and "visual.patch_embed.proj.weight" in weights
    assert ("lm_head.weight" in weights) != VARIANTS[variant]["tie_word_embeddings"]
    _check_image_processor(folder)


def _check_image_processor(folder: Path) -> None:
    """The folder's preprocessor_config.json opens as Qwen2.5-VL's image processor, fixed to
    the model's image size."""
    from transformers import AutoImageProcessor

    images = AutoImageProcessor.from_pretrained(str(folder))
    assert type(images).__name__.startswith("Qwen2VLImageProcessor")
    # min_pixels / max_pixels, as transformers 5 names them
    assert images.size["shortest_edge"] == images.size["longest_edge"] == IMAGE_SIZE**2
    assert (images.patch_size, images.merge_size, images.temporal_patch_size) == (14, 2, 2)
    assert list(images.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])


# ---------------------------------------------------------------------- loading: D1 / D2


@pytest.mark.parametrize(("variant", "tokenizer_template"), [("3b", "vl"), ("7b", "text-only")])
def test_loading_initialises_the_mask_row_and_renders_the_chat_template(
    tmp_path_factory, variant, tokenizer_template
):
    folder = cached_qwen_hf_folder(tmp_path_factory, variant=variant, image_size=IMAGE_SIZE,
                                   tokenizer_template=tokenizer_template)
    config = ModelConfig(pretrained_path=str(folder), image_size=IMAGE_SIZE,
                         max_response_len=MAX_RESPONSE_LEN, block_length=BLOCK_LENGTH)
    model = load_pretrained(folder, config)
    tok = model.tokenizer
    assert model.mask_token_id == len(tok) - 1 == 151669  # added after Qwen's 151,669 tokens
    assert model.vocab_size == VARIANTS[variant]["vocab_size"]  # no resize: a spare row
    assert (model.eos_token_id, model.pad_token_id, model.image_token_id) == (
        QWEN_IDS["<|im_end|>"], QWEN_IDS["<|endoftext|>"], QWEN_IDS["<|image_pad|>"])

    # <|mask|>: embedding and output-head rows = the mean of the base vocabulary's rows
    saved = load_file(folder / "model.safetensors")
    emb = model.backbone.get_input_embeddings().weight.detach().float()
    head = model.backbone.get_output_embeddings().weight.detach().float()
    for name, weight in (("embedding", emb), ("head", head)):
        expected = weight[:BASE_VOCAB].mean(0)
        assert torch.allclose(weight[model.mask_token_id], expected, atol=1e-5), name
    spare = saved["model.embed_tokens.weight"][model.mask_token_id].float()
    assert not torch.allclose(emb[model.mask_token_id], spare)  # not the random spare row
    if "lm_head.weight" in saved:
        assert not torch.allclose(head[model.mask_token_id],
                                  saved["lm_head.weight"][model.mask_token_id].float())

    # D1: the prompt is the checkpoint's chat template with the image placeholder expanded
    assert model.prompt_ids.tolist() == _processor_prompt_ids(folder, config.instruction)
    assert model.prompt_ids.tolist().count(QWEN_IDS["<|image_pad|>"]) == model.num_image_tokens
    assert tok.decode(model.prompt_ids[:3]).startswith("<|im_start|>system")

    # D2: every id decoding must never write
    banned = set(model.banned_token_ids.tolist())
    assert banned == _expected_banned(tok, model.vocab_size)


def _expected_banned(tokenizer, vocab_size: int) -> set[int]:
    """D2 written out: the spare rows and every added/special token but <eos>."""
    added = set(tokenizer.added_tokens_decoder)
    specials = {tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}
    return (added | specials | set(range(len(tokenizer), vocab_size))) - {
        tokenizer.eos_token_id}


# ---------------------------------------------------------------------- the chain's checks


@pytest.mark.parametrize("stage", ["ar_model", "rad_model", "trajectories", "dcd_model"])
def test_every_stage_keeps_the_qwen_ids(request, qwen, stage):
    from transformers import AutoTokenizer

    output = request.getfixturevalue(stage)
    folder = output[0] / "tokenizer" if stage == "trajectories" else output
    base = AutoTokenizer.from_pretrained(str(qwen)).get_vocab()
    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    assert {t: vocab[t] for t in QWEN_IDS} == QWEN_IDS
    assert vocab == {**base, MASK_TOKEN: len(base)}  # Qwen's ids, then <|mask|>, nothing else
    assert (tok.eos_token, tok.pad_token, tok.mask_token) == (
        "<|im_end|>", "<|endoftext|>", MASK_TOKEN)
    assert tok.chat_template == QWEN2_5_VL_CHAT_TEMPLATE  # the prompt's template travels too
    if stage == "trajectories":
        return
    model, config = load_checkpoint(folder)
    assert (model.eos_token_id, model.pad_token_id, model.mask_token_id) == (
        QWEN_IDS["<|im_end|>"], QWEN_IDS["<|endoftext|>"], len(base))
    assert model.vocab_size == VARIANTS["3b"]["vocab_size"]
    prompt = model.prompt_ids.tolist()
    assert tok.decode(prompt).startswith("<|im_start|>system\n")
    assert tok.decode(prompt).endswith(config.model.instruction
                                       + "<|im_end|>\n<|im_start|>assistant\n")
    start = prompt.index(QWEN_IDS["<|vision_start|>"])
    assert prompt[start + 1:start + 2 + model.num_image_tokens] == [
        QWEN_IDS["<|image_pad|>"]] * model.num_image_tokens + [QWEN_IDS["<|vision_end|>"]]
    assert config.model.max_response_len == MAX_RESPONSE_LEN


def test_saved_models_open_in_transformers(ar_model, dcd_model):
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    for folder in (ar_model, dcd_model):
        _check_image_processor(folder)
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == QWEN_IDS["<|image_pad|>"]
        ours, config = load_checkpoint(folder)
        # the saved chat template gives the prompt the model was trained with
        assert _processor_prompt_ids(folder, config.model.instruction) == \
            ours.prompt_ids.tolist()
        backbone = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(folder))
        assert backbone.get_input_embeddings().weight.shape[0] == VARIANTS["3b"]["vocab_size"]
        theirs = backbone.state_dict()
        for name, value in ours.backbone.state_dict().items():
            assert torch.equal(value, theirs[name]), name


def test_saved_models_open_with_auto_processor(ar_model, dcd_model):
    missing = _torchvision_missing()
    if missing:
        pytest.skip(f"AutoProcessor builds Qwen2.5-VL's video processor: {missing}")
    from transformers import AutoProcessor

    for folder in (ar_model, dcd_model):
        processor = AutoProcessor.from_pretrained(str(folder))
        assert processor.image_processor.size["shortest_edge"] == IMAGE_SIZE**2
        assert "<|vision_start|><|image_pad|><|vision_end|>" in processor.apply_chat_template(
            _prompt_messages("x"), add_generation_prompt=True, tokenize=False)


def test_trajectories_store_top_k_only_at_a_152k_vocabulary(trajectories, rad_model):
    out, manifest = trajectories
    assert manifest["splits"]["train"]["rollouts"] > 0, manifest["dropped"]
    positions, payload, chunks = 0, 0, 0
    for file in (out / "shards").glob("*.parquet"):
        meta = pq.ParquetFile(file).metadata
        names = [meta.schema.column(j).path.split(".")[0] for j in range(meta.num_columns)]
        for rg in range(meta.num_row_groups):
            group = meta.row_group(rg)
            stored = [j for j in range(meta.num_columns) if names[j] in TRAJECTORY_COLUMNS]
            payload += sum(group.column(j).total_compressed_size for j in stored)
            chunks += len(stored)
        rows = pq.read_table(file, columns=["top_ids", "commit_step"]).to_pylist()
        positions += sum(len(r["commit_step"]) for r in rows)
        assert all(len(ids) == TOP_K for r in rows for ids in r["top_ids"])
    assert positions > 0
    # A position costs its top-k ids (int32) and probabilities (float32), its mass, commit
    # step and token: 4 * (2k + 3) = 44 bytes before compression, plus Parquet's fixed cost
    # per column chunk. A 152k-row distribution would be 600 kB a position.
    assert payload <= 4 * (2 * TOP_K + 3) * positions + 512 * chunks, (payload, positions)
    banned = _expected_banned(load_checkpoint(rad_model)[0].tokenizer,
                              VARIANTS["3b"]["vocab_size"])
    for r in pq.read_table(out / "shards", columns=["tokens", "top_ids"]).to_pylist():
        assert not banned & set(r["tokens"])
        assert not banned & {ids[0] for ids in r["top_ids"]}


def test_decoding_never_writes_a_banned_id(dcd_model, shards):
    """Every mode, with the head pushed toward every banned id (+50 logits): the ban, not
    luck, keeps them out."""
    model, _ = load_checkpoint(dcd_model)
    banned = sorted(_expected_banned(model.tokenizer, model.vocab_size))
    head = model.backbone.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[banned] = 50.0
    model.backbone.lm_head = biased
    rows = pq.read_table(shards / "shards", columns=["dicom", "split"]).to_pylist()
    images = np.stack([decode_dicom(r["dicom"], size=IMAGE_SIZE).pixels
                       for r in rows if r["split"] == "test"][:2])
    pixel_values = model.preprocess_images(images)
    for mode, steps, fused in (("ar", 1, False), ("diffusion", BLOCK_LENGTH, False),
                               ("diffusion", 1, False), ("diffusion", 1, True)):
        with torch.no_grad():
            out = generate(model, pixel_values, mode=mode, steps=steps, fused=fused)
        # the report: every token up to and including the first <eos> (after it, filler)
        written = {t for row, n in zip(out.tokens.tolist(), out.lengths.tolist(), strict=True)
                   for t in row[:n + 1]}
        assert written and not set(banned) & written, (mode, steps, fused, written)


def test_evaluate_scores_the_student_and_the_base_folder_zero_shot(evaluated):
    out, evaluation = evaluated
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == ["base", "student"]
    reports = pq.read_table(out / "reports.parquet").to_pylist()
    assert {r["system"] for r in reports} == {"base", "student"}
    for r in reports:
        if r.get("error"):
            continue
        assert 0 <= r["num_tokens"] <= MAX_RESPONSE_LEN
        assert "<|" not in r["report"] and "<think>" not in r["report"]
    assert any(not r.get("error") for r in reports)
    for name in ("base", "student"):
        assert math.isfinite(results[name]["tokens_per_forward"]), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_serve_endpoint_reports_with_the_student(ray_cluster, dcd_model):
    import requests
    from ray import serve

    from echo_ray.serving.app import build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        app = build_app({"checkpoint": str(dcd_model), "insecure": True, "num_cpus": 0.25,
                         "max_replicas": 1, "batch_wait_timeout_s": 0.1})
        serve.run(app, name="echo-ray-qwen", route_prefix="/")
        pixels = np.random.default_rng(0).integers(0, 4096, (96, 80), dtype=np.uint16)
        dicom = write_dicom(pixels, attrs={"Modality": "DX", "ViewPosition": "PA",
                                           "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.18"})
        r = requests.post(f"http://127.0.0.1:{port}/v1/reports", data=dicom,
                          headers={"Content-Type": "application/dicom"}, timeout=120)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["decoding"] == "one-step-fused"
        assert 0 <= body["num_tokens"] <= MAX_RESPONSE_LEN
        assert "<|" not in body["report"]
    finally:
        serve.shutdown()


def test_the_bulk_job_reports_an_archive_with_the_student(ray_cluster, dcd_model,
                                                           tmp_path_factory):
    archive = tmp_path_factory.mktemp("pacs")
    synthesize_archive(archive, num_studies=3, seed=4, image_size=64, lateral_fraction=0.0)
    out = tmp_path_factory.mktemp("night")
    options = apply_overrides(EchoConfig(), ["report.batch_size=2", "report.unit_size=3",
                                             *POOL])
    summary = report_archive(str(dcd_model), str(archive), str(out), options)
    reports = pq.read_table(out / "reports.parquet").to_pylist()
    assert (summary["studies"], summary["reports"], summary["errors"]) == (3, 3, 0)
    assert len(reports) == 3
    for r in reports:
        assert 0 <= r["num_tokens"] <= MAX_RESPONSE_LEN
        assert "<|" not in r["report"]
