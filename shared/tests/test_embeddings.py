"""Which output of an encoder holds its embeddings: every choice rule and every refusal."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from slmops.embeddings import (
    EmbeddingChoice,
    EmbeddingChoiceError,
    OutputInfo,
    choose_embedding_output,
    hints_from_metadata,
    outputs_from_onnx,
    outputs_from_ort,
    pool,
)
from slmops.quality import encoder_parity, mean_pooled


def tokens(name: str, hidden: int = 8) -> OutputInfo:
    return OutputInfo(name, ("batch", "sequence", hidden), "float")


def pooled(name: str, hidden: int = 8) -> OutputInfo:
    return OutputInfo(name, ("batch", hidden), "float")


# --- choice rules -----------------------------------------------------------------------------


def test_a_single_token_embeddings_output_is_mean_pooled() -> None:
    choice = choose_embedding_output([tokens("out")])

    assert (choice.output, choice.index, choice.pooling) == ("out", 0, "mean")
    assert "only float output" in choice.reason


def test_a_single_pooled_output_is_used_as_is() -> None:
    choice = choose_embedding_output([pooled("vec")])

    assert (choice.output, choice.pooling) == ("vec", "none")


def test_sentence_transformers_layout_prefers_the_pooled_sentence_embedding() -> None:
    # sentence_embedding first, a second 2-D output, token embeddings third
    outputs = [pooled("sentence_embedding"), pooled("pooler_output"), tokens("token_embeddings")]

    choice = choose_embedding_output(outputs)

    assert (choice.output, choice.index, choice.pooling) == ("sentence_embedding", 0, "none")
    assert "preferred name" in choice.reason


def test_hugging_face_layout_prefers_mean_pooled_tokens_over_the_bert_pooler() -> None:
    # the pooler first: the choice is by name and shape, not by position
    outputs = [pooled("pooler_output"), tokens("last_hidden_state")]

    choice = choose_embedding_output(outputs)

    assert (choice.output, choice.index, choice.pooling) == ("last_hidden_state", 1, "mean")


def test_the_bert_pooler_is_used_when_nothing_better_exists() -> None:
    outputs = [pooled("pooler_output"), OutputInfo("attn", ("b", 4, "s", "s"), "float")]

    assert choose_embedding_output(outputs).output == "pooler_output"


def test_preferred_names_are_matched_case_insensitively_and_keep_their_spelling() -> None:
    choice = choose_embedding_output([tokens("Last_Hidden_State"), tokens("other")])

    assert choice.output == "Last_Hidden_State"


def test_non_float_and_other_rank_outputs_are_not_candidates() -> None:
    outputs = [
        OutputInfo("ids", ("batch", "sequence"), "int64"),
        OutputInfo("scalar", (), "float"),
        OutputInfo("attentions", ("b", 4, "s", "s"), "float"),
        OutputInfo("half", ("batch", "sequence", 8), "float16"),
    ]

    choice = choose_embedding_output(outputs)

    assert (choice.output, choice.index, choice.pooling) == ("half", 3, "mean")


def test_a_named_output_always_wins() -> None:
    outputs = [pooled("sentence_embedding"), tokens("token_embeddings")]

    choice = choose_embedding_output(outputs, name="token_embeddings")

    assert (choice.output, choice.index, choice.pooling) == ("token_embeddings", 1, "mean")
    assert choice.reason == "named by the publisher (token embeddings, mean-pooled)"


def test_a_named_output_takes_the_cls_pooling_asked_for() -> None:
    choice = choose_embedding_output([tokens("a"), tokens("b")], name="b", pooling="cls")

    assert (choice.output, choice.pooling) == ("b", "cls")


def test_pooling_hint_alone_narrows_the_candidates_by_rank() -> None:
    outputs = [pooled("sentence_embedding"), tokens("token_embeddings")]

    assert choose_embedding_output(outputs, pooling="cls").output == "token_embeddings"
    assert choose_embedding_output(outputs, pooling="mean").pooling == "mean"
    assert choose_embedding_output(outputs, pooling="none").output == "sentence_embedding"


def test_a_named_output_without_a_shape_needs_a_pooling() -> None:
    unknown = [OutputInfo("x", None, "float")]

    with pytest.raises(EmbeddingChoiceError, match="pass --pooling"):
        choose_embedding_output(unknown, name="x")
    assert choose_embedding_output(unknown, name="x", pooling="cls").pooling == "cls"


# --- refusals -----------------------------------------------------------------------------------


def test_two_unrelated_token_outputs_without_a_hint_are_ambiguous() -> None:
    outputs = [tokens("hidden_a", 16), tokens("hidden_b", 8)]

    with pytest.raises(EmbeddingChoiceError) as caught:
        choose_embedding_output(outputs)

    message = str(caught.value)
    assert "hidden_a (batch, sequence, 16) float" in message
    assert "hidden_b (batch, sequence, 8) float" in message
    assert "--output NAME" in message
    assert "embedding_output" in message


def test_no_float_output_of_rank_2_or_3_is_refused() -> None:
    outputs = [OutputInfo("logits", ("batch",), "float"), OutputInfo("ids", ("b", "s"), "int64")]

    with pytest.raises(EmbeddingChoiceError, match=r"no output holds embeddings.*logits \(batch\)"):
        choose_embedding_output(outputs)


def test_outputs_without_shapes_are_refused_naming_them() -> None:
    with pytest.raises(EmbeddingChoiceError, match="x declare no shape"):
        choose_embedding_output([OutputInfo("x", None, "float")])


def test_a_named_output_that_does_not_exist_is_refused_listing_the_outputs() -> None:
    with pytest.raises(EmbeddingChoiceError) as caught:
        choose_embedding_output([tokens("last_hidden_state")], name="sentence_embedding")

    assert "no output named 'sentence_embedding'" in str(caught.value)
    assert "last_hidden_state (batch, sequence, 8) float" in str(caught.value)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_token_pooling_on_a_pooled_output_is_refused(pooling: str) -> None:
    with pytest.raises(EmbeddingChoiceError, match=f"--pooling {pooling} needs token embeddings"):
        choose_embedding_output([pooled("vec")], name="vec", pooling=pooling)


def test_pooling_none_on_token_embeddings_is_refused() -> None:
    with pytest.raises(EmbeddingChoiceError, match="pass --pooling mean or cls"):
        choose_embedding_output([tokens("t")], name="t", pooling="none")


def test_a_pooling_hint_no_output_fits_is_refused() -> None:
    with pytest.raises(
        EmbeddingChoiceError, match=r"--pooling mean needs .*\(batch, seq, hidden\)"
    ):
        choose_embedding_output([pooled("vec")], pooling="mean")


def test_unknown_pooling_names_non_float_and_wrong_rank_outputs_are_refused() -> None:
    with pytest.raises(EmbeddingChoiceError, match="'max' is not one of mean, cls, none"):
        choose_embedding_output([tokens("t")], pooling="max")
    with pytest.raises(EmbeddingChoiceError, match="not a float tensor"):
        choose_embedding_output([OutputInfo("ids", ("b", "s", 4), "int64")], name="ids")
    with pytest.raises(EmbeddingChoiceError, match="has rank 4"):
        choose_embedding_output([OutputInfo("a", ("b", 1, 2, 3), "float")], name="a")
    with pytest.raises(EmbeddingChoiceError, match="declares no outputs"):
        choose_embedding_output([])


# --- pooling, parity and metadata ---------------------------------------------------------------


def test_pool_mean_cls_and_none() -> None:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    mean = pool(hidden, mask, EmbeddingChoice("t", 0, "mean", ""))
    cls = pool(hidden, mask, EmbeddingChoice("t", 0, "cls", ""))
    same = pool(hidden[:, 0, :], mask, EmbeddingChoice("p", 0, "none", ""))

    np.testing.assert_allclose(mean, mean_pooled(hidden, mask))
    np.testing.assert_allclose(mean[0], hidden[0, :3].astype(np.float64).mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(cls, hidden[:, 0, :])
    np.testing.assert_allclose(same, hidden[:, 0, :])
    assert same.dtype == np.float64


def test_pool_refuses_a_value_whose_shape_contradicts_the_choice() -> None:
    mask = np.ones((8, 32), dtype=np.int64)

    # the crash this module exists for: a pooled (8, 32) output treated as token embeddings
    with pytest.raises(EmbeddingChoiceError, match=r"returned shape \(8, 32\).*expects rank 3"):
        pool(np.zeros((8, 32), np.float32), mask, EmbeddingChoice("s", 0, "mean", ""))
    with pytest.raises(EmbeddingChoiceError, match="does not match the attention mask"):
        pool(np.zeros((8, 7, 4), np.float32), mask, EmbeddingChoice("s", 0, "mean", ""))
    with pytest.raises(EmbeddingChoiceError, match="expects rank 2"):
        pool(np.zeros((8, 32, 4), np.float32), mask, EmbeddingChoice("s", 0, "none", ""))


def test_encoder_parity_on_the_chosen_pooled_output() -> None:
    rng = np.random.default_rng(1)
    parent = [rng.standard_normal((8, 32)).astype(np.float32)]
    masks = [np.ones((8, 5), dtype=np.int64)]
    choice = EmbeddingChoice("sentence_embedding", 0, "none", "")

    same = encoder_parity(parent, parent, masks, pool=choice.pooled)
    flipped = encoder_parity(parent, [-parent[0]], masks, pool=choice.pooled)

    assert same.cosine_mean == pytest.approx(1.0)
    assert flipped.cosine_mean == pytest.approx(-1.0)
    assert same.count == 8


def test_metadata_round_trip_and_bad_metadata() -> None:
    choice = EmbeddingChoice("sentence_embedding", 0, "none", "")

    assert hints_from_metadata(choice.metadata()) == ("sentence_embedding", "none")
    assert hints_from_metadata({}) == (None, None)
    with pytest.raises(EmbeddingChoiceError, match=r"metadata slmops\.pooling 'max' is not one of"):
        hints_from_metadata({"slmops.pooling": "max"})


def test_outputs_from_onnx_and_from_ort() -> None:
    from onnx import TensorProto, helper

    graph_outputs = [
        helper.make_tensor_value_info("t", TensorProto.FLOAT, ["batch", None, 8]),
        helper.make_tensor_value_info("ids", TensorProto.INT64, None),
        helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None),
    ]
    ort_outputs = [
        SimpleNamespace(name="s", shape=["batch", 384], type="tensor(float)"),
        SimpleNamespace(name="m", shape=None, type="map(int64,tensor(float))"),
    ]

    assert outputs_from_onnx(graph_outputs) == [
        OutputInfo("t", ("batch", None, 8), "float"),
        OutputInfo("ids", None, "int64"),
        OutputInfo("seq", None, "non-tensor"),
    ]
    assert outputs_from_ort(ort_outputs) == [
        OutputInfo("s", ("batch", 384), "float"),
        OutputInfo("m", None, "non-tensor"),
    ]
