"""Fault class 4, the patch API: deepcopy, pickling, threads, nested ``pruned`` blocks, ``remove()``
twice, a failing undo, and models another library has wrapped.

The patch's state either survives (a deep copy is pruned like the original, on its own) or the
operation is refused with an error saying what to do; ``unpatch`` always restores the model."""

from __future__ import annotations

import copy
import gc
import pickle
import threading
import time

import pytest
import torch
from torch import nn

import tokprune
from tokprune.adapters import handle_of
from tokprune.errors import TokpruneError, UnsupportedModelError
from tokprune.testing.models import VOCAB, tiny_llava

SPEC = "topk(keep=4)"


@pytest.fixture
def tiny():
    """A fresh tiny LLaVA per case: a case that leaves the model patched (the faults this file is about)
    fails itself, not the cases after it."""
    model, make_inputs = tiny_llava(seed=0)
    inputs = make_inputs((5, 3))
    with torch.no_grad():
        plain = model(**inputs).logits
    with tokprune.pruned(model, SPEC, question_end=VOCAB.assistant_marker), torch.no_grad():
        pruned = model(**inputs).logits
    assert not torch.allclose(plain, pruned)
    return model, inputs, plain, pruned


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _patch(model):
    return tokprune.patch(model, SPEC, question_end=VOCAB.assistant_marker)


@pytest.fixture
def clean(tiny):
    model = tiny[0]
    yield tiny
    tokprune.unpatch(model)
    assert handle_of(model) is None
    assert torch.equal(_logits(model, tiny[1]), tiny[2]), "the model was left patched"


def test_a_deep_copy_is_pruned_on_its_own(clean):
    model, inputs, plain, pruned = clean
    handle = _patch(model)
    clone = copy.deepcopy(model)
    assert torch.allclose(_logits(clone, inputs), pruned, atol=1e-5)
    handle.remove()
    del handle
    gc.collect()
    assert torch.allclose(_logits(clone, inputs), pruned, atol=1e-5), (
        "the copy stopped pruning with the original's handle"
    )
    assert torch.equal(_logits(model, inputs), plain)
    tokprune.unpatch(clone)
    assert torch.allclose(_logits(clone, inputs), plain, atol=1e-5)


def test_a_deep_copy_has_its_own_handle(clean):
    model, inputs, _, _ = clean
    handle = _patch(model)
    clone = copy.deepcopy(model)
    theirs = handle_of(clone)
    assert theirs is not None and theirs is not handle and theirs.model is clone
    assert handle.active and handle_of(model) is handle, "copying changed the original's handle"
    assert str(theirs.pipeline) == str(handle.pipeline)
    theirs.remove()
    assert handle.active


def test_pickling_a_patched_model_is_refused_with_the_fix(clean):
    model = clean[0]
    with _patch(model):
        with pytest.raises(TokpruneError, match=r"patched.*state_dict.*(remove|unpatch)"):
            pickle.dumps(model)
    assert handle_of(model) is None


def test_copying_after_remove_gives_the_unpatched_model(clean):
    """After remove() nothing of the patch is left to copy: no hooks of ours on the instance, a plain copy."""
    model, inputs, plain, _ = clean
    _patch(model).remove()
    assert "__reduce_ex__" not in vars(model) and "__deepcopy__" not in vars(model)
    again = copy.deepcopy(model)
    assert handle_of(again) is None
    assert torch.allclose(_logits(again, inputs), plain, atol=1e-6)


def test_torch_save_of_a_patched_model_is_refused(clean, tmp_path):
    model = clean[0]
    with _patch(model), pytest.raises(TokpruneError, match="patched"):
        torch.save(model, tmp_path / "m.pt")


def test_two_threads_entering_pruned_on_one_model(clean, monkeypatch):
    """The issue's case: both enter ``pruned(model)`` at once. One wins; the other gets the clear "already
    patched" error (never a KeyError), and afterwards the model is restored. Installing is slowed down so
    that both threads are inside ``patch`` together every time."""
    from tokprune.adapters.llava import LlavaAdapter

    model = clean[0]
    real_install = LlavaAdapter._install

    def slow_install(self):
        time.sleep(0.05)
        real_install(self)

    monkeypatch.setattr(LlavaAdapter, "_install", slow_install)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def enter():
        start.wait()
        try:
            with tokprune.pruned(model, SPEC, question_end=VOCAB.assistant_marker):
                time.sleep(0.1)
        except BaseException as exc:  # noqa: BLE001 - collected and checked below
            errors.append(exc)

    for _ in range(3):
        threads = [threading.Thread(target=enter) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert handle_of(model) is None, "a patch was left on the model"
    assert len(errors) == 3, errors
    for exc in errors:
        assert isinstance(exc, RuntimeError) and "already patched" in str(exc), repr(exc)


def test_two_threads_generating_on_one_patched_model(clean):
    model, inputs, _, _ = clean
    with _patch(model):
        with torch.no_grad():
            solo = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        outs: list[torch.Tensor] = []

        def gen():
            with torch.no_grad():
                outs.append(model.generate(**inputs, max_new_tokens=3, do_sample=False))

        threads = [threading.Thread(target=gen) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(outs) == 2 and all(torch.equal(o, solo) for o in outs)


def test_nested_pruned_blocks_on_one_model(clean):
    model, inputs, _, pruned = clean
    with tokprune.pruned(model, SPEC, question_end=VOCAB.assistant_marker) as outer:
        with pytest.raises(RuntimeError, match=r"already patched.*remove"):
            with tokprune.pruned(model, "fastv", question_end=VOCAB.assistant_marker):
                pass
        assert outer.active and torch.allclose(_logits(model, inputs), pruned)


def test_nested_pruned_blocks_on_two_models(clean):
    model, inputs, plain, pruned = clean
    other = copy.deepcopy(model)
    with tokprune.pruned(model, SPEC, question_end=VOCAB.assistant_marker):
        with tokprune.pruned(other, SPEC, question_end=VOCAB.assistant_marker):
            assert torch.allclose(_logits(other, inputs), pruned)
        assert torch.allclose(_logits(other, inputs), plain, atol=1e-6)
        assert torch.allclose(_logits(model, inputs), pruned)


def test_remove_twice_and_unpatch_after_remove_do_nothing(clean):
    model = clean[0]
    handle = _patch(model)
    handle.remove()
    handle.remove()
    tokprune.unpatch(model)
    assert not handle.active


def test_an_old_handle_does_not_remove_a_newer_patch(clean):
    model, inputs, _, pruned = clean
    old = _patch(model)
    old.remove()
    new = _patch(model)
    old.remove()
    assert new.active and torch.allclose(_logits(model, inputs), pruned)


def test_an_error_inside_the_block_restores_the_model(clean):
    model = clean[0]
    with pytest.raises(ZeroDivisionError), tokprune.pruned(model, SPEC, question_end=VOCAB.assistant_marker):
        1 / 0  # noqa: B018


def test_unpatch_restores_the_model_even_when_one_undo_step_fails(clean):
    """A hook handle whose removal raises must not leave the other changes in place (or the model
    registered as unpatched while it is not)."""
    model, inputs, plain, _ = clean
    handle = _patch(model)

    class Stubborn:
        def remove(self):
            raise RuntimeError("hook removal failed")

    handle._state.add_hook(Stubborn())
    with pytest.raises(RuntimeError, match="hook removal failed"):
        tokprune.unpatch(model)
    assert handle_of(model) is None and torch.equal(_logits(model, inputs), plain)


def test_a_torch_compile_wrapper_is_refused_naming_the_unwrap(clean):
    compiled = torch.compile(clean[0])
    with pytest.raises(UnsupportedModelError, match=r"OptimizedModule.*_orig_mod"):
        _patch(compiled)


def test_a_data_parallel_wrapper_is_refused_naming_the_unwrap(clean):
    with pytest.raises(UnsupportedModelError, match=r"DataParallel.*\.module"):
        _patch(nn.DataParallel(clean[0]))


def test_a_forward_wrapped_by_another_library_is_restored_as_it_was(clean):
    """accelerate-style: an instance ``forward`` set before the patch is the one restored after it."""
    model, inputs, plain, pruned = clean
    inner = model.model
    calls = []
    original = inner.forward

    def wrapped(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    inner.forward = wrapped
    try:
        with _patch(model):
            assert torch.allclose(_logits(model, inputs), pruned)
        assert inner.__dict__["forward"] is wrapped
        calls.clear()
        assert torch.equal(_logits(model, inputs), plain) and calls
    finally:
        del inner.forward
