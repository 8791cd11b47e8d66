import math

import pytest

from lorafit import FusedSlices, LoraConfig, LorafitError


def test_defaults_follow_the_seed():
    config = LoraConfig()
    assert config.r == 8 and config.dropout == 0.0 and config.init == "default"
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == pytest.approx(16 / 8)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoraConfig(r=16, alpha=8, use_rslora=True)
    assert config.scaling_for("q_proj") == pytest.approx(8 / math.sqrt(16))


def test_rank_and_alpha_patterns_use_suffix_and_regex_keys():
    config = LoraConfig(r=8, alpha=16, rank_pattern={"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
                        alpha_pattern={"v_proj": 32})
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 4
    assert config.alpha_for("model.layers.0.self_attn.v_proj") == 32
    assert config.rank_for("model.layers.1.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.11.self_attn.q_proj") == 8
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 8
    # a suffix must start at a dot: "proj" is not a suffix key of "q_proj"
    assert LoraConfig(rank_pattern={"proj": 2}).rank_for("model.q_proj") == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "r must be an integer >= 1"),
        ({"r": -3}, "r must be an integer >= 1"),
        ({"r": 2.5}, "r must be an integer >= 1"),
        ({"alpha": 0}, "alpha must be a number > 0"),
        ({"alpha": -1.0}, "alpha must be a number > 0"),
        ({"alpha": float("inf")}, "alpha must be finite"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"target_modules": []}, "target_modules is an empty list"),
        ({"target_modules": ["q_proj", ""]}, "every entry must be a non-empty module name"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"target_modules": 3}, "target_modules must be a list"),
        ({"exclude_modules": "all-linear"}, "exclude_modules"),
        ({"layers": [-1]}, "layers must be a block index"),
        ({"layers": []}, "layers must be a block index"),
        ({"layers_pattern": "layers"}, "layers_pattern is set but layers is not"),
        ({"rank_pattern": {"v_proj": 0}}, "rank_pattern['v_proj'] = 0"),
        ({"alpha_pattern": {"v_proj": -2}}, "alpha_pattern['v_proj'] = -2"),
        ({"rank_pattern": {"v_proj(": 2}}, "not a valid regular expression"),
        ({"init": "xavier"}, "init must be one of default, gaussian"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"fused_slices": {"qkv": 3}}, "fused_slices['qkv'] must be a FusedSlices"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(LorafitError) as err:
        LoraConfig(**kwargs)
    assert message in str(err.value)


def test_layers_accepts_a_single_index():
    assert LoraConfig(layers=3).layers == [3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"names": ("q", "k"), "sizes": (4,), "adapt": ("q",)}, "same length"),
        ({"names": ("q", "k"), "sizes": (4, 0), "adapt": ("q",)}, "positive integer"),
        ({"names": ("q", "k"), "sizes": (4, 4), "adapt": ()}, "adapt is empty"),
        ({"names": ("q", "k"), "sizes": (4, 4), "adapt": ("v",)}, "'v', which is not one of the slices"),
        ({"names": ("q", "k"), "sizes": (4, 4), "adapt": ("q", "q")}, "lists a slice twice"),
    ],
)
def test_fused_slices_validation(kwargs, message):
    with pytest.raises(LorafitError) as err:
        FusedSlices(**kwargs)
    assert message in str(err.value)


def test_fused_slices_rows_of_interleaved_layout():
    slices = FusedSlices(names=("q", "k", "v") * 2, sizes=(2, 2, 2) * 2, adapt=("q", "v"))
    assert slices.rows_of("q") == [0, 1, 6, 7]
    assert slices.rows_of("v") == [4, 5, 10, 11]
    assert slices.total_rows == 12


def test_fused_slices_from_plain_mapping():
    config = LoraConfig(fused_slices={"qkv": {"names": ["q", "k", "v"], "sizes": [4, 4, 4], "adapt": ["v"]}})
    assert config.slices_for("model.qkv") == FusedSlices(("q", "k", "v"), (4, 4, 4), ("v",))
