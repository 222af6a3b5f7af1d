"""all-MiniLM-L6-v2 (real weights, offline) against transformers on real reviews."""

import numpy as np
import pytest

import prism_jax as pj
from prism_jax.data import sources
from tests.conftest import ATOL_MODEL


@pytest.fixture(scope="module")
def minilm():
    return pj.load_pretrained(sources.minilm_dir())


@pytest.fixture(scope="module")
def reviews():
    texts, _ = sources.fine_food_reviews("test")
    return texts[:6]


def test_tokenizer_matches_transformers(minilm, reviews):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(sources.minilm_dir())(
        reviews, padding=True, truncation=True, max_length=128, return_tensors="np"
    )
    ours = minilm.tokenizer(reviews, max_length=128)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(ours[key], ref[key])


def test_hidden_states_match_transformers(minilm, reviews):
    import torch
    from transformers import BertModel

    batch = minilm.tokenizer(reviews, max_length=128)
    torch_model = BertModel.from_pretrained(sources.minilm_dir()).eval()
    with torch.no_grad():
        ref = torch_model(**{k: torch.tensor(v) for k, v in batch.items()})
    out = pj.infer(minilm, batch)
    np.testing.assert_allclose(
        out["last_hidden_state"], ref.last_hidden_state.numpy(), atol=ATOL_MODEL, rtol=0
    )
    np.testing.assert_allclose(out["pooler_output"], ref.pooler_output.numpy(), atol=ATOL_MODEL)
    four = pj.infer(minilm, batch, mesh=pj.edge_mesh(4), plan=pj.Plan(cr=1))
    np.testing.assert_allclose(
        four["last_hidden_state"], ref.last_hidden_state.numpy(), atol=ATOL_MODEL, rtol=0
    )


def test_fine_food_reviews_split_sizes():
    train, test = sources.fine_food_reviews("train"), sources.fine_food_reviews("test")
    assert (len(train[0]), len(test[0])) == (4000, 1000)
    assert 0.6 < np.mean(test[1]) < 0.7 and set(test[1]) == {0, 1}
    assert all(isinstance(t, str) and t for t in train[0])
    with pytest.raises(pj.PrismError, match="unknown split"):
        sources.fine_food_reviews("dev")


def test_pickle_strings_never_executes():
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('executed')",))

    payload = pickle.dumps(["a", Boom(), "a", "b"], protocol=4)
    strings = sources.pickle_strings(payload)  # would raise SystemExit if it ran the payload
    assert strings[0] == "a" and strings[-2:] == ["a", "b"]
    assert "raise SystemExit('executed')" in strings
