"""The three baselines on the real bundled model: each edit must make its target top-1, touch
only what the method says it touches, and leave the weights alone until applied."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from workers.editing import arch, hooks, stats
from workers.editing.arch import block, down_proj, down_proj_name
from workers.editing.baselines import (
    AlphaEditConfig,
    AlphaEditEditor,
    FTConfig,
    FTEditor,
    MemitConfig,
    MemitEditor,
    TargetValueConfig,
)
from workers.editing.baselines.alphaedit import alphaedit_update, null_space_projector
from workers.editing.baselines.memit import memit_update
from workers.editing.batch import build_batch
from workers.editing.delta import MatrixDelta
from workers.editing.hooks import UpperForward, logits_at, output_hooks
from workers.editing.keys import read_at_subject
from workers.editing.model import LoadedModel
from workers.editing.requests import EditRequest
from workers.editing.stats import key_second_moments
from workers.editing.target_value import optimise_target_values
from workers.editing.targets import targets_top1

# CounterFact train records 1 and 0: the unedited model gives each target P < 1e-3. FT-L
# cannot make Sweden top-1 for Madrid within its bound, so its test edits Yasuda.
MADRID = EditRequest(
    prompt="{}, which is located in",
    subject="Autonomous University of Madrid",
    target_new="Sweden",
    ground_truth="Spain",
)
YASUDA = EditRequest(
    prompt="{}, the", subject="Toko Yasuda", target_new="piano", ground_truth="guitar"
)
LOCALITY = ("Biure, which is located in", " Spain")

# one generated context instead of five and fewer steps: the same algorithm at a third of the
# cost, so the file stays within its time budget on two CPU cores
FAST = TargetValueConfig(steps=10, n_contexts=2)
LAYERS = (3, 4, 5, 6, 7)


@pytest.fixture(scope="module")
def lm(loaded_model: LoadedModel) -> Iterator[LoadedModel]:
    # one thread: with other processes on a two-core machine, two OpenMP threads contend and
    # each forward pass gets many times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield loaded_model
    torch.set_num_threads(threads)


@pytest.fixture
def restore(lm: LoadedModel) -> Iterator[None]:
    """Edits in these tests are real; put every touched matrix back afterwards."""
    saved = {layer: down_proj(lm.model, layer).weight.detach().clone() for layer in range(10)}
    yield
    with torch.no_grad():
        for layer, weight in saved.items():
            down_proj(lm.model, layer).weight.copy_(weight)


def p_target(lm: LoadedModel, request: EditRequest) -> tuple[bool, float]:
    hits, probs = targets_top1(lm.model, lm.tokenizer, [request.text], [request.target])
    return hits[0], probs[0]


def weights(lm: LoadedModel, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    return {layer: down_proj(lm.model, layer).weight.detach().clone() for layer in layers}


def assert_unchanged(lm: LoadedModel, before: dict[int, torch.Tensor]) -> None:
    for layer, weight in before.items():
        assert torch.equal(down_proj(lm.model, layer).weight, weight), f"layer {layer} changed"


def apply_computed(lm: LoadedModel, deltas: list[MatrixDelta]) -> None:
    """What ``Editor.apply`` does with a stateless method's result, without computing it twice."""
    params = dict(lm.model.named_parameters())
    for delta in deltas:
        delta.apply_to(params[delta.name].data)


# configs -----------------------------------------------------------------------------------


def test_configs_reject_bad_layers(lm: LoadedModel) -> None:
    with pytest.raises(ValueError, match=r"^layer:"):
        FTConfig(layer=-1)
    with pytest.raises(ValueError, match=r"^layer:"):
        FTEditor(lm.model, lm.tokenizer, FTConfig(layer=30))
    with pytest.raises(ValueError, match=r"^layers:"):
        MemitEditor(lm.model, lm.tokenizer, MemitConfig(layers=(3, 99)))
    with pytest.raises(ValueError, match=r"^layers:"):
        MemitConfig(layers=(5, 4))
    with pytest.raises(ValueError, match=r"^layers:"):
        AlphaEditConfig(layers=())
    with pytest.raises(ValueError, match=r"^lr:"):
        TargetValueConfig(lr=0.0)
    with pytest.raises(ValueError, match=r"^nullspace_threshold:"):
        AlphaEditConfig(nullspace_threshold=-1.0)


def test_upper_blocks_alone_give_the_full_forward_with_the_shift(lm: LoadedModel) -> None:
    batch = build_batch(lm.tokenizer, [MADRID.text, "Biure, which is located in"], ["", ""])
    positions = torch.tensor([3, batch.input_ids.shape[1] - 1])
    upper = UpperForward(lm.model, batch, 5)
    shift = torch.zeros_like(upper.hidden)
    shift[:, 2] = torch.randn(2, shift.shape[-1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = upper.logits(shift, positions)
        with output_hooks({block(lm.model, 5): lambda _x, h: h + shift}):
            full = logits_at(lm.model, batch, positions)
    assert hooks._upper_ok[lm.model][(5, False)]  # the shortcut was checked and is exact here
    assert torch.allclose(fast, full, atol=1e-4)
    assert arch.num_layers(lm.model) == 30  # the block list is put back


def test_cached_prefix_gives_the_full_forward_from_each_rows_start(lm: LoadedModel) -> None:
    prompts = [MADRID.text, "Biure, which is located in", "The mother tongue of Danielle is"]
    batch = build_batch(lm.tokenizer, prompts, [" Spain", " Spain", " French"])
    starts = [2, 0, 4]  # ragged on purpose; row 1 caches nothing
    positions = torch.arange(2, batch.input_ids.shape[1])
    upper = UpperForward(lm.model, batch, 5, starts=starts)
    assert upper.cached
    shift = torch.zeros_like(upper.hidden)
    rows = torch.arange(3)
    shift[rows, torch.tensor(starts)] = torch.randn(
        3, shift.shape[-1], generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        fast = upper.logits(shift, positions)
        with output_hooks({block(lm.model, 5): lambda _x, h: h + shift}):
            full = logits_at(lm.model, batch, positions)
    assert hooks._upper_ok[lm.model][(5, True)]
    lengths = batch.attention_mask.sum(dim=1)
    for r, start in enumerate(starts):
        real = (positions >= start) & (positions < lengths[r])
        assert real.any()
        assert torch.allclose(fast[r, real], full[r, real], atol=1e-4)
    # a gradient reaches the shift through the cached path
    shift.requires_grad_(True)
    upper.logits(shift, positions)[0, -1].sum().backward()
    assert shift.grad is not None and float(shift.grad[0, starts[0]].abs().sum()) > 0
    with pytest.raises(ValueError, match=r"^starts:"):
        UpperForward(lm.model, batch, 5, starts=[0, 0])


def test_cached_prefix_is_refused_for_sliding_windows_and_other_attention() -> None:
    from types import SimpleNamespace

    from transformers import LlamaConfig, MistralConfig

    def model(config: object, attention: str) -> SimpleNamespace:
        config._attn_implementation = attention  # type: ignore[attr-defined]
        return SimpleNamespace(config=config)

    assert hooks._plain_cache(model(LlamaConfig(num_hidden_layers=2), "sdpa"))
    assert hooks._plain_cache(
        model(MistralConfig(num_hidden_layers=2, sliding_window=None), "eager")
    )
    # a hand-built 4D mask would ignore the window, and the window's cache drops keys
    assert not hooks._plain_cache(
        model(MistralConfig(num_hidden_layers=2, sliding_window=8), "sdpa")
    )
    assert not hooks._plain_cache(model(LlamaConfig(num_hidden_layers=2), "flash_attention_2"))


def test_upper_shortcut_is_refused_where_blocks_are_typed_by_position() -> None:
    from types import SimpleNamespace

    def model(types: list[str] | None) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(layer_types=types))

    mixed = ["sliding"] * 5 + ["full"] + ["sliding"] * 5 + ["full"]
    assert hooks._layer_types_shift(model(mixed), 3)
    assert not hooks._layer_types_shift(model(mixed), 6)  # the pattern repeats every 6
    assert not hooks._layer_types_shift(model(["full"] * 12), 3)
    assert not hooks._layer_types_shift(model(None), 3)


def test_target_value_stops_once_the_target_nll_is_low(lm: LoadedModel) -> None:
    request = [MADRID]
    contexts = ["{}"]
    full = optimise_target_values(lm.model, lm.tokenizer, request, 5, contexts, FAST)
    early = optimise_target_values(
        lm.model, lm.tokenizer, request, 5, contexts, replace(FAST, loss_stop=0.0, nll_stop=2.0)
    )
    assert early.nll < 2.0
    assert early.steps < full.steps
    assert float((early.z - early.initial).norm()) < float((full.z - full.initial).norm())
    with pytest.raises(ValueError, match=r"^nll_stop:"):
        TargetValueConfig(nll_stop=-1.0)


def test_sensitivity_penalty_turns_v_star_away_from_sensitive_directions(
    lm: LoadedModel,
) -> None:
    request, contexts = [MADRID], ["{}"]
    free = optimise_target_values(lm.model, lm.tokenizer, request, 5, contexts, FAST)
    move = (free.z - free.initial)[0]
    # make the directions the unpenalised δ uses most 20× as costly as the rest
    d = move.numel()
    hot = move.abs() >= move.abs().median()
    weights = torch.where(hot, 20.0, 1.0)
    fisher = torch.diag(weights * d / weights.sum())
    steered = optimise_target_values(
        lm.model,
        lm.tokenizer,
        request,
        5,
        contexts,
        replace(FAST, sensitivity_weight=20.0),
        fisher,
    )
    moved = (steered.z - steered.initial)[0]

    def cost(v: torch.Tensor) -> float:
        return float(v @ fisher @ v) / float(v @ v)

    assert cost(moved) < 0.8 * cost(move)
    assert steered.nll < 2.0  # the target is still learnt
    with pytest.raises(ValueError, match=r"^sensitivity_weight:"):
        optimise_target_values(
            lm.model, lm.tokenizer, request, 5, contexts, replace(FAST, sensitivity_weight=1.0)
        )
    with pytest.raises(ValueError, match=r"^sensitivity_weight:"):
        TargetValueConfig(sensitivity_weight=-1.0)


def test_residual_fisher_is_normalised_psd_and_cached(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from workers.editing import sensitivity

    def fisher(cache: Path) -> dict[int, torch.Tensor]:
        return sensitivity.residual_fisher(
            lm.model, lm.tokenizer, (3, 5), max_tokens=48, cache_dir=cache
        )

    got = fisher(tmp_path)
    d = lm.model.config.hidden_size
    for matrix in got.values():
        assert matrix.shape == (d, d)
        assert torch.allclose(matrix, matrix.T, atol=1e-4)
        assert float(torch.trace(matrix)) == pytest.approx(d, rel=1e-4)
        assert float(torch.linalg.eigvalsh(matrix.double()).min()) > -1e-3
    assert not torch.allclose(got[3], got[5])
    assert len(list(tmp_path.glob("*-fisher-layer*.safetensors"))) == 2

    def recompute(*_args: object) -> None:
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(sensitivity, "_fisher", recompute)
    assert torch.equal(fisher(tmp_path)[3], got[3])


# the closed-form updates, on the real statistics -------------------------------------------


@pytest.fixture(scope="module")
def mom2(lm: LoadedModel) -> dict[int, torch.Tensor]:
    return key_second_moments(lm.model, lm.tokenizer, LAYERS)


def test_second_moments_are_a_covariance(mom2: dict[int, torch.Tensor]) -> None:
    c = mom2[7].double()
    assert c.shape == (1536, 1536)
    assert torch.allclose(c, c.T, atol=1e-6)
    assert float(torch.linalg.eigvalsh(c).min()) > -1e-6


def test_second_moments_are_cached_per_model_layer_and_sample_count(
    lm: LoadedModel, tmp_path: Path
) -> None:
    first = key_second_moments(lm.model, lm.tokenizer, [2], max_tokens=300, cache_dir=tmp_path)
    path = tmp_path / "smollm2-135m-instruct-layer2-n300.safetensors"
    assert path.is_file()
    stats._memo.clear()  # force the disk path
    again = key_second_moments(lm.model, lm.tokenizer, [2], max_tokens=300, cache_dir=tmp_path)
    assert torch.equal(first[2], again[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_self_sampled_moments_are_deterministic_and_cached_apart_from_the_text_ones(
    lm: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def moments(layers: list[int]) -> dict[int, torch.Tensor]:
        stats._memo.clear()  # force the disk path
        return key_second_moments(
            lm.model, lm.tokenizer, layers, max_tokens=32, cache_dir=tmp_path, source="self"
        )

    first = moments([2])
    sampled, path = sorted(tmp_path.iterdir(), key=lambda p: p.suffix)
    assert path.name.startswith("smollm2-135m-instruct-self-layer2-n")
    assert sampled.name.startswith("smollm2-135m-instruct-self-n") and sampled.suffix == ".json"
    assert torch.equal(first[2], moments([2])[2])
    # a layer asked for later reads the kept text: no second sampling, the same statistics
    path.unlink()
    with monkeypatch.context() as patch:
        patch.setattr(stats, "self_text_chunks", lambda *a, **k: pytest.fail("sampled again"))
        both = moments([2, 3])
    assert torch.equal(first[2], both[2]) and both[3].shape == first[2].shape
    sampled.write_text("{not json")  # a damaged file is sampled again, not a crash
    path.unlink()
    assert torch.equal(first[2], moments([2])[2]) and json.loads(sampled.read_text())["chunks"]
    for cached in tmp_path.iterdir():
        cached.unlink()
    resampled = moments([2])
    assert torch.equal(first[2], resampled[2])  # seeded sampling: the same text again
    text = key_second_moments(lm.model, lm.tokenizer, [2], max_tokens=300, cache_dir=tmp_path)
    assert not torch.allclose(text[2], first[2])
    with pytest.raises(ValueError, match="source"):
        key_second_moments(lm.model, lm.tokenizer, [2], source="wiki")


def test_memit_update_is_low_rank_and_solves_the_normal_equations(
    mom2: dict[int, torch.Tensor],
) -> None:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(1536, 3, generator=gen, dtype=torch.float64)
    share = torch.randn(576, 3, generator=gen, dtype=torch.float64)
    a, b = memit_update(keys, share, mom2[5], 1500.0)
    dense = a @ b
    assert torch.linalg.matrix_rank(dense) <= 3
    # ΔW (λC + KKᵀ) = R Kᵀ is what makes it the least-squares update MEMIT defines
    lhs = dense @ (1500.0 * mom2[5].double() + keys @ keys.T)
    assert torch.allclose(lhs, share @ keys.T, rtol=1e-6, atol=1e-8)


def test_alphaedit_update_leaves_protected_keys_and_cached_keys_alone(
    mom2: dict[int, torch.Tensor],
) -> None:
    proj = null_space_projector(mom2[7], 1e-2)
    _, eigvecs = torch.linalg.eigh(mom2[7].double())
    protected = eigvecs[:, -1]  # the direction ordinary text uses most
    gen = torch.Generator().manual_seed(0)

    def key_in_null_space(base: torch.Tensor) -> torch.Tensor:
        k = proj @ (base + torch.randn(1536, 1, generator=gen, dtype=torch.float64))
        return 5 * k / k.norm()  # real subject keys have norms of about 5

    new_key = key_in_null_space(torch.zeros(1536, 1, dtype=torch.float64))
    # a past edit whose key overlaps the new one, so an unconstrained update would move it
    past_key = key_in_null_space(new_key / 5 * 20)
    share = torch.randn(576, 1, generator=gen, dtype=torch.float64)

    a, b = alphaedit_update(new_key, share, proj, past_key.T, 10.0)
    dense = a @ b
    assert torch.linalg.matrix_rank(dense) == 1
    assert float((dense @ protected).norm()) < 1e-9 * float(dense.norm())

    a0, b0 = alphaedit_update(new_key, share, proj, torch.zeros(0, 1536, dtype=torch.float64), 10)
    hit_with_cache = float((a @ b @ past_key).norm())
    hit_without = float((a0 @ b0 @ past_key).norm())
    # AlphaEdit penalises a cached key as softly as the ridge term does: ΔW·k_p shrinks by
    # about α/(α + ‖k_p‖²) = 10/35 against the same update without the cache
    assert hit_with_cache < 0.4 * hit_without
    # the edit itself still lands: most of the share is written along the new key
    assert float((dense @ new_key - share).norm()) < 0.5 * float(share.norm())


# real edits ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_ft_edit(lm: LoadedModel, restore: None) -> None:
    editor = FTEditor(lm.model, lm.tokenizer)
    _, p_before = p_target(lm, YASUDA)
    before = weights(lm, (4,))
    result = editor.compute([YASUDA])
    assert_unchanged(lm, before)

    apply_computed(lm, result.deltas)
    top1, p_after = p_target(lm, YASUDA)
    assert top1 and result.success
    assert p_after > 20 * p_before
    (delta,) = result.deltas
    assert delta.name == down_proj_name(lm.model, 4)
    bound = editor.config.norm_constraint * float(before[4].abs().mean())
    assert float(delta.to_dense().abs().max()) <= bound * (1 + 1e-4)
    assert result.method == "ft" and result.selected_layers == [4]
    assert 0 < result.relative_change[delta.name] < 0.05


@pytest.mark.slow
def test_memit_edit(lm: LoadedModel, restore: None) -> None:
    editor = MemitEditor(lm.model, lm.tokenizer, MemitConfig(target=FAST))
    _, p_before = p_target(lm, MADRID)
    _, p_local = targets_top1(lm.model, lm.tokenizer, [LOCALITY[0]], [LOCALITY[1]])
    before = weights(lm, LAYERS)
    result = editor.compute([MADRID])
    assert_unchanged(lm, before)

    apply_computed(lm, result.deltas)
    top1, p_after = p_target(lm, MADRID)
    assert top1 and result.success
    assert p_after > 0.3 > 100 * p_before
    _, p_local_after = targets_top1(lm.model, lm.tokenizer, [LOCALITY[0]], [LOCALITY[1]])
    assert p_local_after[0] == pytest.approx(p_local[0], rel=0.2)
    assert result.selected_layers == list(LAYERS)
    for delta in result.deltas:
        # one request, one key: MEMIT's change to every layer is exactly rank one
        assert delta.rank == 1
        assert torch.linalg.matrix_rank(delta.to_dense()) == 1
        norm = float(delta.to_dense().norm())
        assert result.delta_norm[delta.name] == pytest.approx(norm, rel=1e-4)


@pytest.mark.slow
def test_alphaedit_edits_keep_cached_keys_as_state(lm: LoadedModel, restore: None) -> None:
    config = AlphaEditConfig(target=FAST)
    editor = AlphaEditEditor(lm.model, lm.tokenizer, config)
    assert editor.state_dict() == {}

    result = editor.apply([MADRID])
    assert result.success and p_target(lm, MADRID)[0]
    assert set(result.key_ratio) == {down_proj_name(lm.model, layer) for layer in LAYERS}
    state = editor.state_dict()
    assert sorted(state) == [f"cached_keys.layer{layer}" for layer in LAYERS]
    assert all(t.shape == (1, 1536) for t in state.values())

    restored = AlphaEditEditor(lm.model, lm.tokenizer, config)
    restored.load_state_dict(state)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match=r"^state:"):
        restored.load_state_dict({"cached_keys.layer12": state["cached_keys.layer3"]})

    # the next edit's change barely moves the cached key of the first: it is in the solve
    second = editor.compute([YASUDA])
    assert second.success
    new_keys = read_at_subject(lm.model, lm.tokenizer, [YASUDA], editor.contexts(), LAYERS).keys
    for layer, delta in zip(LAYERS, second.deltas, strict=True):
        assert isinstance(delta, MatrixDelta)
        change = delta.to_dense().double()
        on_cached = float((change @ editor.cached_keys(layer)[0].double()).norm())
        on_new = float((change @ new_keys[layer][0].double()).norm())
        assert on_cached < 0.1 * on_new, f"layer {layer}: {on_cached:.3g} vs {on_new:.3g}"
