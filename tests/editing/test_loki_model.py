"""LOKI on the real bundled model: an edit changes the fact, generalises, leaves others alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from workers.editing.loki import LokiEditor
from workers.editing.model import LoadedModel
from workers.editing.requests import EditRequest
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
    assert all(d.rank is not None and d.rank <= editor.config.n_contexts for d in result.deltas)
    for delta in result.deltas:
        assert delta.norm() == pytest.approx(result.delta_norm[delta.name], rel=1e-3)
    assert 0 < result.steps <= editor.config.max_steps


@pytest.mark.slow
def test_second_edit_cannot_move_first_edits_keys(
    loaded_model: LoadedModel, editor: LokiEditor
) -> None:
    clone = LokiEditor(loaded_model.model, loaded_model.tokenizer)  # built on the base weights
    first = editor.apply([EDIT])
    protected = {layer: editor.protected[layer].clone() for layer in first.selected_layers}
    assert all(editor.cached_keys(layer) > 0 for layer in first.selected_layers)
    second = editor.apply(
        [EditRequest(prompt="{} plays the", subject="Toko Yasuda", target_new="piano")]
    )
    for delta in second.deltas:
        layer = int(delta.name.split(".")[2])
        if layer in protected:
            # ΔW · q = 0 for every direction protected before the second edit
            assert (delta.to_dense() @ protected[layer]).abs().max() < 1e-3
    state = editor.state_dict()
    clone.load_state_dict(state)
    assert clone.n_edits == 2
    for layer, q in editor.protected.items():
        assert torch.allclose(clone.protected[layer], q.cpu(), atol=1e-5)
    # only the cached keys travel: W₀'s basis is recomputed from the weights
    assert all(
        v.shape[1] <= 2 * editor.config.n_contexts for k, v in state.items() if k != "n_edits"
    )


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
