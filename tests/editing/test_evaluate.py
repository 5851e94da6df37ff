"""Evaluation metrics, benchmark data loading, and the edit-quality benchmark CLI."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from bench import compare, fluency_flips
from bench import editing as bench_editing
from bench import paired as bench_paired
from workers.editing import arch
from workers.editing.datasets import load_records
from workers.editing.delta import MatrixDelta
from workers.editing.editor import Editor
from workers.editing.evaluate import (
    edit_metrics,
    edit_scores,
    fixed_text,
    fluency,
    fluency_prompts,
    greedy_generations,
    heldout_text,
    ngram_entropy,
    perplexity,
    shared_prefix_logprobs,
    words,
)
from workers.editing.factory import build_editor, with_overrides
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.editing.scoring import greedy_continuation, target_logprobs

_REPO = Path(__file__).resolve().parents[2]
SHARED = next(
    (p for p in (_REPO.parent / "shared" / "data", _REPO / "shared" / "data") if p.is_dir()),
    _REPO.parent / "shared" / "data",
)
COUNTERFACT = SHARED / "counterfact" / "train.json"
ZSRE = SHARED / "zsre" / "train-1k.json"


# ---------------------------------------------------------------- n-gram entropy


def _entropy(probs: Sequence[float]) -> float:
    return -sum(p * math.log2(p) for p in probs)


def test_ngram_entropy_exact_value() -> None:
    # bigrams (a,b) (b,a) (a,b): H2 = H(2/3, 1/3); trigrams (a,b,a) (b,a,b): H3 = 1 bit.
    # ROME averages the weighted terms: (2/3*H2 + 4/3*H3) / 2
    expected = (2 / 3 * _entropy([2 / 3, 1 / 3]) + 4 / 3 * 1.0) / 2
    assert ngram_entropy("a b a b") == pytest.approx(expected, abs=1e-12)
    assert ngram_entropy("a b a b") == pytest.approx(0.97276, abs=1e-5)


def test_ngram_entropy_all_distinct() -> None:
    # 5 tokens: 4 distinct bigrams (2 bits), 3 distinct trigrams (log2 3 bits)
    assert ngram_entropy("one two three four five") == pytest.approx(
        (2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2
    )


def test_ngram_entropy_repetition_is_lower() -> None:
    repeated = "the cat sat on the mat . " * 12
    varied = fixed_text().split("\n")[0]
    assert len(words(varied)) >= len(words(repeated)) * 0.8
    assert ngram_entropy(repeated) < ngram_entropy(varied) - 1.0
    assert ngram_entropy("same " * 40) == 0.0


def test_ngram_entropy_short_text_is_zero() -> None:
    assert ngram_entropy("") == 0.0
    assert ngram_entropy("word") == 0.0


def test_words_split_punctuation() -> None:
    assert words("Rome, Italy; it's big.") == ["Rome", ",", "Italy", ";", "it's", "big", "."]


# ---------------------------------------------------------------- data loading


def test_load_counterfact_fields_offset_and_n() -> None:
    raw = json.loads(COUNTERFACT.read_text())
    recs = load_records(COUNTERFACT, "counterfact", offset=5, n=3)
    assert len(recs) == 3
    assert not recs.skipped
    for rec, src in zip(recs, raw[5:8], strict=True):
        assert rec.case_id == str(src["case_id"])
        assert rec.request.prompt == src["prompt"]
        assert rec.request.subject == src["subject"]
        assert rec.request.target_new == src["target_new"]
        assert rec.request.ground_truth == rec.ground_truth == src["ground_truth"]
        assert rec.rephrase_prompt == src["rephrase_prompt"]
        assert rec.locality_prompt == src["locality_prompt"]
        assert rec.locality_ground_truth == src["locality_ground_truth"]
        # held-out probes must not reach the editor as training observations
        assert rec.request.rephrase_prompts == ()
        assert rec.request.locality_prompts == ()


def test_load_counterfact_window_past_end() -> None:
    assert len(load_records(COUNTERFACT, "counterfact", offset=9_998, n=10)) == 2


def test_load_zsre_field_mapping() -> None:
    raw = json.loads(ZSRE.read_text())
    recs = load_records(ZSRE, "zsre", n=3)
    for rec, src in zip(recs, raw[:3], strict=True):
        assert rec.request.prompt == src["src"]
        assert rec.request.subject in rec.request.prompt
        assert rec.request.target_new == src["alt"]
        assert rec.ground_truth == src["answers"][0]
        assert rec.rephrase_prompt == src["rephrase"]
        assert rec.locality_prompt == src["loc"]
        assert rec.locality_ground_truth == src["loc_ans"]
    everything = load_records(ZSRE, "zsre")
    assert len(everything) + sum(everything.skipped.values()) == len(raw)
    assert len(everything) > 950


def test_load_skips_and_counts(tmp_path: Path) -> None:
    rows = [
        {"subject": "Paris", "src": "Where is Paris?", "alt": "Spain", "answers": ["France"],
         "rephrase": "Paris is in which country?", "loc": "nq question: x", "loc_ans": "y"},
        {"subject": "Berlin", "src": "Where is the capital?", "alt": "Spain", "answers": ["DE"],
         "rephrase": "r", "loc": "l", "loc_ans": "a"},
        {"subject": "Rome", "src": "Where is Rome?", "alt": "Italy", "answers": ["Italy"],
         "rephrase": "r", "loc": "l", "loc_ans": "a"},
        {"subject": "Oslo", "src": "Where is Oslo?", "alt": "", "answers": ["Norway"],
         "rephrase": "r", "loc": "l", "loc_ans": "a"},
    ]  # fmt: skip
    path = tmp_path / "z.json"
    path.write_text(json.dumps(rows))
    recs = load_records(path, "zsre")
    assert [r.request.subject for r in recs] == ["Paris"]
    assert recs[0].case_id == "0"
    assert recs.skipped == {
        "subject_not_in_prompt": 1,
        "target_equals_truth": 1,
        "missing_or_empty_field": 1,
    }
    assert [r.request.subject for r in load_records(path, "zsre", offset=1)] == []


def test_load_rejects_unknown_dataset(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text("[]")
    with pytest.raises(ValueError, match="dataset"):
        load_records(path, "wikidata")


def test_factory_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="method"):
        build_editor("rome", None, None)  # type: ignore[arg-type]


def test_config_overrides_reach_nested_fields_and_refuse_bad_ones() -> None:
    from workers.editing.loki import LokiConfig

    config = with_overrides(
        LokiConfig(), {"top_k": "4", "target.lr": "1.5", "candidate_layers": "(3, 4, 5, 6)"}
    )
    assert (config.top_k, config.target.lr, config.candidate_layers) == (4, 1.5, (3, 4, 5, 6))
    assert config.target.steps == LokiConfig().target.steps  # the rest kept
    with pytest.raises(ValueError, match=r"^topk: no such setting"):
        with_overrides(LokiConfig(), {"topk": "4"})
    with pytest.raises(ValueError, match=r"^target\.lrate: no such setting"):
        with_overrides(LokiConfig(), {"target.lrate": "1"})
    with pytest.raises(ValueError, match=r"^top_k: 'four' is not a Python literal"):
        with_overrides(LokiConfig(), {"top_k": "four"})
    with pytest.raises(ValueError, match=r"^lr:"):  # the config's own check
        with_overrides(LokiConfig(), {"target.lr": "0"})
    with pytest.raises(ValueError, match=r"^top_k: expected a int"):
        with_overrides(LokiConfig(), {"top_k": "2.0"})
    with pytest.raises(ValueError, match=r"^top_k: '\{\[1\]: 2\}' is not a Python literal"):
        with_overrides(LokiConfig(), {"top_k": "{[1]: 2}"})
    with pytest.raises(ValueError, match=r"^target: expected a TargetValueConfig"):
        with_overrides(LokiConfig(), {"target.lr": "2", "target": "3"})
    with pytest.raises(ValueError, match=r"^target\.: missing the setting"):
        with_overrides(LokiConfig(), {"target.": "3"})
    assert with_overrides(LokiConfig(), {"l2": "20"}).l2 == 20.0  # an int where a float is
    # a text setting takes its value bare or quoted; the config still checks it
    for raw in ("articles", "'articles'"):
        assert with_overrides(LokiConfig(), {"self_text_style": raw}).self_text_style == "articles"
    with pytest.raises(ValueError, match=r"^self_text_style: must be one of"):
        with_overrides(LokiConfig(), {"self_text_style": "wiki"}).resolve_layers(30)
    with pytest.raises(ValueError, match=r"^self_text_style: expected a str"):
        with_overrides(LokiConfig(), {"self_text_style": "3"})


# ---------------------------------------------------------------- metrics on the real model


@pytest.mark.slow
def test_shared_prefix_logprobs_equal_target_logprobs(loaded_model) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    prompts = ["The Eiffel Tower is located in"] * 4 + ["Toko Yasuda plays the", "The capital of"]
    targets = [" Paris", " Rome", " the city of Paris", " the city of Rome", " piano", ""]
    fast = shared_prefix_logprobs(model, tok, prompts, targets, batch_size=2)
    ref = target_logprobs(model, tok, prompts, targets)
    assert fast == pytest.approx(ref, abs=1e-4)
    assert fast[-1] == 0.0


@pytest.mark.slow
def test_edit_metrics_unedited_model(loaded_model) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    recs = load_records(COUNTERFACT, "counterfact", n=10)
    metrics = edit_metrics(model, tok, recs)
    assert metrics["n"] == 10
    for name in ("efficacy", "generalization", "specificity"):
        assert 0.0 <= metrics[name] <= 1.0
        assert (metrics[name] * 10) == pytest.approx(round(metrics[name] * 10))

    # the same comparisons from the reference scorer, in one call
    prompts: list[str] = []
    targets: list[str] = []
    for r in recs:
        for prompt, target in [
            (r.prompt, r.target_new),
            (r.prompt, r.ground_truth),
            (r.rephrase_prompt, r.target_new),
            (r.rephrase_prompt, r.ground_truth),
            (r.locality_prompt, r.locality_ground_truth),
            (r.locality_prompt, r.target_new),
        ]:
            prompts.append(prompt)
            targets.append(" " + target)
    lp = target_logprobs(model, tok, prompts, targets)
    eff = [lp[6 * k] > lp[6 * k + 1] for k in range(10)]
    gen = [lp[6 * k + 2] > lp[6 * k + 3] for k in range(10)]
    spec = [lp[6 * k + 4] > lp[6 * k + 5] for k in range(10)]
    assert metrics["efficacy"] == pytest.approx(sum(eff) / 10)
    assert metrics["generalization"] == pytest.approx(sum(gen) / 10)
    assert metrics["specificity"] == pytest.approx(sum(spec) / 10)
    scores = edit_scores(model, tok, recs)
    assert [s.efficacy for s in scores] == eff
    # an unedited model prefers the true locality answer most of the time
    assert metrics["specificity"] >= 0.5


@pytest.mark.slow
def test_perplexity_fixed_text_beats_shuffled(loaded_model) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    assert 1_500 <= len(fixed_text().split()) <= 3_000
    held = heldout_text()
    assert 1_200 <= len(held.split()) <= 3_000 and held[:200] not in fixed_text()
    held_ppl = perplexity(model, tok, held)
    assert math.isfinite(held_ppl) and held_ppl < 100.0
    text = " ".join(fixed_text().split()[:150])
    shuffled = text.split()
    random.Random(0).shuffle(shuffled)
    ppl = perplexity(model, tok, text, window=128)
    assert math.isfinite(ppl) and 1.0 < ppl < 100.0
    assert perplexity(model, tok, " ".join(shuffled), window=128) > 3 * ppl
    # max_tokens cuts the text: the same prefix gives the same figure
    prefix = perplexity(model, tok, text, window=128, max_tokens=60)
    assert prefix == pytest.approx(perplexity(model, tok, tok.decode(tok(text)["input_ids"][:60])))


@pytest.mark.slow
def test_batched_greedy_generation_matches_unbatched(loaded_model) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    prompts = ["The capital of France is", "In the morning, the old market square was"]
    texts = greedy_generations(model, tok, prompts, max_new_tokens=6, batch_size=2)
    for prompt, text in zip(prompts, texts, strict=True):
        assert text == prompt + greedy_continuation(model, tok, prompt, max_new_tokens=6)
    value = fluency(model, tok, prompts[:1], max_new_tokens=6)
    assert 0.0 < value < 10.0
    prompts = fluency_prompts()
    assert len(prompts) == 100 and len(set(prompts)) == 100
    # the first 25 are the set earlier figures were read on (bench.editing reports them apart)
    assert prompts[0] == "The history of the city begins"
    assert prompts[24] == "The weather forecast for tomorrow says"


# ---------------------------------------------------------------- the benchmark CLI


class RankOneEditor(Editor):
    """A real rank-1 edit of one late down_proj: maps the prompt's MLP key onto the direction
    that raises the new target's first token over the old one's."""

    method = "rank1-test"

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        req = requests[0]
        layer = arch.num_layers(self.model) - 2
        module = arch.down_proj(self.model, layer)
        keys: list[torch.Tensor] = []
        hook = module.register_forward_hook(lambda m, i, o: keys.append(i[0][0, -1].detach()))
        try:
            ids = self.tokenizer(req.text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                self.model(**ids.to(self.device))
        finally:
            hook.remove()
        key = keys[0].float()

        def first(text: str) -> int:
            return self.tokenizer(" " + text.strip(), add_special_tokens=False)["input_ids"][0]

        unembed = self.model.get_output_embeddings().weight.float()
        direction = unembed[first(req.target_new)] - unembed[first(req.ground_truth or "the")]
        a = (direction / direction.norm() * 40.0)[:, None]
        b = (key / key.dot(key))[None, :]
        delta = MatrixDelta(name=arch.down_proj_name(self.model, layer), a=a.cpu(), b=b.cpu())
        return EditResult(method=self.method, deltas=[delta], success=True, steps=1)


@pytest.mark.slow
def test_bench_cli_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        bench_editing, "build_editor", lambda m, model, tok, overrides: RankOneEditor(model, tok)
    )
    out = tmp_path / "run"
    argv = ["--method", "ft", "--data", str(COUNTERFACT), "--n", "4", "--offset", "10",
            "--checkpoint-every", "2", "--out", str(out), "--fluency-tokens", "8",
            "--checkpoint-prompts", "2", "--fluency-prompts", "3",
            "--ppl-tokens", "200"]  # fmt: skip
    assert bench_editing.main(argv) == 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True
    assert (
        summary["n_edits"] == 4 and summary["offset"] == 10 and summary["dataset"] == "counterfact"
    )
    for key in bench_editing.METRICS:
        assert key in summary["metrics"] and key in summary["unedited"]
        assert summary["ratios"][key] == pytest.approx(
            summary["metrics"][key] / summary["unedited"][key]
        )
    assert [c["n_edits"] for c in summary["checkpoints"]] == [2, 4]
    final, before = summary["checkpoints"][-1], summary["unedited"]
    assert len(final["fluency_entropies"]) == len(before["fluency_entropies"]) == 3
    assert final["fluency"] == pytest.approx(sum(final["fluency_entropies"]) / 3, abs=1e-4)
    lo, hi = summary["fluency_ratio_interval"]
    assert lo <= hi
    assert summary["edit_success_rate"] == 1.0
    assert set(summary["seconds_per_edit"]) == {"median", "p90", "mean"}
    # the edits are real: the new targets now win where the unedited model preferred the truth
    assert summary["metrics"]["efficacy"] > summary["unedited"]["efficacy"]
    assert summary["metrics"]["perplexity"] != summary["unedited"]["perplexity"]
    # the second text is scored on its own: a different text, a different figure
    held = summary["unedited"]["perplexity_heldout"]
    assert held != summary["unedited"]["perplexity"]
    assert summary["metrics"]["perplexity_heldout"] != held

    lines = [json.loads(x) for x in (out / "per_edit.jsonl").read_text().splitlines()]
    raw = json.loads(COUNTERFACT.read_text())[10:14]
    assert [r["case_id"] for r in lines] == [str(r["case_id"]) for r in raw]
    assert all(r["method"] == "rank1-test" and r["ranks"] for r in lines)
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    # each record's final outcome is kept, and agrees with the fractions
    got = final["outcomes"]
    assert got["case_id"] == [str(r["case_id"]) for r in raw]
    for key in ("efficacy", "generalization", "specificity"):
        assert sum(got[key]) / 4 == pytest.approx(final[key])
        assert len(before["outcomes"][key]) == 4
    # a run compared with itself differs by nothing
    paired = bench_paired.compare([out / "summary.json"], [out / "summary.json"])
    assert paired["records"] == 4
    assert paired["metrics"]["mean of the three"]["interval"] == [0.0, 0.0]

    # the comparison table reads the run back
    table_path = tmp_path / "cmp.md"
    assert compare.main([str(out / "summary.json"), "--out", str(table_path)]) == 0
    table = table_path.read_text()
    assert "| unedited |" in table and "| ft |" in table
    assert (tmp_path / "cmp.png").is_file()


def test_fluency_ratio_interval() -> None:
    base = [5.0, 6.0, 4.0, 5.5, 5.2]
    assert bench_editing.ratio_interval(base, base) == pytest.approx((1.0, 1.0))
    assert bench_editing.ratio_interval([0.9 * b for b in base], base) == pytest.approx((0.9, 0.9))
    # one prompt falling into a repetition loop: the ratio drops and the interval widens
    lo, hi = bench_editing.ratio_interval([2.0, *base[1:]], base)
    assert lo < 0.9 < hi <= 1.0
    with pytest.raises(ValueError, match="same"):
        bench_editing.ratio_interval(base[:3], base)


def _fake_summary(method: str, eff: float) -> dict:
    metrics = {"efficacy": eff, "generalization": 0.5, "specificity": 0.8, "fluency": 5.0,
               "perplexity": 20.0}  # fmt: skip
    return {"method": method, "model": "m", "dataset": "counterfact", "offset": 0, "n_edits": 10,
            "metrics": metrics, "unedited": {**metrics, "efficacy": 0.3},
            "seconds_per_edit": {"median": 1.5, "p90": 2.0, "mean": 1.6}}  # fmt: skip


def test_compare_table(tmp_path: Path) -> None:
    paths = []
    for method, eff in (("loki", 1.0), ("memit", 0.7)):
        (tmp_path / method).mkdir()
        paths.append(tmp_path / method / "summary.json")
        paths[-1].write_text(json.dumps(_fake_summary(method, eff)))
    table = compare.markdown(compare.load_summaries(paths))
    lines = table.splitlines()
    assert lines[0].startswith("| method | efficacy | generalization | specificity | mean")
    # a summary from before the held-out text was scored shows "-" there
    assert "| unedited | 0.300 | 0.500 | 0.800 | 0.533 | 5.000 | 20.00 | - | - |" in lines
    assert "| loki | 1.000 | 0.500 | 0.800 | 0.767 | 5.000 | 20.00 | - | 1.50 |" in lines
    frontier = tmp_path / "frontier.png"
    args = [*map(str, paths), "--out", str(tmp_path / "cmp.md"), "--frontier", str(frontier)]
    assert compare.main(args) == 0
    assert frontier.stat().st_size > 0


def _outcome_summary(path: Path, method: str, cases: list[str], eff: list[int]) -> Path:
    n = len(cases)
    final = {"outcomes": {"case_id": cases, "efficacy": eff, "generalization": [1] * n,
                          "specificity": [0] * n}}  # fmt: skip
    path.mkdir()
    data = {"method": method, "dataset": "counterfact", "complete": True, "checkpoints": [final]}
    (path / "summary.json").write_text(json.dumps(data))
    return path / "summary.json"


def test_paired_comparison(tmp_path: Path) -> None:
    cases = [str(i) for i in range(40)]
    a = _outcome_summary(tmp_path / "a", "loki", cases, [1] * 40)
    b = _outcome_summary(tmp_path / "b", "alphaedit", cases[::-1], [1] * 30 + [0] * 10)
    result = bench_paired.compare([a], [b])
    eff = result["metrics"]["efficacy"]
    assert (eff["a"], eff["b"], eff["only_a"], eff["only_b"]) == (1.0, 0.75, 10, 0)
    lo, hi = eff["interval"]
    assert 0.0 < lo < 0.25 < hi <= 0.5  # ten wins in forty: clearly above zero, not exact
    mean = result["metrics"]["mean of the three"]
    assert mean["difference"] == pytest.approx(0.25 / 3)
    assert result["metrics"]["generalization"]["interval"] == [0.0, 0.0]
    # records are matched by case id, not position: half of B's records are not in A
    c = _outcome_summary(tmp_path / "c", "ft", [str(i) for i in range(20, 60)], [0] * 40)
    assert bench_paired.compare([a], [c])["records"] == 20
    assert "| efficacy | 1.000 | 0.750 | +0.250 |" in bench_paired.markdown(result)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"method": "loki", "complete": True, "checkpoints": [{}]}))
    with pytest.raises(SystemExit, match="no per-record outcomes"):
        bench_paired.compare([old], [b])
    assert bench_paired.main(["--a", str(a), "--b", str(b), "--out", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "paired.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "p" / "paired.json").read_text())["records"] == 40


def _entropy_summary(path: Path, unedited: list[float], edited: list[float]) -> Path:
    path.mkdir()
    data = {"unedited": {"fluency_entropies": unedited},
            "checkpoints": [{"fluency_entropies": edited}]}  # fmt: skip
    (path / "summary.json").write_text(json.dumps(data))
    return path / "summary.json"


def test_fluency_flips_count_falls_and_rises_per_prompt(tmp_path: Path) -> None:
    base = [6.4, 6.3, 4.0, 3.5, 5.5]
    # both runs: the two diverse texts fall into loops, the two looping ones climb out
    a1 = _entropy_summary(tmp_path / "a1", base, [4.0, 5.0, 5.5, 3.6, 5.5])
    a2 = _entropy_summary(tmp_path / "a2", base, [6.4, 4.5, 5.0, 5.0, 5.4])
    g = fluency_flips.group_flips([a1, a2], flip=0.7)
    assert g["drops"] == [1, 2, 0, 0, 0] and g["rises"] == [0, 0, 2, 1, 0]
    assert g["fallers"] == [0, 1] and g["risers"] == [2, 3]
    assert g["unedited_median_fallers"] == pytest.approx(6.35)
    assert g["runs"][0]["n_dropped"] == 2 and g["runs"][0]["dropped"] == pytest.approx(-3.7)
    assert g["runs"][0]["net"] == pytest.approx((-2.4 - 1.3 + 1.5 + 0.1) / 5)
    # random noise results count one run per seed
    noise = tmp_path / "noise.json"
    noise.write_text(json.dumps({"unedited": {"fluency_entropies": base}, "runs": [
        {"seed": 0, "entropies": [4.0, 6.3, 4.0, 3.5, 5.5]},
        {"seed": 1, "entropies": [6.4, 6.3, 4.0, 3.5, 5.5]}]}))  # fmt: skip
    assert fluency_flips.group_flips([noise], flip=0.7)["drops"] == [1, 0, 0, 0, 0]
    assert fluency_flips.overlap([0, 1], [1, 3], 5) == {"shared": 1, "expected_by_chance": 0.8}
    out = tmp_path / "out"
    argv = ["--a", str(a1), str(a2), "--b", str(a1), "--noise", str(noise), "--out", str(out)]
    assert fluency_flips.main(argv) == 0
    written = json.loads((out / "fluency-flips.json").read_text())
    assert written["shared_fallers_A_B"]["shared"] == 2  # A and B (a1 alone): prompts 0 and 1
    assert (out / "fluency-flips.png").read_bytes()[:4] == b"\x89PNG"
    short = _entropy_summary(tmp_path / "short", base[:3], base[:3])
    with pytest.raises(SystemExit, match="prompts"):
        fluency_flips.group_flips([a1, short], flip=0.7)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"unedited": {}, "checkpoints": [{}]}))
    with pytest.raises(SystemExit, match="no per-prompt"):
        fluency_flips.group_flips([old], flip=0.7)


class FailingEditor(RankOneEditor):
    """Computes a real change, then fails while applying it: Editor.apply must roll it back."""

    method = "failing-test"

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        raise RuntimeError("bookkeeping failed")


@pytest.mark.slow
def test_bench_cli_counts_failed_edits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        bench_editing, "build_editor", lambda m, model, tok, overrides: FailingEditor(model, tok)
    )
    out = tmp_path / "run"
    argv = ["--method", "loki", "--data", str(COUNTERFACT), "--n", "2", "--checkpoint-every", "0",
            "--out", str(out), "--fluency-tokens", "4", "--fluency-prompts", "2",
            "--checkpoint-prompts", "1", "--ppl-tokens", "40"]  # fmt: skip
    assert bench_editing.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_failed"] == 2 and summary["edit_success_rate"] == 0.0
    assert summary["seconds_per_edit"]["median"] is None
    # rolled-back edits leave the model as it was (to fp32 rounding: W + d - d is not always W)
    for key in bench_editing.METRICS:
        assert summary["metrics"][key] == pytest.approx(summary["unedited"][key], rel=1e-5)
    rows = [json.loads(x) for x in (out / "per_edit.jsonl").read_text().splitlines()]
    assert all("bookkeeping failed" in r["error"] for r in rows)


class EvenOnlyEditor(RankOneEditor):
    """Reports success only for every other request, so --reject-unsuccessful leaves those out."""

    method = "even-only-test"
    calls = 0

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = super().compute(requests)
        result.success = self.calls % 2 == 0
        result.attempts = 1 if result.success else 2  # as LOKI's retry reports a second try
        self.calls += 1
        return result


@pytest.mark.slow
def test_bench_cli_rejects_unsuccessful_edits_like_the_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outs = {}
    for flag in ([], ["--reject-unsuccessful"]):
        monkeypatch.setattr(
            bench_editing, "build_editor", lambda m, model, tok, o: EvenOnlyEditor(model, tok)
        )
        out = outs[bool(flag)] = tmp_path / f"run{len(flag)}"
        argv = ["--method", "ft", "--data", str(COUNTERFACT), "--n", "2", "--offset", "10",
                "--checkpoint-every", "0", "--out", str(out), "--fluency-tokens", "4",
                "--fluency-prompts", "2", "--checkpoint-prompts", "1", "--ppl-tokens", "200",
                *flag]  # fmt: skip
        assert bench_editing.main(argv) == 0
    kept, left_out = (json.loads((outs[k] / "summary.json").read_text()) for k in (False, True))
    assert kept["n_rejected"] == 0 and left_out["n_rejected"] == 1
    assert kept["n_retried"] == left_out["n_retried"] == 1
    assert left_out["reject_unsuccessful"] is True and left_out["edit_success_rate"] == 0.5
    rows = [json.loads(x) for x in (outs[True] / "per_edit.jsonl").read_text().splitlines()]
    assert [r["applied"] for r in rows] == [True, False]
    # the second edit is real (it changes the fixed text's perplexity) and only one run made it
    assert left_out["metrics"]["perplexity"] != kept["metrics"]["perplexity"]
    assert left_out["metrics"]["efficacy"] <= kept["metrics"]["efficacy"]


@pytest.mark.slow
def test_bench_cli_with_real_ft_editor(tmp_path: Path) -> None:
    out = tmp_path / "ft"
    argv = ["--method", "ft", "--data", str(COUNTERFACT), "--n", "2", "--offset", "20",
            "--checkpoint-every", "0", "--out", str(out), "--fluency-tokens", "4",
            "--fluency-prompts", "2", "--checkpoint-prompts", "1",
            "--ppl-tokens", "40"]  # fmt: skip
    assert bench_editing.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_edits"] == 2 and summary["n_failed"] == 0
    rows = [json.loads(x) for x in (out / "per_edit.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ft", "ft"]
    # FT-L is trained on exactly the edit prompt: it must win there
    assert summary["metrics"]["efficacy"] >= summary["unedited"]["efficacy"]
    assert summary["metrics"]["efficacy"] >= 0.5


def test_keyspace_editable_share_and_eigen_basis() -> None:
    from bench.keyspace import editable_share, eigen_basis

    basis = torch.eye(4)[:, :2]  # protects the first two coordinates
    keys = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]])
    assert editable_share(basis, keys) == pytest.approx(9.0 / 10.0)
    moment = torch.diag(torch.tensor([0.5, 0.02, 0.005, 0.0]))
    kept = eigen_basis(moment, 1e-2)
    assert kept.shape == (4, 2)
    assert editable_share(kept, torch.eye(4)) == pytest.approx(0.5)


def test_prior_leakage_reads_what_a_prior_keeps_off_the_text() -> None:
    from bench.prior_leakage import (
        against_random,
        input_directions,
        leakage,
        paraphrase_response,
        second_moment,
    )

    keys = torch.tensor([[1.0, 1.0, 0.0]])  # the subject's key
    text = second_moment(torch.tensor([[0.0, 2.0, 0.0], [0.0, -2.0, 0.0]]))  # text uses axis 1
    bare = input_directions(None, keys, weight=1.0, alpha=1.0)
    assert torch.allclose(bare[:, 0], keys[0].double())  # α only: u ∝ k
    # u = (1, 1, 0): uᵀCu = 4, uᵀk = 2
    assert leakage(bare, keys, text).item() == pytest.approx(1.0)
    # a prior that has seen the text steers u off axis 1 and leaks less
    steered = input_directions(text, keys, weight=10.0, alpha=1.0)
    assert leakage(steered, keys, text).item() < 0.1
    # a paraphrase whose key lies along axis 1 is then answered less
    para = torch.tensor([[0.0, 2.0, 0.0]])
    assert paraphrase_response(bare, keys, para).item() == pytest.approx(1.0)
    assert paraphrase_response(steered, keys, para).item() < 0.1
    # against a random direction (tr C / d = 4/3): u = (1, 1, 0)/√2 reads 2 of it, 1.5×; the
    # steered u hardly reads the text at all, whatever its norm
    assert against_random(bare, text).item() == pytest.approx(1.5)
    assert against_random(3 * steered, text).item() == pytest.approx(
        against_random(steered, text).item()
    )
    assert against_random(steered, text).item() < 0.1


def test_edit_phases_cli_times_every_phase(tmp_path: Path) -> None:
    from bench import edit_phases
    from workers.editing import loki

    before = loki.optimise_target_values
    out = tmp_path / "phases.json"
    edit_phases.main(["--n", "1", "--out", str(out)])
    summary = json.loads(out.read_text())
    for phase in ("select", "target_value", "solves", "mpes", "bookkeeping", "total"):
        assert summary[phase]["n"] == 1, phase
    assert "trim" not in summary  # off by default: a phase that never ran is left out
    parts = sum(summary[p]["median"] for p in ("select", "target_value", "solves", "mpes"))
    assert parts <= summary["total"]["median"]
    assert loki.optimise_target_values is before  # the timers are taken off again
    edit_phases.main(["--n", "1", "--out", str(out), "--set", "trim_min_prob=0.5"])
    trimmed = json.loads(out.read_text())
    assert trimmed["trim"]["n"] == 1 and trimmed["overrides"] == {"trim_min_prob": "0.5"}
    assert trimmed["trim"]["median"] <= trimmed["mpes"]["median"]  # the trim runs inside MPES


def test_per_edit_windows_follow_success_choices_and_drift(tmp_path: Path) -> None:
    from bench import per_edit

    def row(i: int, success: bool, layers: list[int], change: float) -> dict[str, object]:
        names = {f"model.layers.{layer}.mlp.down_proj.weight": change for layer in layers}
        return {
            "index": i,
            "success": success,
            "selected_layers": layers,
            "relative_change": names,
            "seconds": 1.0 + i,
            "steps": 5,
        }

    rows = [row(0, True, [3, 4], 0.1), row(1, False, [4, 5], 0.2), row(2, True, [3], 0.3)]
    rows.append({"index": 3, "error": "RuntimeError: boom", "success": False})
    rows.append({**row(4, False, [3], 0.9), "applied": False})  # left out: its change is not real
    path = tmp_path / "per_edit.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    table = per_edit.windows(per_edit.read_rows(path), 2)
    assert [w["edits"] for w in table] == ["0-1", "2-3", "4-4"]
    assert [w["success"] for w in table] == [0.5, 1.0, 0.0]
    assert table[2]["rejected"] == 1 and table[2]["relative_change"]["3"] == 0.3
    assert table[0]["chosen"] == {3: 1, 4: 2, 5: 1}
    assert table[0]["relative_change"] == {"3": 0.1, "4": 0.2, "5": 0.2}
    assert table[1]["relative_change"]["3"] == 0.3  # the latest value carries on
    assert table[1]["failed"] == 1 and table[1]["median_seconds"] == 3.0
    assert "| 0-1 | 0.50 |" in per_edit.render(table)
    with pytest.raises(ValueError, match=r"^window"):
        per_edit.windows(rows, 0)


def test_layer_cost_cli_measures_a_complete_edit_per_layer(tmp_path: Path) -> None:
    from bench import layer_cost

    assert layer_cost.parse_layers("1-3,6") == [1, 2, 3, 6]
    summary = layer_cost.main(
        ["--n", "1", "--layers", "3", "--ppl-tokens", "128", "--out", str(tmp_path)]
    )
    cost = summary["layers"][3]
    assert cost["delta_norm"] > 0 and math.isfinite(cost["ppl_increase"])
    assert cost["ppl_increase"] != 0  # the change was in place while perplexity was read
    assert json.loads((tmp_path / "layer-cost.json").read_text())["layers"]["3"] == cost
    assert (tmp_path / "layer-cost.png").stat().st_size > 0


def test_drift_cli_splits_the_drift_by_layer(tmp_path: Path) -> None:
    from bench import drift

    flags = ["--n", "2", "--ppl-tokens", "128", "--scales", "0,1", "--per-edit",
             "--fluency-blocks", "2", "--fluency-prompts", "12",
             "--fluency-tokens", "6"]  # fmt: skip
    summary = drift.main([*flags, "--out", str(tmp_path)])
    # fluency with every edit, and with the one block of both taken back: the unedited figure
    flu = summary["fluency"]
    assert [b["edits"] for b in flu["without"]] == [[0, 1]]
    assert flu["edited"] != flu["unedited"]
    assert flu["without"][0]["fluency"] == pytest.approx(flu["unedited"], abs=1e-6)
    assert summary["rejected"] == 0
    layers = summary["layers"]
    assert sum(row["edits"] for row in layers.values()) == 2 * 3  # top 3 layers per edit
    ppl = summary["perplexity"]
    assert ppl["edited"] != ppl["unedited"]
    for row in layers.values():
        assert row["ppl_alone"] != ppl["unedited"]  # that layer's change was in place
        assert row["quadrature_ratio"] > 0 and row["median_delta_norm"] > 0
        assert row["median_output_norm"] > 0 and 0 < row["relative_change"] < 1
    assert 0 < summary["tokens"]["share_more_likely"] < 1
    cross = summary["cross_layer_ratio"]
    assert cross["layers"] == len(layers) > 1
    assert 0 < cross["all_tokens"] <= len(layers) and 0 < cross["top_100_damaged"] <= len(layers)
    # scaling the whole change by 0 and 1 gives back the unedited and the edited model
    assert summary["perplexity_scaled"]["0.0"] == pytest.approx(ppl["unedited"], rel=1e-4)
    assert summary["perplexity_scaled"]["1.0"] == pytest.approx(ppl["edited"], rel=1e-4)
    per_edit = summary["per_edit"]
    assert len(per_edit["marginal"]) == 2 and all(m != 0 for m in per_edit["marginal"])
    assert per_edit["most_costly"] == [max((0, 1), key=per_edit["marginal"].__getitem__)]
    # the costs at edit time telescope to the whole increase
    assert sum(per_edit["at_edit"]) == pytest.approx(ppl["edited"] - ppl["unedited"], abs=1e-3)
    written = json.loads((tmp_path / "drift.json").read_text())
    assert written["layers"][str(next(iter(layers)))] == next(iter(layers.values()))
    assert (tmp_path / "drift.png").stat().st_size > 0
    assert summary["text"] == "fixed"


@pytest.mark.slow
def test_drift_cli_reads_the_chosen_text(tmp_path: Path, loaded_model) -> None:
    from bench import drift

    summary = drift.main(["--n", "1", "--ppl-tokens", "96", "--text", "heldout",
                          "--out", str(tmp_path)])  # fmt: skip
    model, tok = loaded_model.model, loaded_model.tokenizer
    expected = perplexity(model, tok, heldout_text(), max_tokens=96)
    assert summary["text"] == "heldout"
    assert summary["perplexity"]["unedited"] == pytest.approx(expected, rel=1e-5)
    assert expected != pytest.approx(perplexity(model, tok, max_tokens=96), rel=1e-3)


def test_cross_layer_ratio_tells_aligned_pushes_from_unrelated_ones() -> None:
    from bench.drift import cross_layer_ratio, predicting_positions

    push = torch.randn(5, 8)
    assert cross_layer_ratio([push, push, push]) == pytest.approx(3.0)
    assert cross_layer_ratio([push, -push]) == 0.0
    eye = torch.eye(8)
    assert cross_layer_ratio([eye[:4], eye[4:]]) == pytest.approx(1.0)
    first_row = torch.tensor([0])
    assert cross_layer_ratio([eye[:4], eye[:4] + eye[4:]], first_row) == pytest.approx(5 / 3)
    # windows of 4 over 9 ids: each window's last token predicts nothing, a lone token is skipped
    assert predicting_positions(9, window=4).tolist() == [0, 1, 2, 4, 5, 6]


def test_per_edit_shares_tell_which_edits_carry_the_drift() -> None:
    from bench.drift import per_edit_shares

    # four edits, 10 → 14: the third one costs 3 of the 4 both when made and at the end
    shares = per_edit_shares([13.5, 13.8, 11.0, 14.2], [10.5, 10.7, 13.8, 14.0], 10.0, 14.0)
    assert shares["at_edit"] == pytest.approx([0.5, 0.2, 3.1, 0.2])
    assert shares["marginal"] == pytest.approx([0.5, 0.2, 3.0, -0.2])
    assert shares["most_costly"] == [2] and shares["share_negative"] == 0.25
    assert shares["top_tenth_share_of_total"] == pytest.approx(0.75)
    assert shares["top_tenth_at_edit_share_of_total"] == pytest.approx(0.75)
    assert shares["correlation_at_edit_vs_marginal"] > 0.9
    assert per_edit_shares([], [], 10.0, 14.0) == {}


def test_quadrature_ratio_tells_aligned_from_orthogonal_changes() -> None:
    from bench.drift import quadrature_ratio

    keys = torch.eye(4)
    out = torch.tensor([[1.0], [0.0], [0.0]])

    def change(column: int) -> MatrixDelta:
        b = torch.zeros(1, 4)
        b[0, column] = 1.0
        return MatrixDelta(name="w", a=out, b=b)

    assert quadrature_ratio([change(0), change(1), change(2)], keys) == pytest.approx(1.0)
    assert quadrature_ratio([change(0), change(0), change(0)], keys) == pytest.approx(3.0)


@pytest.mark.slow
def test_fluency_noise_bench_restores_the_model(tmp_path: Path) -> None:
    from bench import fluency_noise

    argv = ["--scale", "0.25", "--seeds", "2", "--prompts", "3", "--tokens", "6",
            "--ppl-tokens", "128", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    result = fluency_noise.main(argv)
    assert [r["seed"] for r in result["runs"]] == [0, 1] and result["prompts"] == 3
    # noise this size costs perplexity on every seed, and each seed draws its own noise
    assert all(r["ppl_ratio"] > 1.0 for r in result["runs"])
    assert result["runs"][0]["ppl_ratio"] != result["runs"][1]["ppl_ratio"]
    assert result["fluency_ratio"]["min"] <= result["fluency_ratio"]["max"]
    assert result["perplexity_restored"] == pytest.approx(result["unedited"]["perplexity"])
    assert (tmp_path / "fluency-noise.png").read_bytes()[:4] == b"\x89PNG"
    written = json.loads((tmp_path / "fluency-noise.json").read_text())
    assert written["runs"] == result["runs"]
    # per-prompt entropies for bench.fluency_flips, one list per seed
    assert len(written["unedited"]["fluency_entropies"]) == 3
    assert all(len(r["entropies"]) == 3 for r in written["runs"])
    # one scale per layer: equal scales draw the same noise as --scale
    same = fluency_noise.main([*argv[2:-1], str(tmp_path / "per-layer"), "--layer-scales",
                               "0.25,0.25,0.25,0.25"])  # fmt: skip
    assert [r["ppl_ratio"] for r in same["runs"]] == [r["ppl_ratio"] for r in result["runs"]]
    assert same["layer_scales"] == {"3": 0.25, "4": 0.25, "5": 0.25, "6": 0.25}
    with pytest.raises(SystemExit):
        fluency_noise.main([*argv, "--layer-scales", "0.25,0.3"])
