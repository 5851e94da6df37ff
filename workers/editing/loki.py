"""LOKI: lifelong knowledge editing with per-edit layer selection and null-space-projected updates.

Per edit (DESIGN §3, with the changes measured in docs/loki-log.md, cited below as loki-log.md):
1. observations: the edit prompt in several model-generated contexts (+ given rephrasings);
2. layer selection: the top-k candidate layers by the HSIC bottleneck score;
3. the target: gradient descent on a residual-stream vector at the subject's last token after the
   deepest chosen layer (target NLL + KL + decay), giving the value v* the edit must produce;
4. the update: per chosen layer, lowest first, the minimum-norm change that maps the subject keys
   to their share of v*, restricted to the null space P of what must not move — W₀'s dominant
   input directions (read off the weights, no corpus) and this edit's own context-token keys —
   and regularised against the keys of every earlier edit (soft, so capacity never runs out):
       ΔW = R Kᵀ P ((K_p K_pᵀ + K Kᵀ) P + α I)⁻¹
   with R rescaled so that ΔW K = R (``exact_fit``: the ridge picks the directions, not how
   much arrives). The change is exactly rank ≤ requests and ΔW·P = ΔW;
5. MPES: if the target is not yet top-1 on every observation, projected gradient steps on the
   change's output factor (its input directions stay in the null space), stopping a couple of
   steps after success; Frobenius bounds cap the per-edit and cumulative change;
6. bookkeeping: the subject keys of this edit, read on the edited model, join the past keys.

An earlier version optimised ΔW = D·Uᵀ with Adam from zero. Adam moves every entry of D by about
the learning rate per step, so each edit cost 5–7% of ‖W₀‖ and the cumulative bound was spent by
edit ~70 of 200 (efficacy 0.65 at 200 edits). The closed form spends only the norm the value
change needs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing import arch
from workers.editing.batch import build_batch, encode
from workers.editing.consolidate import least_energy_drift
from workers.editing.contexts import context_templates
from workers.editing.delta import MatrixDelta
from workers.editing.editor import Editor
from workers.editing.grid_search import smallest_passing
from workers.editing.hooks import applied, frozen, logits_at, read_inputs
from workers.editing.hsic import DEFAULT_EPS, bottleneck_scores
from workers.editing.keys import contextual_prompts, read_at_subject
from workers.editing.nullspace import (
    Projector,
    energy_basis,
    orthonormal_extend,
    weight_input_basis,
)
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult, LayerScore
from workers.editing.selftext import OPENINGS, check_style
from workers.editing.sensitivity import residual_fisher
from workers.editing.spread import spread_over_layers
from workers.editing.stats import key_second_moments
from workers.editing.target_value import KL_TEMPLATE, TargetValueConfig, optimise_target_values
from workers.editing.targets import Rivals, TargetIndex, TargetProbe
from workers.editing.validation import check_count, check_positive, check_unit_fraction

_STATE_KEY = re.compile(r"^keys\.(\d+)$")


@dataclass
class LokiConfig:
    # None = layers in [10%, 20%] of depth (3–6 of SmolLM2's 30): the early-middle MLPs hold the
    # facts (DESIGN §3: layers 4–6 edit far better than 8–10), and a complete edit costs more
    # perplexity the deeper it is made (python -m bench.layer_cost, 10 edits each: +0.003 at
    # layer 3, +0.008–0.012 at 4–6, +0.021 at 7, +0.028 at 8). With layers 3–8 perplexity rose
    # 1.10× over 200 CounterFact edits; with 3–6, 1.08× (exact fit) or 1.03× (ridge fit).
    candidate_layers: tuple[int, ...] | None = None
    top_k: int = 3
    hsic_eps: float = DEFAULT_EPS
    # A layer's HSIC score is lowered by this times its cumulative change ‖W − W₀‖/‖W₀‖. HSIC
    # alone picked layer 8 for nearly every edit and spent its budget by edit ~70; the penalty
    # hands later edits to layers that have moved less. 4 moves edits from layer 6 to 3 without
    # lowering perplexity (docs/loki-log.md, "A heavier capacity term").
    capacity_weight: float = 2.0
    # Layers an edit may use only once the candidates have filled up: they join the ranking when
    # every candidate has drifted reserve_from·max_relative_change. None = the two layers either
    # side of the default range (1–2 and 7–8 on SmolLM2), () = none. Off: over 1,000 edits
    # (docs/bench/loki-1000-reserve) the reserves opened at edit ~500 and took most edits at
    # once, and perplexity reached 7.8× unedited against 2.4× without them; layers 1, 2, 7 and
    # 8 cost 2–9× more per edit than layer 3 (loki-log.md, "Where an edit is cheapest"). (A fixed
    # score handicap does not work either: layer 2's HSIC score sits ~0.7 above layers 3–6.)
    reserve_layers: tuple[int, ...] | None = ()
    reserve_from: float = 0.6
    # W₀'s input directions with σ ≥ this·σ_max are protected: 32–48 of SmolLM2's 576 at
    # layers 3–6. At 0.05 (575–576: the whole row space) the protected space held subject and
    # ordinary keys alike (python -m bench.keyspace: selectivity ~1.0), so it only took edit
    # room: each edit spent ~60% more weight energy for the same value.
    weight_rel_threshold: float = 0.5
    context_rel_tol: float = 0.05  # a context-token key direction is protected if this strong
    # Keys of text the model samples itself (workers/editing/selftext.py): W₀'s row space alone
    # leaves ~60% of ordinary prose's key energy editable, so perplexity drifted 1.20× over 200
    # edits. self_text_energy > 0 adds to the hard null space the top directions of E[kkᵀ] on
    # that text covering this share of its energy; self_text_weight > 0 instead adds λ·E[kkᵀ]
    # to the ridge (soft, MEMIT-style: ordinary outputs move as little as the edit allows).
    # λ = 300 puts the prior's mean eigenvalue at 0.3–0.6 of α on SmolLM2; at 3000 it
    # outweighed the past edits' keys and bought nothing. With weight_rel_threshold 0.5
    # (loki-log.md, "A lighter self-text prior"), 200 CounterFact edits, records 0–199 / 5000–5199 /
    # 2000–2199: perplexity 1.08× / 1.09× / 1.08× → 1.04× / 1.06× / 1.05×, held-out text
    # 1.16× / 1.16× / 1.19× → 1.10× / 1.10× / 1.09×, edit-metric mean 0.850 / 0.853 / 0.850 →
    # 0.852 / 0.842 / 0.843, fluency 1.00× / 0.99× / 0.99× → 0.97× / 0.97× / 0.98×; 1,000
    # edits: efficacy 0.908 → 0.937, perplexity 2.41× → 1.84×, fluency 0.75× → 0.84×,
    # per-edit success 0.84 → 0.96. The sampled text's statistics are cached under var/stats
    # (its cost per style below).
    self_text_tokens: int = 8192
    self_text_energy: float = 0.0
    self_text_weight: float = 300.0
    # "openings": the model continues generic openings; "articles": it writes short encyclopedia
    # articles when asked through its chat template, text nearer ordinary prose (selftext.py).
    # Articles with self_text_tokens=8192 against openings with 4096 (the default before
    # session 21), 200 CounterFact edits on records 0/2000/5000/7000/9000 (loki-log.md, "The model's
    # own articles"): perplexity 1.039× / 1.059× / 1.053× / 1.048× / 1.047× against 1.039× /
    # 1.070× / 1.068× / 1.044× / 1.054×, held-out text lower on all five, edit-metric mean
    # −0.002 (−0.009 to +0.005) over the 1,000 records; 1,000 edits on records 0–999: 0.953 /
    # 0.852 / 0.624, perplexity 1.85× and held-out 2.23× against 0.947 / 0.864 / 0.603, 2.04×
    # and 2.60×. Sampling costs ~75 s once per model on two CPU cores against ~35 s.
    # A tokenizer without a chat template falls back to the openings (resolve_style).
    self_text_style: str = "articles"
    l2: float = 10.0  # α: ridge of the projected solve
    # True: each layer delivers its whole share of v* (ΔW K = R); the ridge then only picks the
    # input directions. False: the ridge also shrinks how much is delivered, and the layers above
    # and MPES make up what the target still needs. 200 CounterFact edits, layers 3–6: exact
    # 0.995/0.90/0.68, perplexity 1.08×, fluency 1.00×; ridge 0.985/0.855/0.665, 1.03×, 0.96×.
    # Exact is the default because it keeps generalisation; ridge is the low-perplexity setting.
    exact_fit: bool = True
    # How v* is split over the chosen layers, lowest first: layer i weighs spread_decayⁱ and
    # takes its part of what is still missing (1: MEMIT's equal shares). What a lower layer
    # writes reaches v*'s layer attenuated, so with equal shares the deepest layer carries the
    # most (median output 25 / 29 / 35 / 43 at layers 3–6 over 200 edits), and a complete edit
    # costs layer 3 a third of what it costs layers 4–6 (loki-log.md, "Where an edit is cheapest").
    # Yet at 0.5 the lower layers must write so much more (Σ‖ΔW‖² +43% over 200 edits) that
    # they drift fast and the capacity term hands nearly every edit to layers 5–6: records
    # 2000–2199 / 5000–5199, perplexity 1.070× / 1.068× → 1.060× / 1.060×, but held-out text
    # 1.107× / 1.096× → 1.160× / 1.141× and the edit-metric mean −0.012 / −0.018. Off (1).
    spread_decay: float = 1.0
    # v*: the residual value the edit must produce (contexts are shared with layer selection).
    # Fewer, shorter contexts than MEMIT's 6×10 tokens: v*'s forward/backward passes are most of
    # an edit's time. Smaller (‖δ‖ ≤ 0.5‖h‖, not 0.75) and stopped once the target's NLL is
    # below 0.2: with MEMIT's loss-only stop δ grew to the clamp on every edit (the KL term
    # keeps the loss up), and every extra unit of ‖δ‖ is weight change that leaks into other
    # text. 50 CounterFact edits: perplexity 20.56 → 20.23 (unedited 20.01), specificity 0.76 →
    # 0.78, efficacy 1.00 → 0.98; 200 edits: perplexity 1.20× → 1.09×, generalisation 0.90 →
    # 0.875. MPES catches what v* leaves. With the key-space solve and the upper-blocks-only
    # forward, the median edit went 10.3 → 4.3 s (bench.edit_phases, 2 idle threads). Four
    # contexts, not five: median edit 3.55 → 2.75 s; 200 edits 0.96/0.875/0.665 → 0.97/0.89/
    # 0.705, perplexity 1.09× → 1.10×, fluency 1.01× → 0.96× (docs/bench/loki-200-ctx4).
    target: TargetValueConfig = field(
        default_factory=lambda: TargetValueConfig(
            steps=20,
            lr=2.0,
            n_contexts=4,
            context_length=8,
            clamp_norm_factor=0.5,
            loss_stop=0.1,
            nll_stop=0.2,
        )
    )
    refine_steps: int = 10  # MPES: most projected gradient steps after the closed form
    refine_lr: float = 0.05
    extra_steps: int = 0  # MPES: keep going this many steps after the target is top-1
    # Trim: once the edit has taken, shrink every layer's change by one common factor, as far as
    # the target stays top-1 in every trim context with mean token probability ≥ trim_min_prob
    # (the smallest of 2^trim_steps scales that does, bisection's answer in fewer forwards:
    # workers/editing/grid_search.py). v* asks for NLL < 0.2 and its search ends at the clamp,
    # so an edit delivers more than the edit prompt needs, and the drift grows faster than the
    # change (the accumulated change scaled by 0.75 cost a third of the perplexity,
    # docs/bench/drift-200). What the trim takes away is the margin paraphrases need: 200
    # CounterFact edits (records 0–199, loki-log.md, "Trim"), eff / gen / spec, perplexity, fluency:
    # off 0.98 / 0.905 / 0.665, 1.08×, 1.00×; 0.85 the same; 0.7 0.98 / 0.87 / 0.65, 1.05×,
    # 1.04×; 0.6 with 8 contexts 0.98 / 0.875 / 0.69, 1.07×, 0.97×; 0.5 0.975 / 0.83 / 0.685,
    # 1.04×, 0.99×; 0.3 no lower, fluency 0.95×. Off by default: at 0.5 the Eiffel Tower edit no
    # longer answers "Where is the Eiffel Tower? The Eiffel Tower is located in the city of"
    # (the paraphrase needs 0.84 of the change, the trim keeps 0.72). 0.5 is the low-perplexity
    # setting.
    trim_min_prob: float = 0.0
    # ...and with the target's mean token log-probability at least this far (nats) above the
    # old answer's (the request's ground_truth, else what the model said there before the
    # edit), both read as one token: the old answer's where the two first differ. A proxy for
    # what the evaluation compares (target against truth, mean over all tokens), which a
    # probability floor does not look at. 200 CounterFact edits with a lead of 4 in 8 contexts
    # (loki-log.md, "Trim"): records 0–199 0.985 / 0.865 / 0.685, perplexity 1.047×, fluency 1.00×;
    # records 5000–5199 0.985 / 0.87 / 0.695, 1.07×, 0.95× (trim off: 1.09×, 0.99×). Over the
    # present null space and prior (loki-log.md, "The lead trim on top of the new default"):
    # perplexity 1.042× / 1.047× / 1.041× on records 0–199 / 5000–5199 / 2000–2199, mean kept,
    # but fluency 0.966× on records 0–199 (100 prompts). Off by default: that fluency, its
    # ~1 s per edit, and no 1,000-edit run with it yet.
    trim_min_margin: float = 0.0
    trim_steps: int = 5
    # contexts the trim keeps the margin in: v*'s own, then more prefixes generated the same way
    # (forward passes only, so more of them cost little)
    trim_contexts: int = 4
    # contexts the subject key is averaged over (the update's input direction, and the past keys
    # later edits are kept off): v*'s own, then more prefixes generated the same way. Forward
    # passes only, so more of them cost little; None: v*'s n_contexts. 12 on 200 CounterFact
    # edits (loki-log.md, "Session 18"): no difference beyond run-to-run noise, so off.
    key_contexts: int | None = None
    # A second attempt for an edit that did not take (target not top-1 in every context), with
    # v* as large as MEMIT and AlphaEdit make it (‖δ‖ ≤ retry_clamp_norm_factor·‖h‖, no NLL
    # stop) and up to retry_refine_steps MPES steps at retry_refine_lr. The edits that fail
    # are hard ones, not unlucky ones: 10 of the 15 that LOKI rejected on CounterFact records
    # 0–199 and 2000–2199 also fail on the unedited model, and the retry takes 13 of those 15
    # there (loki-log.md, "A second attempt"). 200 edits, records 0–199 / 2000–2199: rejected 7 / 8
    # → 2 / 1, efficacy 0.98 / 0.975 → 1.00 / 1.00, edit-metric mean 0.860 / 0.857 → 0.868 /
    # 0.860, perplexity 1.040× / 1.057× → 1.043× / 1.065×; 6–7 edits of 200 retried. The
    # rescued edits are large: over 1,000 edits efficacy 0.937 → 0.947 but specificity 0.636
    # → 0.603 and perplexity 1.84× → 2.04×.
    retry: bool = True
    retry_clamp_norm_factor: float = 0.75
    retry_refine_steps: int = 30
    retry_refine_lr: float = 0.1
    # 3 left more edits untaken for no perplexity gain (loki-log.md, "A heavier KL term in MPES")
    kl_weight: float = 1.0
    edit_norm: float = 0.1  # per-edit ‖ΔW‖ ≤ edit_norm · ‖W₀‖
    # cumulative ‖W − W₀‖ ≤ this · ‖W₀‖. The drift grows like √edits: at 0.5 the most used
    # layer was full by edit ~400 of the 1,000-edit run and per-edit success fell to 0.55 by
    # edit 600 (loki-log.md, "The first 1,000-edit run"); the service's edit guard still
    # refuses any single edit that costs too much perplexity.
    max_relative_change: float = 1.0
    # Every this many applied edits (0: never), the edit that completes the count also replaces
    # each layer's whole drift W − W₀ by the change of least energy (α‖D‖² + the self-text
    # prior, in the weight null space) that gives every edit key so far the output the drift
    # gives it now (workers/editing/consolidate.py). Sequential solves each spend the least for
    # their own edit, blind to later ones; their sum spends more than the edits need together.
    # Off: every 25 edits over 200 CounterFact edits on records 2000/3000/5000/8000 (loki-log.md,
    # "Consolidation"), the drift is 2.5–3% smaller and held-out perplexity lower on all four
    # (1.100× / 1.095× / 1.081× / 1.116× → 1.091× / 1.093× / 1.072× / 1.106×), but perplexity on
    # the fixed text moves both ways (1.059× / 1.054× / 1.053× / 1.055× → 1.040× / 1.072× /
    # 1.060× / 1.051×), fluency too, and the edit-metric mean is −0.004 (−0.012 to +0.004).
    consolidate_every: int = 0
    seed: int = 0

    def escalated(self) -> LokiConfig:
        """The settings of the second attempt (``retry``)."""
        return dataclasses.replace(
            self,
            retry=False,
            refine_steps=self.retry_refine_steps,
            refine_lr=self.retry_refine_lr,
            target=dataclasses.replace(
                self.target, clamp_norm_factor=self.retry_clamp_norm_factor, nll_stop=0.0
            ),
        )

    @property
    def trims(self) -> bool:
        return self.trim_min_prob > 0 or self.trim_min_margin > 0

    @property
    def uses_self_text(self) -> bool:
        return self.self_text_energy > 0 or self.self_text_weight > 0

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """Validate against the model and return the candidate layers."""
        layers = self.candidate_layers
        if layers is None:
            lo, hi = max(1, round(0.1 * num_layers)), max(2, round(0.2 * num_layers) + 1)
            layers = tuple(range(lo, hi))
        if not layers:
            raise ValueError("candidate_layers: must not be empty")
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"candidate_layers: {layer!r} outside 0..{num_layers - 1}")
        if not 1 <= self.top_k <= len(layers):
            raise ValueError(f"top_k: must be in 1..{len(layers)}, got {self.top_k}")
        if self.capacity_weight < 0:
            raise ValueError("capacity_weight: must not be negative")
        if self.consolidate_every < 0:
            raise ValueError(
                f"consolidate_every: must be ≥ 0 (0 = never), got {self.consolidate_every}"
            )
        for name in ("l2", "refine_lr", "edit_norm", "max_relative_change", "weight_rel_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")
        check_positive("self_text_energy", self.self_text_energy, allow_zero=True)
        if not self.self_text_energy < 1:
            raise ValueError(f"self_text_energy: must be in [0, 1), got {self.self_text_energy}")
        check_positive("self_text_weight", self.self_text_weight, allow_zero=True)
        check_style(self.self_text_style)
        check_count("self_text_tokens", self.self_text_tokens, minimum=len(OPENINGS))
        if self.refine_steps < 0 or self.extra_steps < 0:
            raise ValueError("refine_steps, extra_steps: must not be negative")
        if self.retry_refine_steps < 0:
            raise ValueError(f"retry_refine_steps: must be ≥ 0, got {self.retry_refine_steps}")
        check_positive("retry_refine_lr", self.retry_refine_lr)
        check_unit_fraction("spread_decay", self.spread_decay)
        check_positive("retry_clamp_norm_factor", self.retry_clamp_norm_factor)
        if not 0 <= self.trim_min_prob < 1:
            raise ValueError(f"trim_min_prob: must be in [0, 1), got {self.trim_min_prob}")
        check_positive("trim_min_margin", self.trim_min_margin, allow_zero=True)
        if math.isinf(self.trim_min_margin):
            raise ValueError("trim_min_margin: must be finite")
        check_count("trim_steps", self.trim_steps)
        check_count("trim_contexts", self.trim_contexts)
        if self.key_contexts is not None:
            check_count("key_contexts", self.key_contexts)
        if not isinstance(self.target, TargetValueConfig):
            raise ValueError("target: must be a TargetValueConfig")
        return tuple(sorted(set(layers)))

    def resolve_reserve(self, num_layers: int) -> tuple[int, ...]:
        """Validate against the model and return the reserve layers (none of the candidates)."""
        home = self.resolve_layers(num_layers)
        reserve = self.reserve_layers
        if reserve is None:
            width = max(1, round(0.05 * num_layers))
            below = range(max(1, home[0] - width), home[0])
            above = range(home[-1] + 1, min(num_layers, home[-1] + 1 + width))
            reserve = (*below, *above)
        for layer in reserve:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"reserve_layers: {layer!r} outside 0..{num_layers - 1}")
            if layer in home:
                raise ValueError(f"reserve_layers: {layer} is already a candidate layer")
        check_positive("reserve_from", self.reserve_from, allow_zero=True)
        return tuple(sorted(set(reserve)))


@dataclass
class _Selection:
    """What both attempts at an edit share: the contexts, every candidate's HSIC score, the
    chosen layers with their context-token keys, and each chosen layer's drift W − W₀."""

    contexts: list[str]
    scores: dict[int, float]
    chosen: list[int]
    context_keys: dict[int, torch.Tensor]
    drift: dict[int, torch.Tensor]


class LokiEditor(Editor):
    method = "loki"

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: LokiConfig | None = None,
    ) -> None:
        super().__init__(model, tokenizer)
        self.config = config or LokiConfig()
        self.reserve = self.config.resolve_reserve(arch.num_layers(model))
        # every layer an edit may change: the candidates and the reserves
        self.layers = tuple(
            sorted(self.config.resolve_layers(arch.num_layers(model)) + self.reserve)
        )
        self.modules = {layer: arch.down_proj(model, layer) for layer in self.layers}
        self.names = {layer: arch.down_proj_name(model, layer) for layer in self.layers}
        # W₀ of every candidate, so ‖W − W₀‖ is known whatever version is loaded later:
        # construct the editor on the base weights.
        self.base = {layer: m.weight.detach().float().clone() for layer, m in self.modules.items()}
        self.base_norm = {layer: float(w.norm()) for layer, w in self.base.items()}
        self._weight_basis: dict[int, torch.Tensor] = {}  # layer → W₀'s protected inputs
        self._projected_prior: dict[int, torch.Tensor] = {}  # layer → λ·P_w E[kkᵀ] P_w
        # layer → E[kkᵀ] on self-sampled text, read now while the weights are W₀ (cached on disk)
        self.self_text_moments = (
            key_second_moments(
                model,
                tokenizer,
                self.layers,
                max_tokens=self.config.self_text_tokens,
                source="self",
                style=self.config.self_text_style,
            )
            if self.config.uses_self_text
            else {}
        )
        # layer → F̂ of self-sampled text at the block's output, for v*'s sensitivity penalty
        self.sensitivity = (
            residual_fisher(model, tokenizer, self.layers)
            if self.config.target.sensitivity_weight > 0
            else {}
        )
        self.past_keys = {
            layer: torch.zeros(0, m.in_features) for layer, m in self.modules.items()
        }  # layer → (n_past, d_ff): subject keys of every applied edit, on the CPU
        self.n_edits = 0

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        # Only what edits added: W₀'s basis is recomputed from the base weights.
        state = {"n_edits": torch.tensor(self.n_edits)}
        for layer, keys in self.past_keys.items():
            if len(keys):
                state[f"keys.{layer}"] = keys.clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        loaded = {layer: torch.zeros(0, m.in_features) for layer, m in self.modules.items()}
        for name, value in state.items():
            match = _STATE_KEY.match(name)
            if name == "n_edits":
                continue
            if match is None or int(match.group(1)) not in loaded:
                raise ValueError(f"loki state: unexpected key {name!r}")
            layer = int(match.group(1))
            if value.ndim != 2 or value.shape[1] != loaded[layer].shape[1]:
                raise ValueError(
                    f"loki state: {name} must be (n, {loaded[layer].shape[1]}), "
                    f"got {tuple(value.shape)}"
                )
            loaded[layer] = value.detach().float().cpu().clone()
        self.past_keys = loaded
        self.n_edits = int(state.get("n_edits", torch.tensor(0)))

    def cached_keys(self, layer: int) -> int:
        """How many past-edit keys the layer's updates are regularised against."""
        return int(self.past_keys[layer].shape[0])

    def drift(self, layer: int) -> torch.Tensor:
        """W − W₀ of a candidate layer, as loaded now."""
        return self.modules[layer].weight.detach().float() - self.base[layer]

    def relative_drift(self, layer: int, drift: torch.Tensor | None = None) -> float:
        """‖W − W₀‖ / ‖W₀‖ of a candidate layer, as loaded now (or of ``drift``, read already)."""
        drift = self.drift(layer) if drift is None else drift
        return float(drift.norm()) / self.base_norm[layer]

    # --- the edit --------------------------------------------------------------------------
    def contexts(self, n: int | None = None) -> list[str]:
        """The bare prompt and generated prefixes: v*'s ``n_contexts``, or the first ``n``."""
        t = self.config.target
        return context_templates(self.model, self.tokenizer, n or t.n_contexts, t.context_length)

    def key_contexts(self) -> list[str]:
        """The contexts a subject key is averaged over (``key_contexts``)."""
        return self.contexts(self.config.key_contexts)

    def weight_basis(self, layer: int) -> torch.Tensor:
        """What every edit at ``layer`` must leave alone: W₀'s input directions, plus the top
        directions of the self-sampled keys when ``self_text_energy`` is set."""
        if layer not in self._weight_basis:
            basis = weight_input_basis(self.base[layer], self.config.weight_rel_threshold)
            if self.config.self_text_energy > 0:
                top = energy_basis(self.self_text_moments[layer], self.config.self_text_energy)
                top = top.to(basis.device)
                basis = orthonormal_extend(basis, top.T, self.config.context_rel_tol)
            self._weight_basis[layer] = basis.to(self.device)
        return self._weight_basis[layer]

    def projected_prior(self, layer: int) -> torch.Tensor:
        """λ·P_w E[kkᵀ] P_w for the self-text prior, P_w the weight basis' projector: fixed per
        layer, so projected once; each edit only corrects it for its context keys."""
        if layer not in self._projected_prior:
            prior = self.config.self_text_weight * self.self_text_moments[layer].double()
            projector = Projector(self.weight_basis(layer).double().cpu())
            self._projected_prior[layer] = projector.apply(projector.apply(prior).T).to(self.device)
        return self._projected_prior[layer]

    @torch.no_grad()
    def _select_layers(
        self,
        requests: Sequence[EditRequest],
        contexts: Sequence[str],
    ) -> _Selection:
        """HSIC scores of every candidate, the chosen layers, their context-token keys and drift."""
        prompts = contextual_prompts(requests, contexts)
        subjects: list[str | None] = [req.subject for req in requests for _ in contexts]
        for req in requests:
            # a rephrasing may name the subject differently: no subject token to mark then
            prompts += req.rephrase_prompts
            subjects += [req.subject if req.subject in p else None for p in req.rephrase_prompts]
        batch = build_batch(self.tokenizer, prompts, [""] * len(prompts), subjects).to(self.device)
        mask = batch.attention_mask.bool()
        keys: dict[int, torch.Tensor] = {}
        with read_inputs(self.modules, keys):
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
                use_cache=False,
            )
        scores = bottleneck_scores(
            out.hidden_states[0][mask],
            {layer: keys[layer][mask] for layer in self.layers},
            out.hidden_states[-1][mask],
            eps=self.config.hsic_eps,
        )
        cfg = self.config
        drift = {layer: self.drift(layer) for layer in self.layers}
        used = {layer: self.relative_drift(layer, drift[layer]) for layer in self.layers}
        home = [layer for layer in self.layers if layer not in self.reserve]
        open_reserve = (
            min(used[layer] for layer in home) >= cfg.reserve_from * cfg.max_relative_change
        )
        ranked = {
            layer: score - cfg.capacity_weight * used[layer]
            for layer, score in scores.items()
            if open_reserve or layer not in self.reserve
        }
        chosen = sorted(sorted(ranked, key=ranked.__getitem__, reverse=True)[: cfg.top_k])
        # Every token but the subject's last is ordinary text the edit must not change. Without
        # this, "The capital of Japan is the city of" answered "Rome" after the Eiffel Tower
        # edit: the subject key shares "…the city of" directions with every such prompt.
        other = mask.clone()
        marked = [(r, pos) for r, pos in enumerate(batch.subject_last) if pos >= 0]
        if marked:
            rows, cols = zip(*marked, strict=True)
            other[list(rows), list(cols)] = False
        context_keys = {layer: keys[layer][other].float() for layer in chosen}
        return _Selection(
            list(contexts), scores, chosen, context_keys, {layer: drift[layer] for layer in chosen}
        )

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        # what the retry's settings do not change is worked out once for both attempts
        selection = self._select_layers(requests, self.contexts())
        first = self._attempt(requests, self.config, selection)
        if first.success or not self.config.retry:
            return self._consolidate_if_due(requests, first)
        second = self._attempt(requests, self.config.escalated(), selection)
        # if neither took, a caller that applies it anyway gets the change made with the tuned
        # settings, not the one made with the larger v*
        result = second if second.success else first
        result.steps = first.steps + second.steps
        result.attempts = 2
        return self._consolidate_if_due(requests, result)

    def _consolidate_if_due(
        self, requests: Sequence[EditRequest], result: EditResult
    ) -> EditResult:
        """When this edit completes a multiple of ``consolidate_every`` applied edits, its
        changes become dense ones that also replace every layer's drift by its least-energy
        equivalent (workers/editing/consolidate.py), this edit's keys included."""
        every = self.config.consolidate_every
        if not every or (self.n_edits + len(requests)) // every == self.n_edits // every:
            return result
        layer_of = {name: layer for layer, name in self.names.items()}
        edit = {layer_of[d.name]: d for d in result.deltas}
        # this edit's keys as after_apply will read them, on the model with the edit in it
        with applied(self.model, edit):
            readout = read_at_subject(
                self.model, self.tokenizer, requests, self.key_contexts(), self.layers
            )
        deltas = []
        for layer in self.layers:
            before = self.drift(layer)
            drift = before + (edit[layer].to_dense().to(before) if layer in edit else 0)
            keys = torch.cat([self.past_keys[layer].to(before), readout.keys[layer].to(before)])
            projector = Projector(self.weight_basis(layer).double())
            prior = self.projected_prior(layer) if self.config.self_text_weight > 0 else None
            after = least_energy_drift(drift, keys, projector, self.config.l2, prior)
            name = self.names[layer]
            deltas.append(MatrixDelta(name, dense=(after - before).float().cpu()))
            result.delta_norm[name] = float((after - before).norm())
            result.relative_change[name] = float(after.norm()) / self.base_norm[layer]
        result.deltas = deltas
        result.consolidated = True
        return result

    def _attempt(
        self, requests: Sequence[EditRequest], cfg: LokiConfig, selection: _Selection
    ) -> EditResult:
        torch.manual_seed(cfg.seed)
        contexts, scores, chosen = selection.contexts, selection.scores, selection.chosen
        context_keys, drift = selection.context_keys, selection.drift
        values = optimise_target_values(
            self.model,
            self.tokenizer,
            requests,
            chosen[-1],
            contexts,
            cfg.target,
            self.sensitivity.get(chosen[-1]),
        )
        key_ratio: dict[str, float] = {}

        def solve(
            layer: int, keys: torch.Tensor, share: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            q = orthonormal_extend(
                self.weight_basis(layer), context_keys[layer], cfg.context_rel_tol
            )
            projector = Projector(q.double().to(keys.device))
            key_ratio[self.names[layer]] = projector.ratio(keys.T)
            past = self.past_keys[layer].to(keys)
            prior = None
            if cfg.self_text_weight > 0:
                base = self.weight_basis(layer).shape[1]
                prior = projector.sandwich(self.projected_prior(layer).to(keys), base)
            return projector.ridge_update(
                keys, share, past, cfg.l2, prior, exact=cfg.exact_fit, prior_is_projected=True
            )

        deltas = spread_over_layers(
            self.model,
            self.tokenizer,
            requests,
            self.key_contexts(),
            chosen,
            values.z,
            solve,
            decay=cfg.spread_decay,
        )
        for layer, delta in deltas.items():
            self._bound(layer, delta, drift[layer], cfg)
        steps, hits, loss, kept = self._refine(requests, contexts, deltas, drift, cfg)

        delta_norm, rel_change = {}, {}
        for layer, delta in deltas.items():
            name = self.names[layer]
            delta_norm[name] = delta.norm()
            total = drift[layer].cpu() + delta.to_dense().float()
            rel_change[name] = float(total.norm()) / self.base_norm[layer]
        return EditResult(
            method=self.method,
            deltas=list(deltas.values()),
            layers=[LayerScore(layer, scores[layer], layer in chosen) for layer in self.layers],
            key_ratio=key_ratio,
            delta_norm=delta_norm,
            relative_change=rel_change,
            steps=values.steps + steps,
            success=all(hits),
            per_request_success=hits,
            loss=loss if loss is not None else values.loss,
            trim_scale=kept,
        )

    def _refine(
        self,
        requests: Sequence[EditRequest],
        contexts: Sequence[str],
        deltas: dict[int, MatrixDelta],
        drift: Mapping[int, torch.Tensor],
        cfg: LokiConfig,
    ) -> tuple[int, list[bool], float | None, float | None]:
        """MPES: gradient steps on each change's output factor ``a`` (ΔW = a·b, b's rows in the
        null space) until the target is top-1 in every context, then ``extra_steps`` more; then
        the trim. Returns steps, hits, loss and the trim's scale (None: no trim)."""
        n_req, n_ctx = len(requests), len(contexts)
        prompts = contextual_prompts(requests, contexts)
        n_rewrite = len(prompts)
        prompts += [KL_TEMPLATE.format(req.subject) for req in requests]
        targets = [req.target for req in requests for _ in contexts] + [""] * n_req
        batch = build_batch(self.tokenizer, prompts, targets).to(self.device)
        kl_pos = batch.last_prompt_pos()[n_rewrite:]
        index = TargetIndex.of(batch, extra=kl_pos)
        kl_rows = torch.arange(n_rewrite, len(prompts), device=self.device)
        kl_cols = index.column_of(kl_pos)
        owner = torch.arange(n_req, device=self.device).repeat_interleave(n_ctx)

        ref: torch.Tensor | None = None  # the unedited prediction, read only if a step is taken
        for delta in deltas.values():
            assert delta.a is not None and delta.b is not None
            delta.a = delta.a.to(self.device).requires_grad_(True)
            delta.b = delta.b.to(self.device)
        opt = torch.optim.Adam([d.a for d in deltas.values()], lr=cfg.refine_lr)  # type: ignore[misc]
        steps, done_at, loss_value, kept = 0, None, None, None
        hits = [False] * n_req
        try:
            with frozen(self.model):
                for step in range(cfg.refine_steps + 1):
                    with applied(self.model, deltas):
                        logits = logits_at(self.model, batch, index.positions)
                    token_lp, top1 = index.token_logprobs(logits)
                    row_miss = (~index.row_all(top1)[:n_rewrite]).float()
                    misses = torch.zeros(n_req, device=self.device).index_add(0, owner, row_miss)
                    hits = (misses == 0).tolist()
                    if done_at is None and all(hits):
                        done_at = step
                    if (done_at is not None and step - done_at >= cfg.extra_steps) or (
                        step == cfg.refine_steps
                    ):
                        break
                    nll = -index.row_mean(token_lp)[:n_rewrite].mean()
                    if ref is None:
                        with torch.no_grad():
                            ref = torch.log_softmax(
                                logits_at(self.model, batch, index.positions)[
                                    kl_rows, kl_cols
                                ].float(),
                                dim=-1,
                            )
                    kl_lp = torch.log_softmax(logits[kl_rows, kl_cols].float(), dim=-1)
                    kl = (ref.exp() * (ref - kl_lp)).sum(dim=-1).mean()
                    loss = nll + cfg.kl_weight * kl
                    loss_value = float(loss.detach())
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    with torch.no_grad():
                        for layer, delta in deltas.items():
                            self._bound(layer, delta, drift[layer], cfg)
            if all(hits) and cfg.trims:
                with torch.no_grad():
                    kept = self._trim(requests, deltas, cfg)
        finally:
            for delta in deltas.values():
                delta.a = delta.a.detach().cpu()  # type: ignore[union-attr]
                delta.b = delta.b.cpu()  # type: ignore[union-attr]
        return steps, hits, loss_value, kept

    def _trim(
        self, requests: Sequence[EditRequest], deltas: dict[int, MatrixDelta], cfg: LokiConfig
    ) -> float:
        """Scale every change's output factor by the smallest s in (0, 1] (to 2^-trim_steps)
        at which each request keeps its target top-1, with mean token probability ≥
        ``trim_min_prob`` and a lead ≥ ``trim_min_margin`` over the old answer, in every trim
        context; returns s (1.0 where even the full change misses the margin)."""
        contexts = self.contexts(max(cfg.trim_contexts, cfg.target.n_contexts))
        prompts = contextual_prompts(requests, contexts)
        probe = TargetProbe(
            self.model, self.tokenizer, prompts, [r.target for r in requests for _ in contexts]
        )
        rivals = self._old_answers(requests, len(contexts), probe) if cfg.trim_min_margin else None
        full = {layer: delta.a.detach().clone() for layer, delta in deltas.items()}  # type: ignore[union-attr]

        def holds(k: int) -> tuple[bool, float]:
            for layer, delta in deltas.items():
                delta.a = full[layer] * (k / grid)
            with applied(self.model, deltas):
                got = probe.read(rivals)
            # how far the weakest context is above the bars (nats): top-1, lead, probability
            gaps = list(got.top_gaps or []) + [
                lead - cfg.trim_min_margin for lead in got.leads or []
            ]
            if cfg.trim_min_prob > 0:
                gaps += [math.log(max(p, 1e-30) / cfg.trim_min_prob) for p in got.probs]
            slack = min(gaps, default=math.nan)
            return all(got.hits) and slack >= 0, slack

        grid = 2**cfg.trim_steps
        # each test is a forward pass over the trim contexts; most edits keep 0.7–1 of their
        # change (200 edits with the retry, records 0–199 and 5000–5199: median kept 0.906, 89–92%
        # keep ≥ 0.69), so the first test after the full change is at 7/8, not bisection's 1/2
        k, _ = smallest_passing(grid, holds, first=0.875)
        for layer, delta in deltas.items():
            delta.a = full[layer] * (k / grid)
        return k / grid

    def _old_answers(
        self, requests: Sequence[EditRequest], n_ctx: int, probe: TargetProbe
    ) -> Rivals:
        """Per trim row, what the edit replaces: the request's ground_truth at the first token
        where it differs from the target (none if one contains the other), else the token the
        model puts first before the edit — its argmax, which in a generated context may be a
        word like " the" rather than the old fact (none if it is the target's first token)."""
        said = probe.read().said if any(r.truth is None for r in requests) else []
        offsets, tokens = [], []
        for r, req in enumerate(requests):
            new = encode(self.tokenizer, req.target)
            if req.truth is not None:
                old = encode(self.tokenizer, req.truth)
                pairs = enumerate(zip(new, old, strict=False))  # to the shorter's end
                at = next((j for j, (a, b) in pairs if a != b), None)
                offsets += [at or 0] * n_ctx
                tokens += [-1 if at is None else old[at]] * n_ctx
            else:
                offsets += [0] * n_ctx
                tokens += [-1 if t == new[0] else t for t in said[r * n_ctx : (r + 1) * n_ctx]]
        return Rivals(
            torch.tensor(offsets, device=self.device), torch.tensor(tokens, device=self.device)
        )

    @torch.no_grad()
    def _bound(self, layer: int, delta: MatrixDelta, drift: torch.Tensor, cfg: LokiConfig) -> None:
        """Scale the change so ‖ΔW‖ ≤ edit_norm·‖W₀‖ and ‖drift + ΔW‖ ≤ max_relative_change·‖W₀‖.

        Only the output factor is scaled: the input directions stay in the null space."""
        assert delta.a is not None and delta.b is not None
        w0 = self.base_norm[layer]
        change = (delta.a.detach() @ delta.b).to(drift)
        a2 = float(change.pow(2).sum())
        if a2 == 0.0:
            return
        t = min(1.0, cfg.edit_norm * w0 / math.sqrt(a2))
        # ‖C + tΔ‖² = ‖C‖² + 2t⟨C,Δ⟩ + t²‖Δ‖² ≤ R²: largest t allowed
        b = 2 * float((drift * change).sum())
        c = float(drift.pow(2).sum()) - (cfg.max_relative_change * w0) ** 2
        if a2 * t * t + b * t + c > 0:
            t = max(0.0, (-b + math.sqrt(max(b * b - 4 * a2 * c, 0.0))) / (2 * a2))
        if t < 1.0:
            delta.a.data.mul_(t)

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        # read on the edited model, as AlphaEdit does: lower layers' updates move higher keys
        readout = read_at_subject(
            self.model, self.tokenizer, requests, self.key_contexts(), self.layers
        )
        for layer, keys in readout.keys.items():
            self.past_keys[layer] = torch.cat([self.past_keys[layer], keys.float().cpu()])
        self.n_edits += len(requests)
