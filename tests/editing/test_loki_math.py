"""Pure-math parts of LOKI: HSIC, projectors, low-rank deltas, request and config validation."""

from __future__ import annotations

import pytest
import torch

from workers.editing.baselines.alphaedit import alphaedit_update
from workers.editing.consolidate import least_energy_drift
from workers.editing.delta import MatrixDelta
from workers.editing.hsic import bottleneck_scores, nhsic
from workers.editing.loki import LokiConfig
from workers.editing.nullspace import (
    Projector,
    energy_basis,
    orthonormal_extend,
    weight_input_basis,
)
from workers.editing.requests import EditRequest


def test_nhsic_separates_dependent_from_independent() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(120, 8, generator=gen)
    dependent = torch.tanh(x @ torch.randn(8, 6, generator=gen))
    independent = torch.randn(120, 6, generator=gen)
    dep, ind = nhsic(x, dependent), nhsic(x, independent)
    assert dep > 3 * ind
    assert ind >= 0


def test_nhsic_is_symmetric_and_needs_matching_samples() -> None:
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(40, 5, generator=gen), torch.randn(40, 3, generator=gen)
    assert nhsic(a, b) == pytest.approx(nhsic(b, a), rel=1e-6)
    with pytest.raises(ValueError, match="sample counts"):
        nhsic(a, b[:30])


def test_bottleneck_prefers_output_relevant_compressed_layer() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(100, 10, generator=gen)
    y = torch.sin(x[:, :2].sum(dim=1, keepdim=True)) + 0.01 * torch.randn(100, 1, generator=gen)
    sufficient = x[:, :2].sum(dim=1, keepdim=True)  # exactly what y needs, nothing more
    relevant = x[:, :2]
    copy = x.clone()  # keeps everything of the input
    noise = torch.randn(100, 10, generator=gen)
    scores = bottleneck_scores(x, {0: sufficient, 1: relevant, 2: copy, 3: noise}, y)
    assert max(scores, key=scores.__getitem__) == 0
    assert scores[1] > scores[2]


def test_projector_is_idempotent_and_annihilates_protected_keys() -> None:
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(16, 48, generator=gen)
    keys = torch.randn(5, 48, generator=gen)
    q = orthonormal_extend(weight_input_basis(weight, 0.0), keys, 1e-6)
    assert q.shape == (48, 21)
    assert torch.allclose(q.T @ q, torch.eye(21), atol=1e-5)
    proj = Projector(q)
    p = proj.matrix()
    assert torch.allclose(p @ p, p, atol=1e-5)
    assert proj.apply(keys).abs().max() < 1e-4
    assert proj.apply(weight).abs().max() < 1e-4
    free = torch.randn(3, 48, generator=gen)
    assert 0.2 < proj.ratio(free) < 1.0


def test_ridge_update_equals_the_dense_alphaedit_solve_and_stays_in_the_null_space() -> None:
    gen = torch.Generator().manual_seed(6)
    d = 40
    q = orthonormal_extend(None, torch.randn(12, d, generator=gen, dtype=torch.float64), 1e-9)
    proj = Projector(torch.linalg.qr(q.double()).Q)  # orthonormal to fp64 precision
    keys = torch.randn(d, 2, generator=gen, dtype=torch.float64)
    share = torch.randn(7, 2, generator=gen, dtype=torch.float64)
    past = torch.randn(9, d, generator=gen, dtype=torch.float64)
    a, b = proj.ridge_update(keys, share, past, 10.0)
    fast = a @ b
    dense = alphaedit_update(keys, share, proj.matrix(), past, 10.0)
    assert torch.allclose(fast, dense[0] @ dense[1], atol=1e-10)
    assert torch.allclose(fast @ proj.matrix(), fast, atol=1e-10)
    many = torch.randn(3 * d, d, generator=gen, dtype=torch.float64)  # more keys than dims
    a2, b2 = proj.ridge_update(keys, share, many, 10.0)
    dense2 = alphaedit_update(keys, share, proj.matrix(), many, 10.0)
    assert torch.allclose(a2 @ b2, dense2[0] @ dense2[1], atol=1e-10)
    # fp32 keys of realistic size (‖k‖ ≈ 50) keep fp32 accuracy: no cancellation
    a3, b3 = Projector(q.float()).ridge_update(
        50 * keys.float(), share.float(), 50 * past.float(), 1.0
    )
    exact = alphaedit_update(50 * keys, share, proj.matrix(), 50 * past, 1.0)
    rel = (a3.double() @ b3.double() - exact[0] @ exact[1]).norm() / (exact[0] @ exact[1]).norm()
    assert rel < 1e-4
    with_no_past = proj.ridge_update(keys, share, past[:0], 10.0)
    assert not torch.allclose(with_no_past[0] @ with_no_past[1], fast, atol=1e-3)


def test_ridge_update_with_a_prior_solves_the_regularised_normal_equations() -> None:
    gen = torch.Generator().manual_seed(7)
    d = 30
    q = torch.linalg.qr(torch.randn(d, 8, generator=gen, dtype=torch.float64)).Q
    proj = Projector(q)
    p = proj.matrix()
    keys = torch.randn(d, 1, generator=gen, dtype=torch.float64)
    share = torch.randn(5, 1, generator=gen, dtype=torch.float64)
    past = torch.randn(4, d, generator=gen, dtype=torch.float64)
    half = torch.randn(d, d, generator=gen, dtype=torch.float64)
    prior = half @ half.T
    _, b = proj.ridge_update(keys, share, past, 3.0, prior)
    gram = keys @ keys.T + past.T @ past + prior
    expected = torch.linalg.solve(p @ gram @ p + 3.0 * torch.eye(d, dtype=torch.float64), p @ keys)
    assert torch.allclose(b, expected.T, atol=1e-10)
    assert torch.allclose(b @ p, b, atol=1e-10)  # the change still acts only on editable keys
    plain = proj.ridge_update(keys, share, past, 3.0)[1]
    # the prior shrinks the change along the directions it weighs
    assert float((b @ half).norm()) < float((plain @ half).norm())

    # an editor keeps P₀·prior·P₀ for its fixed weight basis (Q's first 5 columns) and corrects
    # it for the rest of Q per solve: the same P·prior·P, the same change
    inner = Projector(q[:, :5])
    kept = inner.apply(inner.apply(prior).T)
    assert torch.allclose(proj.sandwich(kept, 5), p @ prior @ p, atol=1e-9)
    assert torch.equal(proj.sandwich(kept, 8), kept)  # nothing beyond the basis: as kept
    _, b2 = proj.ridge_update(
        keys, share, past, 3.0, proj.sandwich(kept, 5), prior_is_projected=True
    )
    assert torch.allclose(b2, b, atol=1e-9)


def test_exact_ridge_update_delivers_the_whole_share_in_the_same_directions() -> None:
    gen = torch.Generator().manual_seed(9)
    d = 30
    proj = Projector(torch.linalg.qr(torch.randn(d, 8, generator=gen, dtype=torch.float64)).Q)
    keys = torch.randn(d, 2, generator=gen, dtype=torch.float64)
    share = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    past = torch.randn(4, d, generator=gen, dtype=torch.float64)
    ridge_a, ridge_b = proj.ridge_update(keys, share, past, 10.0)
    exact_a, exact_b = proj.ridge_update(keys, share, past, 10.0, exact=True)
    assert not torch.allclose(ridge_a @ ridge_b @ keys, share, atol=1e-3)  # the ridge shrinks
    assert torch.allclose(exact_a @ exact_b @ keys, share, atol=1e-10)
    assert torch.allclose(exact_b, ridge_b)  # same input directions: still in the null space
    assert torch.allclose(exact_a @ exact_b @ proj.matrix(), exact_a @ exact_b, atol=1e-10)
    twice = torch.cat([keys[:, :1], keys[:, :1]], dim=1)  # one key asked for two values
    a, b = proj.ridge_update(twice, share, past, 10.0, exact=True)
    assert torch.isfinite(a @ b).all()
    assert torch.allclose(a @ b @ twice[:, :1], share.mean(dim=1, keepdim=True), atol=1e-8)


def test_energy_basis_keeps_the_directions_holding_the_asked_share() -> None:
    basis = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(8))).Q
    moment = basis @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.3, 0.2])) @ basis.T
    top = energy_basis(moment, 0.85)  # 5 + 3 = 80% < 85% <= 90%: three directions
    assert top.shape == (6, 3)
    assert torch.allclose((top @ top.T) @ basis[:, :3], basis[:, :3], atol=1e-5)


def test_orthonormal_extend_skips_directions_already_protected() -> None:
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(3, 32, generator=gen)
    basis = orthonormal_extend(None, keys, 1e-6)
    again = orthonormal_extend(basis, keys * 2.0, 1e-6)
    assert again.shape[1] == basis.shape[1] == 3


def test_low_rank_factors_reproduce_the_dense_change() -> None:
    gen = torch.Generator().manual_seed(5)
    dense = torch.randn(20, 4, generator=gen) @ torch.randn(4, 30, generator=gen)
    delta = MatrixDelta.from_dense("w", dense)
    assert delta.rank == 4
    assert torch.allclose(delta.to_dense(), dense, atol=1e-4)
    assert delta.norm() == pytest.approx(float(dense.norm()), rel=1e-4)
    restored = MatrixDelta.from_tensors(delta.tensors())[0]
    assert torch.allclose(restored.to_dense(), dense, atol=1e-4)
    weight = torch.zeros(20, 30)
    delta.apply_to(weight)
    delta.apply_to(weight, sign=-1.0)
    assert weight.abs().max() < 1e-4


def test_full_rank_change_stays_dense() -> None:
    dense = torch.randn(6, 6, generator=torch.Generator().manual_seed(6))
    assert MatrixDelta.from_dense("w", dense).dense is not None


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (LokiConfig(candidate_layers=(3, 40)), "candidate_layers"),
        (LokiConfig(candidate_layers=(-1,)), "candidate_layers"),
        (LokiConfig(candidate_layers=()), "candidate_layers"),
        (LokiConfig(candidate_layers=(2, 3), top_k=3), "top_k"),
        (LokiConfig(l2=0.0), "l2"),
        (LokiConfig(refine_lr=-1.0), "refine_lr"),
        (LokiConfig(capacity_weight=-0.5), "capacity_weight"),
        (LokiConfig(refine_steps=-1), "refine_steps"),
        (LokiConfig(self_text_energy=1.0), "self_text_energy"),
        (LokiConfig(self_text_weight=-1.0), "self_text_weight"),
        (LokiConfig(self_text_weight=float("nan")), "self_text_weight"),
        (LokiConfig(self_text_weight=1.0, self_text_tokens=3), "self_text_tokens"),
        (LokiConfig(self_text_style="wiki"), "self_text_style"),
        (LokiConfig(trim_min_prob=1.0), "trim_min_prob"),
        (LokiConfig(trim_min_prob=float("nan")), "trim_min_prob"),
        (LokiConfig(trim_min_prob=0.5, trim_steps=0), "trim_steps"),
        (LokiConfig(trim_min_margin=-1.0), "trim_min_margin"),
        (LokiConfig(trim_min_margin=float("nan")), "trim_min_margin"),
        (LokiConfig(retry_refine_steps=-1), "retry_refine_steps"),
        (LokiConfig(retry_refine_lr=0.0), "retry_refine_lr"),
        (LokiConfig(retry_clamp_norm_factor=float("nan")), "retry_clamp_norm_factor"),
        (LokiConfig(spread_decay=0.0), "spread_decay"),
        (LokiConfig(spread_decay=1.5), "spread_decay"),
        (LokiConfig(spread_decay=float("nan")), "spread_decay"),
        (LokiConfig(key_contexts=0), "key_contexts"),
        (LokiConfig(consolidate_every=-1), "consolidate_every"),
    ],
)
def test_config_refuses_bad_values(config: LokiConfig, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        config.resolve_layers(30)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (LokiConfig(reserve_layers=(4,)), "already a candidate"),
        (LokiConfig(reserve_layers=(30,)), "reserve_layers"),
        (LokiConfig(reserve_layers=None, reserve_from=-1.0), "reserve_from"),
    ],
)
def test_config_refuses_bad_reserves(config: LokiConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config.resolve_reserve(30)


def test_default_reserves_flank_the_candidates() -> None:
    assert LokiConfig(reserve_layers=None).resolve_reserve(30) == (1, 2, 7, 8)
    assert LokiConfig(reserve_layers=None, top_k=1).resolve_reserve(4) == (2,)


def test_default_layers_lie_in_the_early_middle() -> None:
    layers = LokiConfig().resolve_layers(30)
    assert layers[0] >= 1 and layers[-1] < 15


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (
            {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": ""},
            "target_new",
        ),
        (
            {"prompt": "The Eiffel Tower is in", "subject": "Eiffel Tower", "target_new": "  "},
            "target_new",
        ),
        ({"prompt": "The tower is in", "subject": "Eiffel Tower", "target_new": "Rome"}, "prompt"),
        ({"prompt": "{} is in", "subject": "", "target_new": "Rome"}, "subject"),
        ({"prompt": "{} is in", "subject": "Eiffel Tower"}, "target_new"),
        ({"prompt": "{} is in", "subject": "X", "target_new": "Rome", "colour": "red"}, "colour"),
        ({"prompt": 5, "subject": "X", "target_new": "Rome"}, "prompt"),
        (
            {"prompt": "{} is in", "subject": "X", "target_new": "Rome", "ground_truth": "Rome"},
            "target_new",
        ),
    ],
)
def test_bad_requests_name_the_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        EditRequest.from_dict(data)


def test_request_placeholder_and_literal_forms_agree() -> None:
    a = EditRequest.from_dict(
        {"prompt": "{} is located in", "subject": "Rome", "target_new": "Italy"}
    )
    b = EditRequest.from_dict(
        {"prompt": "Rome is located in", "subject": "Rome", "target_new": "Italy"}
    )
    assert a.text == b.text == "Rome is located in"
    assert a.template == b.template == "{} is located in"
    assert a.target == " Italy"


def test_consolidation_keeps_every_edit_key_and_spends_less() -> None:
    torch.manual_seed(0)
    d_in, d_out, n = 40, 12, 6
    q = torch.linalg.qr(torch.randn(d_in, 5)).Q
    projector = Projector(q.double())
    keys = torch.randn(n, d_in)
    # what sequential edits leave: a sum of rank-1 changes in the null space, each reading its
    # own key plus whatever else its solve picked
    drift = sum(
        torch.randn(d_out, 1, dtype=torch.float64)
        @ projector.apply((keys[i] + torch.randn(d_in)).double()[None])
        for i in range(n)
    ).float()
    out = least_energy_drift(drift, keys, projector, l2=1.0)
    assert torch.allclose(out @ keys.T, drift @ keys.T, atol=1e-4)
    assert (out @ q).abs().max() < 1e-5  # still in the null space
    assert out.norm() < 0.9 * drift.norm()
    assert torch.allclose(least_energy_drift(out, keys, projector, l2=1.0), out, atol=1e-4)

    b = torch.randn(d_in, d_in, dtype=torch.float64)
    prior = projector.apply(projector.apply(b @ b.T).T)

    def energy(x: torch.Tensor) -> float:
        x = x.double()
        return float(torch.trace(x @ prior @ x.T) + x.pow(2).sum())

    weighted = least_energy_drift(drift, keys, projector, l2=1.0, prior=prior)
    assert torch.allclose(weighted @ keys.T, drift @ keys.T, atol=1e-4)
    assert energy(weighted) <= energy(out) + 1e-6
    assert energy(weighted) < energy(drift)
    assert not least_energy_drift(drift, keys[:0], projector, l2=1.0).any()
    with pytest.raises(ValueError, match="keys"):
        least_energy_drift(drift, keys[:, :5], projector, l2=1.0)
