"""A small, real editor for testing the service's plumbing quickly (seconds, not minutes).

ROME-like: find the down_proj key k of the prompt's last token in one layer, optimise the
residual change δ there that makes the model say the target, and write ΔW = δ·kᵀ/‖k‖², a
genuine rank-1 change per request. Its state (the keys it has written) grows by rows, so it also
exercises the version store's editor-state appends.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from workers.editing import arch
from workers.editing.batch import build_batch
from workers.editing.delta import MatrixDelta
from workers.editing.editor import Editor
from workers.editing.requests import EditRequest
from workers.editing.result import EditResult, LayerScore

LAYER = 4
STEPS = 40
LR = 0.5
ENOUGH = 0.6  # stop once the first target token has this probability


class RankOneEditor(Editor):
    method = "rank-one-test"

    def __init__(self, model, tokenizer) -> None:  # type: ignore[no-untyped-def]
        super().__init__(model, tokenizer)
        self.module = arch.down_proj(model, LAYER)
        self.name = arch.down_proj_name(model, LAYER)
        self.keys = torch.zeros(0, self.module.in_features)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"keys": self.keys.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.keys = state.get("keys", torch.zeros(0, self.module.in_features)).clone()

    def _one(self, request: EditRequest) -> tuple[torch.Tensor, torch.Tensor, bool]:
        batch = build_batch(self.tokenizer, [request.text], [request.target]).to(self.device)
        last = batch.prompt_len[0] - 1
        captured: dict[str, torch.Tensor] = {}
        delta = torch.zeros(self.module.out_features, requires_grad=True)

        def hook(_module, inputs, output):  # type: ignore[no-untyped-def]
            captured["k"] = inputs[0][0, last].detach()
            out = output.clone()
            out[0, last] = out[0, last] + delta.to(out.dtype)
            return out

        handle = self.module.register_forward_hook(hook)
        rows, pos, ids = batch.flat_target_index()
        optimiser = torch.optim.Adam([delta], lr=LR)
        steps = 0
        try:
            with torch.enable_grad():
                for _ in range(STEPS):
                    logits = self.model(batch.input_ids, attention_mask=batch.attention_mask).logits
                    logp = torch.log_softmax(logits.float(), dim=-1)[rows, pos, ids]
                    loss = -logp.mean()
                    if float(logp[0].detach().exp()) > ENOUGH:
                        break
                    steps += 1
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                with torch.no_grad():
                    logits = self.model(batch.input_ids, attention_mask=batch.attention_mask).logits
                    success = int(logits[0, pos[0]].argmax()) == int(ids[0])
        finally:
            handle.remove()
        self._steps = getattr(self, "_steps", 0) + steps
        return delta.detach(), captured["k"].float(), success

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        self._steps = 0
        deltas, keys, ok = [], [], []
        for request in requests:
            d, k, success = self._one(request)
            deltas.append(d)
            keys.append(k)
            ok.append(success)
        k = torch.stack(keys)
        a = torch.stack(deltas, dim=1)  # d_out × n
        b = k / (k * k).sum(dim=1, keepdim=True)  # n × d_in: ΔW·k_i = δ_i (keys nearly orthogonal)
        self._pending = k
        return EditResult(
            method=self.method,
            deltas=[MatrixDelta(self.name, a=a, b=b)],
            layers=[LayerScore(layer=LAYER, score=1.0, selected=True)],
            steps=self._steps,
            success=all(ok),
            per_request_success=ok,
        )

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        self.keys = torch.cat([self.keys, self._pending.cpu()])


class FailingEditor(RankOneEditor):
    """Raises after computing, like an editor that hits a bug mid-edit."""

    method = "failing-test"

    def after_apply(self, requests: Sequence[EditRequest], result: EditResult) -> None:
        raise RuntimeError("boom: editor state update failed")


class ScramblingEditor(RankOneEditor):
    """Makes its edit and also scrambles another layer's MLP: what the edit guard must stop."""

    method = "scrambling-test"

    def compute(self, requests: Sequence[EditRequest]) -> EditResult:
        result = super().compute(requests)
        module, name = arch.down_proj(self.model, 2), arch.down_proj_name(self.model, 2)
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(module.out_features, 16, generator=generator)
        b = torch.randn(16, module.in_features, generator=generator)
        scale = float(module.weight.norm()) / float((a @ b).norm())  # as large as W itself
        result.deltas.append(MatrixDelta(name, a=a * scale, b=b))
        return result
