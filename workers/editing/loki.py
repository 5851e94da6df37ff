"""LOKI: lifelong knowledge editing with per-edit layer selection and null-space-projected updates.

Per edit (DESIGN §3):
1. observations: the edit prompt in several model-generated contexts (+ given rephrasings);
2. layer selection: the top-k candidate layers by the HSIC bottleneck score;
3. a projector per selected down_proj from W₀'s dominant input directions plus the keys of past
   edits — no outside corpus;
4. gradient descent on the target NLL + a KL term on "{subject} is a", with every update
   confined to span(P·k_subject): ΔW = D·Uᵀ, U an orthonormal basis of the projected subject
   keys. That keeps ΔW exactly low-rank (rank ≤ observations) and orthogonal to every protected
   key; a Frobenius bound on the per-edit and cumulative change keeps the model from drifting;
   early stopping once the target is top-1 everywhere, plus a couple of steps (ENCORE's MPES);
5. bookkeeping: this edit's subject keys join the protected span of their layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing import arch
from workers.editing.batch import PromptBatch, build_batch
from workers.editing.contexts import context_templates
from workers.editing.delta import MatrixDelta
from workers.editing.editor import Editor
from workers.editing.hsic import DEFAULT_EPS, bottleneck_scores
from workers.editing.nullspace import Projector, orthonormal_extend, weight_input_basis
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult, LayerScore

KL_TEMPLATE = "{} is a"


@dataclass
class LokiConfig:
    # None = layers in [10%, 30%) of depth: on SmolLM2 the early-middle MLPs hold the facts
    # (DESIGN §3: layers 4–6 edit far better than 8–10).
    candidate_layers: tuple[int, ...] | None = None
    top_k: int = 3
    n_contexts: int = 5  # observations per request: bare prompt + generated prefixes
    context_length: int = 8
    hsic_eps: float = DEFAULT_EPS
    # W₀'s input directions with σ ≥ this·σ_max are protected. Lower protects more of what the
    # layer already reads but leaves less room for edits.
    weight_rel_threshold: float = 0.05
    cache_rel_tol: float = 0.05  # a past edit's key direction is cached if this strong
    context_rel_tol: float = 0.05  # a context key direction is protected if this strong
    lr: float = 0.05
    max_steps: int = 25
    extra_steps: int = 2  # MPES: keep going this many steps after the target is top-1
    kl_weight: float = 1.0
    edit_norm: float = 0.1  # per-edit ‖ΔW‖ ≤ edit_norm · ‖W₀‖
    max_relative_change: float = 0.5  # cumulative ‖W − W₀‖ ≤ this · ‖W₀‖
    seed: int = 0

    def resolve_layers(self, num_layers: int) -> tuple[int, ...]:
        """Validate against the model and return the candidate layers."""
        layers = self.candidate_layers
        if layers is None:
            lo, hi = max(1, round(0.1 * num_layers)), max(2, round(0.3 * num_layers))
            layers = tuple(range(lo, hi))
        if not layers:
            raise ValueError("candidate_layers: must not be empty")
        for layer in layers:
            if not isinstance(layer, int) or not 0 <= layer < num_layers:
                raise ValueError(f"candidate_layers: {layer!r} outside 0..{num_layers - 1}")
        if not 1 <= self.top_k <= len(layers):
            raise ValueError(f"top_k: must be in 1..{len(layers)}, got {self.top_k}")
        if self.n_contexts < 1:
            raise ValueError("n_contexts: must be at least 1")
        for name in ("lr", "edit_norm", "max_relative_change", "weight_rel_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be positive")
        if self.max_steps < 1:
            raise ValueError("max_steps: must be at least 1")
        return tuple(sorted(set(layers)))


@dataclass
class _Observations:
    batch: PromptBatch
    n_edit_rows: int
    request_of_row: list[int]


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
        self.layers = self.config.resolve_layers(arch.num_layers(model))
        self.modules = {layer: arch.down_proj(model, layer) for layer in self.layers}
        self.names = {layer: arch.down_proj_name(model, layer) for layer in self.layers}
        # W₀ of every candidate, so ‖W − W₀‖ is known whatever version is loaded later:
        # construct the editor on the base weights.
        self.base = {layer: m.weight.detach().float().clone() for layer, m in self.modules.items()}
        self.base_norm = {layer: float(w.norm()) for layer, w in self.base.items()}
        self.protected: dict[int, torch.Tensor] = {}  # layer → Q (d_in × r), orthonormal
        self.weight_rank: dict[int, int] = {}  # leading columns of Q that come from W₀
        self.n_edits = 0

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        # Only the cached-key columns: W₀'s basis is recomputed from the base weights on load,
        # which keeps a version's stored state to what its edits added.
        state = {"n_edits": torch.tensor(self.n_edits)}
        for layer, q in self.protected.items():
            state[f"cache.{layer}"] = q[:, self.weight_rank[layer] :].cpu().contiguous()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        caches = {}
        for key, value in state.items():
            kind, _, layer = key.partition(".")
            if kind == "cache" and layer.isdigit() and int(layer) in self.modules:
                caches[int(layer)] = value.float().to(self.device)
            elif key != "n_edits":
                raise ValueError(f"loki state: unexpected key {key!r}")
        self.protected, self.weight_rank = {}, {}
        for layer, cache in caches.items():
            basis = self._protector(layer).q
            if cache.shape[0] != basis.shape[0]:
                raise ValueError(f"loki state: cache.{layer} has {cache.shape[0]} rows")
            self.protected[layer] = torch.cat([basis, cache], dim=1)
        self.n_edits = int(state.get("n_edits", torch.tensor(0)))

    def cached_keys(self, layer: int) -> int:
        """How many directions past edits have added to the layer's protected span."""
        return (
            int(self.protected[layer].shape[1]) - self.weight_rank[layer]
            if layer in self.protected
            else 0
        )

    # --- the edit --------------------------------------------------------------------------
    def _observations(self, requests: Sequence[EditRequest]) -> _Observations:
        templates = context_templates(
            self.model, self.tokenizer, n=self.config.n_contexts, length=self.config.context_length
        )
        prompts, targets, subjects, owner = [], [], [], []
        for i, req in enumerate(requests):
            texts = [t.replace("{}", req.text) for t in templates] + list(req.rephrase_prompts)
            for text in texts:
                prompts.append(text)
                targets.append(req.target)
                subjects.append(req.subject if req.subject in text else None)
                owner.append(i)
        n_edit = len(prompts)
        for i, req in enumerate(requests):
            prompts.append(KL_TEMPLATE.format(req.subject))
            targets.append("")
            subjects.append(req.subject)
            owner.append(i)
        batch = build_batch(self.tokenizer, prompts, targets, subjects).to(self.device)
        return _Observations(batch, n_edit, owner)

    def _forward_hidden(self, batch: PromptBatch) -> torch.Tensor:
        base: nn.Module = getattr(self.model, self.model.base_model_prefix)
        return base(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state

    @contextmanager
    def _capture(self) -> Iterator[dict[int, torch.Tensor]]:
        keys: dict[int, torch.Tensor] = {}
        handles = [
            module.register_forward_pre_hook(
                lambda _m, args, layer=layer: keys.__setitem__(layer, args[0].detach())
            )
            for layer, module in self.modules.items()
        ]
        try:
            yield keys
        finally:
            for h in handles:
                h.remove()

    def _protector(self, layer: int) -> Projector:
        if layer not in self.protected:
            basis = weight_input_basis(self.base[layer], self.config.weight_rel_threshold)
            self.protected[layer] = basis.to(self.device)
            self.weight_rank[layer] = int(basis.shape[1])
        return Projector(self.protected[layer])

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        obs = self._observations(requests)
        batch, n_edit = obs.batch, obs.n_edit_rows
        mask = batch.attention_mask.bool()
        rows, pos, ids = batch.flat_target_index()
        kl_rows = torch.arange(n_edit, batch.input_ids.shape[0], device=self.device)
        kl_pos = batch.last_prompt_pos()[n_edit:]
        lm_head = self.model.get_output_embeddings()

        # 1-2. one plain forward: keys of every candidate layer, HSIC scores, KL reference
        with torch.no_grad(), self._capture() as keys:
            out = self.model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                output_hidden_states=True,
            )
            ref_logp = torch.log_softmax(out.logits[kl_rows, kl_pos].float(), dim=-1)
        edit_mask = mask[:n_edit]
        scores = bottleneck_scores(
            out.hidden_states[0][:n_edit][edit_mask],
            {layer: keys[layer][:n_edit][edit_mask] for layer in self.layers},
            out.hidden_states[-1][:n_edit][edit_mask],
            eps=cfg.hsic_eps,
        )
        chosen = sorted(sorted(scores, key=scores.__getitem__, reverse=True)[: cfg.top_k])
        del out

        # 3. per chosen layer: the projected subject keys span the update's input directions
        subj_rows = [r for r in range(n_edit) if batch.subject_last[r] >= 0]
        subj_pos = [batch.subject_last[r] for r in subj_rows]
        bases: dict[int, torch.Tensor] = {}
        key_ratio: dict[str, float] = {}
        subject_keys: dict[int, torch.Tensor] = {}
        # The other tokens of the observations (context, template, target) are ordinary text the
        # edit must not change: their keys' dominant directions are protected for this edit too.
        # Without this, "The capital of Japan is the city of" answered "Rome" after the Eiffel
        # Tower edit: the subject key shares "…the city of" directions with every such prompt.
        other = edit_mask.clone()
        other[subj_rows, subj_pos] = False
        for layer in chosen:
            k = keys[layer][subj_rows, subj_pos].float()
            subject_keys[layer] = k
            context_keys = keys[layer][:n_edit][other].float()
            proj = Projector(
                orthonormal_extend(self._protector(layer).q, context_keys, cfg.context_rel_tol)
            )
            pk = proj.apply(k)
            key_ratio[self.names[layer]] = proj.ratio(k)
            _, s, vh = torch.linalg.svd(pk, full_matrices=False)
            bases[layer] = vh[s > 1e-3 * s[0].clamp_min(1e-30)].T.contiguous()
        del keys

        # 4. projected gradient descent on D (ΔW = D Uᵀ)
        coeffs = {
            layer: torch.zeros(
                self.modules[layer].out_features, u.shape[1], device=self.device, requires_grad=True
            )
            for layer, u in bases.items()
        }
        # cumulative change so far, seen through U: ⟨W − W₀, D Uᵀ⟩ = ⟨(W − W₀) U, D⟩
        drift = {
            layer: (self.modules[layer].weight.detach().float() - self.base[layer])
            for layer in chosen
        }
        drift_u = {layer: drift[layer] @ bases[layer] for layer in chosen}
        drift_sq = {layer: float(drift[layer].pow(2).sum()) for layer in chosen}
        del drift
        opt = torch.optim.Adam(list(coeffs.values()), lr=cfg.lr)
        handles = [
            self.modules[layer].register_forward_hook(
                lambda _m, args, output, u=bases[layer], d=coeffs[layer]: (
                    output + ((args[0].float() @ u) @ d.T).to(output.dtype)
                )
            )
            for layer in chosen
        ]
        steps, done_at, loss_value = 0, None, math.nan
        success_rows = torch.zeros(n_edit, dtype=torch.bool)
        try:
            for step in range(cfg.max_steps):
                hidden = self._forward_hidden(batch)
                logp_t = torch.log_softmax(lm_head(hidden[rows, pos]).float(), dim=-1)
                nll = -logp_t[torch.arange(len(ids)), ids].mean()
                logp_kl = torch.log_softmax(lm_head(hidden[kl_rows, kl_pos]).float(), dim=-1)
                kl = torch.sum(ref_logp.exp() * (ref_logp - logp_kl), dim=-1).mean()
                loss = nll + cfg.kl_weight * kl
                loss_value = float(loss.detach())
                hit = logp_t.argmax(dim=-1) == ids
                misses = torch.zeros(n_edit, device=self.device).index_add_(0, rows, (~hit).float())
                success_rows = (misses == 0).cpu()
                if done_at is None and bool(success_rows.all()):
                    done_at = step
                if done_at is not None and step - done_at >= cfg.extra_steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                with torch.no_grad():
                    for layer, d in coeffs.items():
                        self._bound(layer, d, drift_u[layer], drift_sq[layer])
        finally:
            for h in handles:
                h.remove()

        deltas, delta_norm, rel_change = [], {}, {}
        for layer in chosen:
            d = coeffs[layer].detach()
            name = self.names[layer]
            deltas.append(MatrixDelta(name=name, a=d.cpu(), b=bases[layer].T.cpu()))
            delta_norm[name] = float(d.norm())
            cum_sq = drift_sq[layer] + 2 * float((drift_u[layer] * d).sum()) + float(d.pow(2).sum())
            rel_change[name] = math.sqrt(max(cum_sq, 0.0)) / self.base_norm[layer]
        self._pending_keys = subject_keys
        per_request = [
            bool(all(success_rows[r] for r in range(n_edit) if obs.request_of_row[r] == i))
            for i in range(len(requests))
        ]
        return EditResult(
            method=self.method,
            deltas=deltas,
            layers=[LayerScore(layer, scores[layer], layer in chosen) for layer in self.layers],
            key_ratio=key_ratio,
            delta_norm=delta_norm,
            relative_change=rel_change,
            steps=steps,
            success=all(per_request),
            per_request_success=per_request,
            loss=loss_value,
        )

    def _bound(self, layer: int, d: torch.Tensor, drift_u: torch.Tensor, drift_sq: float) -> None:
        """Scale D into the per-edit ball and keep ‖(W − W₀) + D Uᵀ‖ within the cumulative bound."""
        w0 = self.base_norm[layer]
        norm = float(d.norm())
        limit = self.config.edit_norm * w0
        if norm > limit:
            d.mul_(limit / norm)
        # ‖C + tΔ‖² = ‖C‖² + 2t⟨C,Δ⟩ + t²‖Δ‖² ≤ R²: largest t in [0, 1]
        a = float(d.pow(2).sum())
        b = 2 * float((drift_u * d).sum())
        c = drift_sq - (self.config.max_relative_change * w0) ** 2
        if a > 0 and a + b + c > 0:
            t = (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
            d.mul_(max(min(t, 1.0), 0.0))

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        for layer, k in self._pending_keys.items():
            self.protected[layer] = orthonormal_extend(
                self.protected[layer], k, self.config.cache_rel_tol
            )
        self._pending_keys = {}
        self.n_edits += len(requests)
