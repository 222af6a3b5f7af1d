"""Plan and config validation."""

import pytest

import prism_jax as pj


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cr": 0}, "compression rate must be an integer >= 1"),
        ({"cr": 2.5}, "compression rate"),
        ({"strategy": "ring"}, "unknown strategy"),
        ({"logit_bias": "sqrt"}, "unknown logit_bias"),
    ],
)
def test_plan_rejects_bad_values(kwargs, message):
    with pytest.raises(pj.PrismError, match=message):
        pj.Plan(**kwargs)


def test_plan_segments():
    assert pj.Plan(cr=4).segments(10) == 3
    assert pj.Plan(cr=1).segments(7) == 7


def test_presets_have_the_papers_sizes():
    bert = pj.PRESETS["bert-base"]()
    assert (bert.width, bert.depth, bert.heads, bert.mlp_width) == (768, 12, 12, 3072)
    assert pj.PRESETS["vit-base-patch16-224"]().patches + 1 == 197
    assert pj.PRESETS["gpt2"]("lm").max_positions == 1024


def test_config_checks_heads_divide_width():
    with pytest.raises(pj.PrismError, match="not divisible"):
        pj.BertConfig(
            vocab_size=10,
            width=10,
            depth=1,
            heads=3,
            mlp_width=4,
            act="gelu",
            ln_eps=1e-12,
            max_positions=8,
        )
