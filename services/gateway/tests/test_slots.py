"""Two slots on real ONNX Runtime sessions: smoke test, atomic swap under load, local rollback."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from slmops.testing.models import tiny_encoder_onnx, with_word_tokenizer
from slmops_gateway.slots import SessionOptions, Slots, load, smoke_test
from slmops_gateway.verify import Refused

TEXTS = ["w1 w2 w3 w4", "w10 w20 w30"]


def _model(tmp_path: Path, name: str, **kwargs: int) -> Path:
    path = tmp_path / f"{name}.onnx"
    path.write_bytes(with_word_tokenizer(tiny_encoder_onnx(**kwargs)))
    return path


def test_requests_never_fail_or_mix_models_while_swapping(tmp_path: Path) -> None:
    # setup: two different models, and their answers to the same request
    options = SessionOptions()
    a = load(_model(tmp_path, "a", seed=1), "v-a", "1.0.0", options)
    b = load(_model(tmp_path, "b", seed=2), "v-b", "1.1.0", options)
    expected = {m.variant_id: m.run(TEXTS) for m in (a, b)}
    slots = Slots()
    slots.swap_in(a)
    answers: list[tuple[str, list[np.ndarray]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def serve() -> None:
        # Nothing is asserted here: an assertion failing in a thread is only a warning, so
        # failures are collected and asserted in the test's own thread.
        while not stop.is_set():
            try:
                model = slots.active  # one read per request: it finishes on that session
                if model is None:
                    raise AssertionError("no active model while swapping")
                answers.append((model.variant_id, model.run(TEXTS)))
            except BaseException as exc:
                errors.append(exc)

    # execute: two clients serve while the slots swap 200 times
    clients = [threading.Thread(target=serve) for _ in range(2)]
    for c in clients:
        c.start()
    for i in range(200):
        smoke_test(b if i % 2 == 0 else a, slots.active)
        slots.swap_in(b if i % 2 == 0 else a)
    stop.set()
    for c in clients:
        c.join(timeout=60)

    # assert: no failure, every answer is exactly one model's
    assert not any(c.is_alive() for c in clients), "a client thread is still serving"
    assert errors == []
    assert {vid for vid, _ in answers} == {"v-a", "v-b"}
    for vid, outputs in answers:
        for got, want in zip(outputs, expected[vid], strict=True):
            np.testing.assert_array_equal(got, want)


def test_local_rollback_restores_the_previous_model(tmp_path: Path) -> None:
    slots = Slots()
    with pytest.raises(Refused, match="no previous model"):
        slots.roll_back()
    a = load(_model(tmp_path, "a", seed=1), "v-a", "1.0.0", SessionOptions())
    b = load(_model(tmp_path, "b", seed=2), "v-b", "1.1.0", SessionOptions())
    slots.swap_in(a)
    assert slots.swap_in(b) is a
    assert slots.roll_back() is a
    assert (slots.active, slots.previous) == (a, b)


def test_smoke_test_refuses_unloadable_nan_and_misshapen_models(tmp_path: Path) -> None:
    running = load(_model(tmp_path, "ok"), "v-ok", "1.0.0", SessionOptions())
    broken = _model(tmp_path, "custom", op_domain="com.example.nokernel")
    with pytest.raises(Refused, match="cannot load"):
        load(broken, "v-x", "1.0.0", SessionOptions())
    narrow = load(_model(tmp_path, "narrow", hidden=32), "v-n", "1.0.0", SessionOptions())
    with pytest.raises(Refused, match="output width 32 differs from the running model's 64"):
        smoke_test(narrow, running)
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(_model(tmp_path, "nan")))
    for i, init in enumerate(proto.graph.initializer):
        if init.name == "w2":
            values = numpy_helper.to_array(init).copy()
            values[:, 0] = np.nan
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, "w2"))
    onnx.save(proto, str(tmp_path / "nan.onnx"))
    nan = load(tmp_path / "nan.onnx", "v-nan", "1.0.0", SessionOptions())
    with pytest.raises(Refused, match="non-finite output values"):
        smoke_test(nan, running)
