"""LOKI on the real bundled model: an edit changes the fact, generalises, leaves others alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch

from workers.editing.loki import LokiConfig, LokiEditor
from workers.editing.model import LoadedModel
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult
from workers.editing.scoring import greedy_continuation

EDIT = EditRequest(
    prompt="The Eiffel Tower is located in the city of",
    subject="Eiffel Tower",
    target_new="Rome",
    ground_truth="Paris",
)
PARAPHRASE = "Where is the Eiffel Tower? The Eiffel Tower is located in the city of"
UNRELATED = "The capital of Japan is the city of"


@pytest.fixture
def editor(loaded_model: LoadedModel) -> Iterator[LokiEditor]:
    """A fresh editor; the shared model's weights are restored afterwards."""
    before = {
        n: p.detach().clone() for n, p in loaded_model.model.named_parameters() if "down_proj" in n
    }
    yield LokiEditor(loaded_model.model, loaded_model.tokenizer)
    params = dict(loaded_model.model.named_parameters())
    with torch.no_grad():
        for name, value in before.items():
            params[name].copy_(value)


@pytest.mark.slow
def test_one_edit_changes_the_fact_and_nothing_unrelated(
    loaded_model: LoadedModel, editor: LokiEditor
) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    assert "Paris" in greedy_continuation(model, tok, EDIT.text, 4)
    unrelated_before = greedy_continuation(model, tok, UNRELATED, 2)
    assert unrelated_before.strip().startswith("Tokyo")

    result = editor.apply([EDIT])

    assert result.success
    assert greedy_continuation(model, tok, EDIT.text, 4).strip().startswith("Rome")
    assert greedy_continuation(model, tok, PARAPHRASE, 4).strip().startswith("Rome")
    assert greedy_continuation(model, tok, UNRELATED, 2) == unrelated_before
    # bookkeeping the service stores with the version
    assert len(result.selected_layers) == editor.config.top_k
    assert all(0 < r <= 1 for r in result.key_ratio.values())
    assert all(d.rank == 1 for d in result.deltas)  # one request: ΔW = a·b exactly rank 1
    for delta in result.deltas:
        assert delta.norm() == pytest.approx(result.delta_norm[delta.name], rel=1e-3)
        layer = int(delta.name.split(".")[2])
        # ΔW·P = ΔW: the change never reads W₀'s protected input directions
        basis = editor.weight_basis(layer).cpu()
        assert (delta.to_dense() @ basis).abs().max() < 1e-4 * delta.to_dense().abs().max()
    cfg = editor.config
    assert 0 < result.steps <= cfg.target.steps + cfg.refine_steps


@pytest.mark.slow
def test_second_edit_keeps_the_first_and_state_round_trips(
    loaded_model: LoadedModel, editor: LokiEditor
) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    clone = LokiEditor(model, tok)  # built on the base weights
    first = editor.apply([EDIT])
    assert first.success
    first_keys = {layer: editor.past_keys[layer].clone() for layer in editor.layers}
    assert all(editor.cached_keys(layer) == 1 for layer in editor.layers)
    second = editor.apply(
        [EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano")]
    )
    assert second.success
    for delta in second.deltas:
        layer = int(delta.name.split(".")[2])
        # the past edit's key is in the regulariser: the second change barely reaches it
        k1 = first_keys[layer][0]
        k2 = editor.past_keys[layer][1]
        moved_first = float((delta.to_dense() @ k1).norm())
        moved_own = float((delta.to_dense() @ k2).norm())
        assert moved_first < 0.05 * moved_own
    assert greedy_continuation(model, tok, EDIT.text, 4).strip().startswith("Rome")
    state = editor.state_dict()
    clone.load_state_dict(state)
    assert clone.n_edits == 2
    for layer, keys in editor.past_keys.items():
        assert torch.equal(clone.past_keys[layer], keys)
    # only what the edits added travels: one key row per edit and candidate layer
    assert {k: tuple(v.shape) for k, v in state.items() if k != "n_edits"} == {
        f"keys.{layer}": (2, editor.modules[layer].in_features) for layer in editor.layers
    }
    with pytest.raises(ValueError, match=r"keys\.3 must be"):
        clone.load_state_dict({"keys.3": torch.zeros(1, 5)})


def test_failed_edit_leaves_weights_unchanged(
    loaded_model: LoadedModel, editor: LokiEditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {
        n: p.detach().clone() for n, p in loaded_model.model.named_parameters() if "down_proj" in n
    }

    def broken(*_args: object) -> None:
        raise RuntimeError("bookkeeping failed")

    monkeypatch.setattr(editor, "after_apply", broken)
    with pytest.raises(RuntimeError, match="bookkeeping"):
        editor.apply([EDIT])
    params = dict(loaded_model.model.named_parameters())
    assert all(torch.allclose(params[n], v, atol=1e-6) for n, v in before.items())


def test_retry_takes_an_edit_the_first_attempt_left_unfinished(
    loaded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a first attempt too weak to finish (a tiny v*, no MPES), and a retry with the usual room
    cfg = LokiConfig(
        retry=False,
        refine_steps=0,
        target=dataclasses.replace(LokiConfig().target, clamp_norm_factor=0.01),
        retry_clamp_norm_factor=0.5,
        retry_refine_steps=10,
        retry_refine_lr=0.07,
    )
    model, tok = loaded_model.model, loaded_model.tokenizer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
    assert not LokiEditor(model, tok, cfg).compute([EDIT]).success

    # per attempt: settings, result, its own steps, and the layer choice it was handed
    Seen = list[tuple[LokiConfig, EditResult, int, object]]

    def spied(config: LokiConfig) -> tuple[LokiEditor, Seen, list[int]]:
        editor = LokiEditor(model, tok, config)
        seen: Seen = []
        selects: list[int] = []
        attempt, select = editor._attempt, editor._select_layers

        def spy(requests: list[EditRequest], settings: LokiConfig, shared: object) -> EditResult:
            result = attempt(requests, settings, shared)  # type: ignore[arg-type]
            seen.append((settings, result, result.steps, shared))
            return result

        def counted(*args: object) -> object:
            selects.append(1)
            return select(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(editor, "_attempt", spy)
        monkeypatch.setattr(editor, "_select_layers", counted)
        return editor, seen, selects

    editor, seen, selects = spied(dataclasses.replace(cfg, retry=True))
    retried = editor.compute([EDIT])
    (first_cfg, first, first_steps, chose), (second_cfg, second, second_steps, chose_again) = seen
    assert not first.success and retried is second
    assert retried.success and retried.attempts == 2
    assert retried.steps == first_steps + second_steps  # both attempts' steps are counted
    # the layer choice (a forward pass and the HSIC scores) is made once for both attempts
    assert len(selects) == 1 and chose is chose_again
    assert [s.selected for s in first.layers] == [s.selected for s in second.layers]
    assert first_cfg.target.clamp_norm_factor == 0.01 and second_cfg.target.clamp_norm_factor == 0.5
    assert second_cfg.refine_steps == 10 and second_cfg.refine_lr == 0.07
    assert second_cfg.target.nll_stop == 0 and not second_cfg.retry
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in before.items())  # compute never writes

    # when neither takes, the first attempt's change (the tuned settings') is the one reported
    weak = dataclasses.replace(cfg, retry=True, retry_clamp_norm_factor=0.03, retry_refine_steps=0)
    editor, seen, _ = spied(weak)
    neither = editor.compute([EDIT])
    (_, first, _, _), (_, second, _, _) = seen
    assert neither is first and not neither.success and neither.attempts == 2
    assert neither.delta_norm != pytest.approx(second.delta_norm, rel=1e-3)

    # an edit that takes at once is not tried again (the default retries)
    editor, seen, selects = spied(LokiConfig())
    assert editor.compute([EDIT]).attempts == 1 and len(seen) == 1 and len(selects) == 1


def test_layer_choice_accepts_a_rephrasing_without_the_subject(editor: LokiEditor) -> None:
    # a rephrasing may name the subject differently; it still counts as an observation
    request = EditRequest(
        prompt=EDIT.prompt,
        subject=EDIT.subject,
        target_new=EDIT.target_new,
        rephrase_prompts=("That iron lattice tower in France stands in the city of",),
    )
    selection = editor._select_layers([request], editor.contexts())
    scores, chosen, context_keys = selection.scores, selection.chosen, selection.context_keys
    assert set(scores) == set(editor.layers)
    assert len(chosen) == editor.config.top_k
    assert all(len(context_keys[layer]) > 0 for layer in chosen)


def test_reserve_layers_take_edits_once_the_candidates_have_drifted(
    loaded_model: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    editor = LokiEditor(
        loaded_model.model, loaded_model.tokenizer, LokiConfig(reserve_layers=(2, 7))
    )
    assert editor.reserve == (2, 7) and editor.layers == (2, 3, 4, 5, 6, 7)
    contexts = editor.contexts()
    fresh = editor._select_layers([EDIT], contexts).chosen
    assert not set(fresh) & {2, 7}  # a fresh model's edits stay on the candidates

    # one candidate still below reserve_from·cap (0.6): the reserves stay closed
    home = set(editor.layers) - set(editor.reserve)
    drift = dict.fromkeys(editor.layers, 0.0) | dict.fromkeys(home, 0.9) | {3: 0.5}
    monkeypatch.setattr(editor, "relative_drift", lambda layer, *_: drift[layer])
    partly = editor._select_layers([EDIT], contexts).chosen
    assert not set(partly) & {2, 7}

    # every candidate at 0.9‖W₀‖: the reserves, undrifted, outrank them
    drift[3] = 0.9
    chose = editor._select_layers([EDIT], contexts)
    scores, full = chose.scores, chose.chosen
    assert {2, 7} <= set(full) and set(scores) == set(editor.layers)


@pytest.mark.slow
def test_key_contexts_average_the_subject_key_over_more_prefixes(
    loaded_model: LoadedModel, editor: LokiEditor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.editing.loki as loki
    from workers.editing.keys import read_at_subject

    editor.config = dataclasses.replace(editor.config, key_contexts=8)
    seen: list[int] = []
    spread = loki.spread_over_layers

    def spy(model, tokenizer, requests, contexts, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(len(contexts))
        return spread(model, tokenizer, requests, contexts, *args, **kwargs)

    monkeypatch.setattr(loki, "spread_over_layers", spy)
    result = editor.apply([EDIT])
    assert result.success and seen == [8]
    # v* and MPES keep their 4 contexts; the key the update reads and the key later edits are
    # kept off are both the 8-context average, read on the edited model
    assert editor.config.target.n_contexts == 4
    model, tok = loaded_model.model, loaded_model.tokenizer
    with_8 = read_at_subject(model, tok, [EDIT], editor.contexts(8), editor.layers).keys
    with_4 = read_at_subject(model, tok, [EDIT], editor.contexts(4), editor.layers).keys
    for layer in editor.layers:
        assert torch.allclose(editor.past_keys[layer][0], with_8[layer][0], atol=1e-5)
        assert not torch.allclose(editor.past_keys[layer][0], with_4[layer][0], atol=1e-3)


def test_read_text_keys_reads_every_token_window_by_window(loaded_model: LoadedModel) -> None:
    from workers.editing.keys import read_text_keys

    model, tok = loaded_model.model, loaded_model.tokenizer
    text = "The water cycle moves water between the oceans, the air and the land."
    short = read_text_keys(model, tok, text, [3, 5], window=4, max_tokens=10)
    whole = read_text_keys(model, tok, text, [3, 5], window=512, max_tokens=10)
    d_ff = model.config.intermediate_size
    assert short[3].shape == whole[5].shape == (10, d_ff)
    # causal: a window's first tokens see the same context either way, later ones do not
    assert torch.allclose(short[5][:4], whole[5][:4], atol=1e-5)
    assert not torch.allclose(short[5][4:8], whole[5][4:8], atol=1e-3)


@pytest.mark.slow
def test_trim_shrinks_the_change_only_as_far_as_the_target_keeps_its_margin(
    loaded_model: LoadedModel,
) -> None:
    from workers.editing.hooks import applied
    from workers.editing.keys import contextual_prompts
    from workers.editing.targets import targets_top1

    model, tok = loaded_model.model, loaded_model.tokenizer
    full = LokiEditor(model, tok, LokiConfig(trim_min_prob=0)).compute([EDIT])
    trimmed_editor = LokiEditor(model, tok, LokiConfig(trim_min_prob=0.5, trim_contexts=6))
    trimmed = trimmed_editor.compute([EDIT])
    assert full.success and trimmed.success
    # one common factor on every layer's output factor; the input directions are untouched
    ratios = [trimmed.delta_norm[n] / full.delta_norm[n] for n in full.delta_norm]
    assert 0.05 < ratios[0] < 0.97
    assert ratios == pytest.approx([ratios[0]] * len(ratios), rel=1e-4)
    assert full.trim_scale is None and trimmed.trim_scale == pytest.approx(ratios[0], rel=1e-4)
    for before, after in zip(full.deltas, trimmed.deltas, strict=True):
        assert torch.allclose(before.b, after.b)
    # ...and the trimmed edit still gives the target at least the margin in every context
    prompts = contextual_prompts([EDIT], trimmed_editor.contexts(6))
    layers = {int(d.name.split(".")[2]): d for d in trimmed.deltas}
    with applied(model, layers):
        hits, probs = targets_top1(model, tok, prompts, [EDIT.target] * len(prompts))
    assert all(hits) and min(probs) >= 0.5
    # one bisection step less and some context falls below the margin: it trimmed as far as it may
    cfg = trimmed_editor.config
    less = (trimmed.trim_scale - 2.0**-cfg.trim_steps) / trimmed.trim_scale
    for delta in layers.values():
        delta.a = delta.a * less
    with applied(model, layers):
        hits, probs = targets_top1(model, tok, prompts, [EDIT.target] * len(prompts))
    assert not (all(hits) and min(probs) >= 0.5)


@pytest.mark.slow
def test_trim_keeps_the_target_a_lead_over_the_old_answer(loaded_model: LoadedModel) -> None:
    from dataclasses import replace

    from workers.editing.hooks import applied
    from workers.editing.keys import contextual_prompts
    from workers.editing.scoring import target_logprobs

    model, tok = loaded_model.model, loaded_model.tokenizer
    cfg = LokiConfig(trim_min_margin=2.5)
    editor = LokiEditor(model, tok, cfg)
    trimmed = editor.compute([EDIT])
    assert trimmed.success and trimmed.trim_scale is not None and trimmed.trim_scale < 1
    prompts = contextual_prompts([EDIT], editor.contexts(cfg.trim_contexts))
    layers = {int(d.name.split(".")[2]): d for d in trimmed.deltas}

    def leads() -> list[float]:
        with applied(model, layers):
            new = target_logprobs(model, tok, prompts, [EDIT.target] * len(prompts))
            old = target_logprobs(model, tok, prompts, [" Paris"] * len(prompts))  # one token
        return [n - o for n, o in zip(new, old, strict=True)]

    assert min(leads()) >= 2.5 - 1e-4
    less = (trimmed.trim_scale - 2.0**-cfg.trim_steps) / trimmed.trim_scale
    for delta in layers.values():
        delta.a = delta.a * less
    assert min(leads()) < 2.5  # one bisection step less loses the lead somewhere
    # without a ground truth the old answer is what the model said before: Paris here too
    unlabelled = editor.compute([replace(EDIT, ground_truth=None)])
    assert unlabelled.trim_scale == trimmed.trim_scale


def test_the_old_answer_is_the_truth_where_it_differs_else_what_the_model_said(
    loaded_model: LoadedModel,
) -> None:
    from dataclasses import replace

    from workers.editing.batch import encode
    from workers.editing.scoring import target_logprobs
    from workers.editing.targets import TargetProbe

    model, tok = loaded_model.model, loaded_model.tokenizer
    editor = LokiEditor(model, tok, LokiConfig(trim_min_margin=1.0))
    contexts = editor.contexts(2)

    def rivals(request: EditRequest) -> tuple[list[int], list[int], TargetProbe]:
        prompts = [c.replace("{}", request.text) for c in contexts]
        probe = TargetProbe(model, tok, prompts, [request.target] * len(prompts))
        got = editor._old_answers([request], len(contexts), probe)
        return got.offsets.tolist(), got.tokens.tolist(), probe

    paris, london = encode(tok, " Paris")[0], encode(tok, " London")[0]
    assert rivals(replace(EDIT, ground_truth="London"))[:2] == ([0, 0], [london, london])
    # no ground truth: the model's own answer before the edit
    assert rivals(replace(EDIT, ground_truth=None))[:2] == ([0, 0], [paris, paris])
    # answers that share their first token are compared where they part
    delhi = replace(EDIT, target_new="New Delhi", ground_truth="New York")
    new, old = encode(tok, delhi.target), encode(tok, " New York")
    assert new[0] == old[0] and new[1] != old[1]
    offsets, tokens, probe = rivals(delhi)
    assert offsets == [1, 1] and tokens == [old[1], old[1]]
    leads = probe.read(editor._old_answers([delhi], len(contexts), probe)).leads
    # the target's mean log-prob against " York" after " New", in the bare context
    target_lp = target_logprobs(model, tok, [delhi.text], [delhi.target])[0]
    york_lp = target_logprobs(model, tok, [delhi.text + " New"], [" York"])[0]
    expected = target_lp - york_lp
    assert leads is not None and leads[0] == pytest.approx(expected, abs=1e-3)
    # one answer containing the other: nothing to compare
    assert rivals(replace(EDIT, target_new="Paris Hilton", ground_truth="Paris"))[1] == [-1, -1]


def test_the_probe_reads_each_target_tokens_lead_over_the_best_other_token(
    loaded_model: LoadedModel,
) -> None:
    from workers.editing.batch import encode
    from workers.editing.targets import TargetProbe

    model, tok = loaded_model.model, loaded_model.tokenizer
    prompt = EDIT.text  # the model answers Paris here before any edit
    got = TargetProbe(model, tok, [prompt, prompt], [" Paris", " Rome"]).read()
    ids = torch.tensor([encode(tok, prompt)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    paris, rome = encode(tok, " Paris")[0], encode(tok, " Rome")[0]
    best_other = logits.clone()
    best_other[paris] = -float("inf")
    assert got.top_gaps is not None and got.hits == [True, False]
    assert got.top_gaps[0] == pytest.approx(float(logits[paris] - best_other.max()), abs=1e-3)
    assert got.top_gaps[1] == pytest.approx(float(logits[rome] - logits.max()), abs=1e-3)
    assert got.top_gaps[0] > 0 > got.top_gaps[1]


@pytest.mark.slow
def test_consolidation_re_solves_every_layer_and_keeps_the_edits(
    loaded_model: LoadedModel, editor: LokiEditor
) -> None:
    model, tok = loaded_model.model, loaded_model.tokenizer
    # the fixture's editor restores the weights afterwards; this one consolidates every 2 edits
    consolidating = LokiEditor(model, tok, LokiConfig(consolidate_every=2))
    toko = EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano")
    first = consolidating.apply([EDIT])
    assert first.success and not first.consolidated
    assert all(d.rank == 1 for d in first.deltas)
    before = {layer: consolidating.drift(layer) for layer in consolidating.layers}

    second = consolidating.apply([toko])

    assert second.success and second.consolidated and second.summary()["consolidated"]
    assert {d.name for d in second.deltas} == set(consolidating.names.values())
    assert all(d.dense is not None for d in second.deltas)
    for layer in consolidating.layers:
        drift = consolidating.drift(layer)
        name = consolidating.names[layer]
        assert second.relative_change[name] == pytest.approx(
            consolidating.relative_drift(layer), rel=1e-4
        )
        assert second.delta_norm[name] == pytest.approx(float((drift - before[layer]).norm()))
        basis = consolidating.weight_basis(layer)
        assert (drift @ basis).abs().max() <= 1e-4 * drift.abs().max()
    assert greedy_continuation(model, tok, EDIT.text, 4).strip().startswith("Rome")
    assert greedy_continuation(model, tok, toko.text, 2).strip().startswith("piano")
    assert consolidating.n_edits == 2 and all(
        consolidating.cached_keys(layer) == 2 for layer in consolidating.layers
    )
