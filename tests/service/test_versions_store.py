"""The version store and materialisation, on small tensors (no model)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.versions import state as state_codec
from app.versions.chain import (
    DELTA,
    KEYFRAME,
    STATE,
    VersionInfo,
    needs_full_state,
    needs_keyframe,
    path_to,
)
from app.versions.live import LiveWeights
from app.versions.materialise import BaseWeights, Materialiser
from app.versions.store import BlobCorrupted, BlobStore
from workers.editing.delta import MatrixDelta


def test_blob_is_content_addressed_and_verified(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    tensors = {"x": torch.arange(6.0).reshape(2, 3)}
    sha, size = store.put(tensors)
    path = store.path(sha)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    assert size == path.stat().st_size
    assert store.put({"x": torch.arange(6.0).reshape(2, 3)}) == (sha, size)  # stored once
    assert not list(path.parent.glob(".tmp-*"))  # no temp file left behind
    assert torch.equal(BlobStore(tmp_path).get(sha)["x"], tensors["x"])

    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BlobCorrupted, match=sha):
        BlobStore(tmp_path).get(sha)  # a fresh store: no cached copy to hide the damage


def test_state_appends_along_any_dimension() -> None:
    parent = {"rows": torch.randn(3, 4), "cols": torch.randn(5, 2), "n": torch.tensor(3)}
    child = {
        "rows": torch.cat([parent["rows"], torch.randn(2, 4)]),
        "cols": torch.cat([parent["cols"], torch.randn(5, 3)], dim=1),
        "n": torch.tensor(4),
        "new": torch.ones(2),
    }
    blob, full = state_codec.encode(child, parent)
    assert not full
    assert blob["append0::rows"].shape == (2, 4)
    assert blob["append1::cols"].shape == (5, 3)
    assert "full::n" in blob and "full::new" in blob
    decoded = state_codec.decode(blob, parent)
    assert decoded.keys() == child.keys()
    assert all(torch.equal(decoded[k], child[k]) for k in child)

    changed = {"rows": torch.randn(3, 4)}  # not an extension: stored whole
    blob, full = state_codec.encode(changed, parent)
    assert full and torch.equal(blob["full::rows"], changed["rows"])


def test_keyframe_policy_bounds_chains() -> None:
    path = [VersionInfo(0, None)]
    for i in range(1, 10):
        keyframe = needs_keyframe(path, "w", 3)
        path.append(VersionInfo(i, i - 1, ("w",), ("w",) if keyframe else ()))
    assert [i for i, v in enumerate(path) if v.keyframes] == [3, 6, 9]
    assert needs_full_state([VersionInfo(0, None), VersionInfo(1, 0, state_full=False)], 3) is False
    assert (
        needs_full_state(
            [VersionInfo(0, None), *[VersionInfo(i, i - 1, state_full=False) for i in (1, 2)]], 3
        )
        is True
    )


def _model_dir(tmp_path: Path, weight: torch.Tensor) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({"layer.weight": weight}, str(model_dir / "model.safetensors"))
    return model_dir


def test_materialise_matches_sequential_edits_with_keyframes_and_branches(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    base = torch.randn(6, 8)
    store = BlobStore(tmp_path / "store")
    materialiser = Materialiser(store, BaseWeights(_model_dir(tmp_path, base)))
    infos = {0: VersionInfo(0, None)}
    expected = {0: base.clone()}
    states = {0: {}}
    every = 3

    def commit(vid: int, parent: int) -> None:
        delta = MatrixDelta("layer.weight", a=torch.randn(6, 1), b=torch.randn(1, 8))
        path = path_to(parent, infos)
        value = expected[parent] + delta.to_dense()
        key = needs_keyframe(path, "layer.weight", every)
        state = {
            "keys": torch.cat([states[parent].get("keys", torch.zeros(0, 8)), torch.randn(1, 8)])
        }
        full = needs_full_state(path, every)
        state_blob, state_full = state_codec.encode(state, None if full else states[parent])
        blobs = {DELTA: store.put(delta.tensors())[0], STATE: store.put(state_blob)[0]}
        if key:
            blobs[KEYFRAME] = store.put({"layer.weight": value})[0]
        infos[vid] = VersionInfo(
            vid, parent, ("layer.weight",), ("layer.weight",) if key else (), state_full, blobs
        )
        expected[vid], states[vid] = value, state

    for vid in range(1, 8):
        commit(vid, vid - 1)
    commit(8, 3)  # a branch after a rollback to version 3
    commit(9, 8)

    assert any(info.keyframes for info in infos.values())
    for vid in infos:
        path = path_to(vid, infos)
        got = materialiser.weights(path).get("layer.weight", base)
        assert torch.allclose(got, expected[vid], atol=1e-5), vid
        state = materialiser.state(path)
        if vid:
            assert torch.equal(state["keys"], states[vid]["keys"])
        else:
            assert state == {}

    # A resident model moving along the tree holds exactly what a fresh load would.
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(8, 6, bias=False)
    model.layer.weight.data.copy_(base)
    live = LiveWeights(model, materialiser)
    for vid in (0, 5, 7, 2, 9, 0):
        live.install(live.prepare(path_to(vid, infos)))
        fresh = materialiser.weights(path_to(vid, infos)).get("layer.weight", base)
        assert torch.equal(model.layer.weight.data, fresh), vid
        assert torch.allclose(model.layer.weight.data, expected[vid], atol=1e-5)
    assert torch.equal(model.layer.weight.data, base)


def test_bf16_model_keeps_fp32_masters(tmp_path: Path) -> None:
    """Many small edits survive in a bf16 model: each install rounds the fp32 sum once."""
    torch.manual_seed(1)
    base = torch.randn(4, 8)
    store = BlobStore(tmp_path / "store")
    materialiser = Materialiser(store, BaseWeights(_model_dir(tmp_path, base)))
    model = torch.nn.Module()
    model.layer = torch.nn.Linear(8, 4, bias=False).to(torch.bfloat16)
    model.layer.weight.data.copy_(base.to(torch.bfloat16))
    live = LiveWeights(model, materialiser)
    live.install(live.prepare([VersionInfo(0, None)]))
    infos = {0: VersionInfo(0, None)}
    tiny = MatrixDelta("layer.weight", dense=torch.full((4, 8), 1e-3))  # below bf16 resolution
    for vid in range(1, 21):
        info = VersionInfo(
            vid, vid - 1, ("layer.weight",), (), blobs={DELTA: store.put(tiny.tensors())[0]}
        )
        infos[vid] = info
        live.install(live.prepare_edit(info, [tiny]))
    expected = base + 20 * 1e-3
    assert torch.allclose(live.masters["layer.weight"], expected, atol=1e-5)
    assert torch.equal(model.layer.weight.data, expected.to(torch.bfloat16))
    naive = base.to(torch.bfloat16)
    for _ in range(20):  # what adding in place in bf16 would have done
        naive = naive + torch.full((4, 8), 1e-3).to(torch.bfloat16)
    assert not torch.equal(naive, expected.to(torch.bfloat16))
