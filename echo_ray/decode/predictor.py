"""ReportGenerator: images (or DICOM bytes) in, report dicts out.

One class serves the batch jobs and the Ray Serve deployment (they are thin adapters over
it). Plain torch: no Ray here. A report dict (docs/ARCHITECTURE.md section 3.7):

    study_instance_uid, series_instance_uid, sop_instance_uid   (None for raw images)
    report, findings, impression                                  the generated text
    labels                 the 14 CheXpert-style labels extracted from the text
    sentences              [{section, text, confidence, low_confidence}], report order
    model_id, model_version, decoding
    num_tokens, num_forwards, tokens_per_forward, latency_ms      (per batch call)

A sentence's confidence is the model's own: the geometric mean of the probabilities the
decoder gave its tokens when it committed them (`sampler.generate(record_confidence=True)`).

Patient identifiers are never included unless `include_phi=True`. A DICOM that cannot be
decoded gives `{"error": reason, "message": ...}` in its slot instead of failing the batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echo_ray import __version__
from echo_ray.config.schema import RADIOGRAPH_MODALITIES, DecodingConfig, ModelConfig
from echo_ray.data.dicom import DicomError, decode_dicom
from echo_ray.data.storage import model_name
from echo_ray.decode.modes import decoding_kwargs, trained_modes
from echo_ray.decode.sampler import generate
from echo_ray.diffusion.losses import ar_report_nll
from echo_ray.diffusion.noise import pad_responses
from echo_ray.model.checkpoint import load_checkpoint
from echo_ray.model.dvlm import EchoDVLM
from echo_ray.text.labeler import label_report
from echo_ray.text.sections import parse_sections, sentence_spans

_UID_KEYS = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "accession_number",
             "study_date")
_PHI_KEYS = ("patient_name", "patient_id", "patient_birth_date")


def place_model(model: EchoDVLM, device: torch.device | str) -> EchoDVLM:
    """Move a model for inference: bf16 on CUDA; on CPU its own dtype, with prepacked
    decoder weights (`EchoDVLM.pack_linears`); returns it."""
    device = torch.device(device)
    if device.type == "cuda":
        return model.to(device, torch.bfloat16)
    model.to(device)
    if device.type == "cpu":
        model.pack_linears()
    return model


class ReportGenerator:
    """Writes draft reports with a dVLM.

    Args:
        model: the model (put in eval mode here).
        decoding: one of `decoding.DECODING_MODES`.
        steps, threshold: of the "multi-step" mode.
        max_new_tokens: default: the model's `max_response_len`.
        model_id, model_version: written into every report.
        include_phi: copy patient name / ID / birth date from DICOM headers into reports.
        modalities: accepted DICOM Modality values (None accepts any).
        low_confidence: sentences below this confidence are flagged `low_confidence`.
        trained_modes: the modes the model was trained for, preferred first (default: every
            mode; `from_checkpoint` reads them from the checkpoint's training stage).
    """

    def __init__(
        self,
        model: EchoDVLM,
        *,
        decoding: str = DecodingConfig.mode,
        steps: int | None = None,
        threshold: float = DecodingConfig.threshold,
        max_new_tokens: int | None = None,
        model_id: str = "echo-ray",
        model_version: str = __version__,
        include_phi: bool = False,
        modalities: Collection[str] | None = RADIOGRAPH_MODALITIES,
        low_confidence: float = DecodingConfig.low_confidence,
        trained_modes: Sequence[str] = trained_modes(None),
    ) -> None:
        self.model = model.eval()
        self.decoding = decoding
        self.steps, self.threshold = steps, threshold
        self.generate_kwargs = self._decoding_kwargs(decoding)
        self.max_new_tokens = max_new_tokens
        self.model_id = model_id
        self.model_version = model_version
        self.include_phi = include_phi
        self.modalities = modalities
        self.low_confidence = low_confidence
        self.trained_modes = tuple(trained_modes)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, overrides: Sequence[str] = (), *,
        plain_model: ModelConfig | None = None, **kwargs: Any
    ) -> ReportGenerator:
        """Load a run directory (see `checkpoint.save_checkpoint`); its training stage
        (`train.stage`) gives `trained_modes`, and the default `decoding` when the global
        default is not one of them (an AR checkpoint decodes "ar", a RAD teacher
        "multi-step"). A plain Hugging Face folder loads zero-shot with `plain_model`
        (`checkpoint.load_checkpoint`)."""
        model, config = load_checkpoint(path, overrides, plain_model=plain_model)
        kwargs.setdefault("model_id", model_name(str(path)))
        modes = kwargs.setdefault("trained_modes", trained_modes(config.train.stage))
        kwargs.setdefault("decoding", DecodingConfig.mode if DecodingConfig.mode in modes
                          else modes[0])
        return cls(model, **kwargs)

    def to(self, device: torch.device | str) -> ReportGenerator:
        """Move the model to `device` (see `place_model`); returns self."""
        place_model(self.model, device)
        return self

    def warm_up(self, batch_size: int = 1) -> None:
        """Decode blank images once: the first forwards pay one-off costs (allocations,
        kernel selection) that would otherwise land on the first real batch."""
        size = self.model.config.image_size
        self.generate(np.zeros((batch_size, size, size), np.float32))

    def _decoding_kwargs(self, decoding: str) -> dict:
        return decoding_kwargs(
            decoding,
            block_length=self.model.block_length,
            steps=self.steps,
            threshold=self.threshold,
        )

    def generate(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        metas: Sequence[dict] | None = None,
        *,
        decoding: str | None = None,
        on_text: Callable[[list[str]], None] | None = None,
    ) -> list[dict]:
        """Reports for images in [0, 1] (`(N, H, W)` or a list of 2D arrays of any size).

        Args:
            metas: per image, DICOM metadata (UIDs, and PHI when `include_phi`).
            decoding: this call's decoding mode (default: the generator's).
            on_text: streaming: called with each image's report text so far every time a
                block is final (every `block_length` tokens for AR).
        """
        if len(images) == 0:
            return []
        if decoding is None or decoding == self.decoding:
            decoding, kwargs = self.decoding, self.generate_kwargs
        else:
            kwargs = self._decoding_kwargs(decoding)
        pixel_values = torch.cat([self.model.preprocess_images(img[None]) for img in images])
        on_block = None
        if on_text is not None:
            def on_block(tokens: torch.Tensor) -> None:
                on_text([self._text(row) for row in tokens.tolist()])

        start = time.perf_counter()
        out = generate(
            self.model, pixel_values, max_new_tokens=self.max_new_tokens, on_block=on_block,
            record_confidence=True, **kwargs,
        )
        latency_ms = 1000 * (time.perf_counter() - start)
        reports = []
        for i in range(len(images)):
            ids = out.tokens[i, : int(out.lengths[i])].tolist()  # up to the first <eos>
            decoded = self.model.tokenizer.decode(ids, skip_special_tokens=True)
            text = decoded.strip()
            confidence = out.confidence[i, : len(ids)].tolist()
            sections = parse_sections(text)
            meta = metas[i] if metas is not None else {}
            report = {key: meta.get(key) for key in _UID_KEYS}
            if self.include_phi:
                report.update({key: meta.get(key) for key in _PHI_KEYS})
            report.update(
                report=text,
                findings=sections.get("findings", sections.get("full_report", "")),
                impression=sections.get("impression", ""),
                labels=label_report(text),
                sentences=self._sentences(ids, confidence, decoded),
                model_id=self.model_id,
                model_version=self.model_version,
                decoding=decoding,
                num_tokens=len(ids),
                num_forwards=out.num_forwards,
                tokens_per_forward=out.tokens_per_forward,
                latency_ms=latency_ms,
            )
            reports.append(report)
        return reports

    def _sentences(self, ids: list[int], confidence: list[float], decoded: str) -> list[dict]:
        """Each sentence of `decoded` (the text of `ids`, not stripped) with the geometric
        mean of its tokens' commit probabilities. A token belongs to every sentence its
        characters overlap (`_prefix_lengths`)."""
        spans = sentence_spans(decoded)
        if not spans:
            return []
        ends = np.asarray(self._prefix_lengths(ids, decoded))
        starts = np.concatenate([[0], ends[:-1]])
        logs = np.log(np.clip(np.asarray(confidence, dtype=np.float64), 1e-12, 1.0))
        sentences = []
        for section, sentence, lo, hi in spans:
            inside = (starts < hi) & (ends > lo)
            conf = float(np.exp(logs[inside].mean())) if inside.any() else 0.0
            sentences.append({
                "section": section,
                "text": sentence,
                "confidence": round(conf, 3),
                "low_confidence": conf < self.low_confidence,
            })
        return sentences

    def _prefix_lengths(self, ids: list[int], whole: str) -> list[int]:
        """The length of the text of `ids[:1]`, `ids[:2]`, ... (`whole`: of `ids`)

        Tokens decoded one by one give it when their texts join into the whole's (every
        token whole characters: English reports, nearly always); else every prefix is
        decoded (a byte-level token can be part of a character)."""
        tokenizer = self.model.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)  # skips transformers' glue
        decode = (
            (lambda seqs: backend.decode_batch(seqs, skip_special_tokens=True))
            if backend is not None
            else (lambda seqs: tokenizer.batch_decode(seqs, skip_special_tokens=True))
        )
        pieces = decode([[i] for i in ids])
        if "".join(pieces) == whole:
            return np.cumsum([len(p) for p in pieces]).tolist()
        return [len(p) for p in decode([ids[: i + 1] for i in range(len(ids))])]

    def _text(self, ids: list[int]) -> str:
        """The report text of generated ids, up to the first `<eos>`."""
        eos = self.model.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return self.model.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def decode_dicoms(
        self, blobs: Sequence[bytes]
    ) -> tuple[list[dict | None], list[int], list[np.ndarray], list[dict]]:
        """Decode DICOM files at this model's image size.

        Returns:
            (slots: an error dict for each file that failed, None for the others; the
            indices that decoded; their images; their metadata).
        """
        slots: list[dict | None] = [None] * len(blobs)
        good, images, metas = [], [], []
        for i, data in enumerate(blobs):
            try:
                image = decode_dicom(
                    data,
                    size=self.model.config.image_size,
                    modalities=self.modalities,
                    include_phi=self.include_phi,
                )
            except DicomError as err:
                slots[i] = {"error": err.reason, "message": str(err)}
                continue
            good.append(i)
            images.append(image.pixels)
            metas.append(image.meta)
        return slots, good, images, metas

    def generate_dicom(self, blobs: Sequence[bytes]) -> list[dict]:
        """Reports for DICOM files, in order; undecodable files give an error dict."""
        results, good, images, metas = self.decode_dicoms(blobs)
        for i, report in zip(good, self.generate(images, metas), strict=True):
            results[i] = report
        return results


class ReportScorer:
    """Scores report texts under an AR model: the fluency (perplexity) metric.

    The likelihood is the model's, p(report | image): the same image the report was
    written for conditions it, so a report that reads well but contradicts the image also
    costs likelihood.
    """

    def __init__(self, model: EchoDVLM, *, max_len: int | None = None) -> None:
        self.model = model.eval()
        self.max_len = max_len or model.config.max_response_len

    def to(self, device: torch.device | str) -> ReportScorer:
        """Move the model to `device` (see `place_model`); returns self."""
        place_model(self.model, device)
        return self

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, plain_model: ModelConfig | None = None, **kwargs: Any
    ) -> ReportScorer:
        model, _ = load_checkpoint(path, plain_model=plain_model)
        return cls(model, **kwargs)

    @torch.no_grad()
    def nll(
        self, images: Sequence[np.ndarray] | np.ndarray, texts: Sequence[str]
    ) -> tuple[list[float], list[int]]:
        """Per report: summed NLL (nats) of its tokens and `<eos>`, and that token count.

        Reports longer than the model's `max_response_len` are cut there (the count says
        how many tokens were scored).
        """
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if len(texts) == 0:
            return [], []
        tokenizer = self.model.tokenizer
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        response, valid = pad_responses(
            ids,
            block_length=1,
            max_len=self.max_len,
            eos_token_id=self.model.eos_token_id,
            pad_token_id=self.model.pad_token_id,
        )
        pixel_values = torch.cat([self.model.preprocess_images(img[None]) for img in images])
        nll, count = ar_report_nll(self.model, pixel_values, response, valid)
        return nll.tolist(), [int(c) for c in count]
