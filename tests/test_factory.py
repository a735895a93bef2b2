import json

import pytest

from prima.config import PrimaConfig
from prima.errors import ConfigError
from prima.factory import create_model, get_model_config, list_models
from prima.labels import default_label_space

PAPER_VISUAL_PARAMETERS = 56_584_305  # docs/design.md §3 (paper: 56.584 M)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_shipped_models():
    assert list_models() == ["prima-lite", "prima-lite-head", "prima-paper"]


def test_paper_visual_encoder_matches_the_paper_within_one_percent():
    model = create_model("prima-paper")
    visual = _count(model.visual)
    assert abs(visual - PAPER_VISUAL_PARAMETERS) / PAPER_VISUAL_PARAMETERS < 0.01, visual
    # the parts docs/design.md §3 measured on the reference code (M parameters, 2 decimals)
    parts = {
        "sequence_vit": 32.60,
        "study_vit": 18.13,
        "patdis_proj": 2.95,
        "series_name_encoder": 1.37,
        "description_encoder": 1.53,
    }
    for name, reference in parts.items():
        assert _count(getattr(model.visual, name)) / 1e6 == pytest.approx(reference, abs=0.3), name
    assert _count(model.visual.sequence_vit) == 32_601_712  # 15 x (289, 16 x 64, MLP 1024) + 20 registers -> 1024


def test_lite_is_much_smaller_and_keeps_the_token_width():
    config = get_model_config("prima-lite")
    assert config.vision.sequence.series_name.out_dim == 289
    assert _count(create_model(config).visual) < 5_000_000


def test_configs_carry_preprocessing_and_labels():
    config = get_model_config("prima-paper")
    assert config.preprocess.in_plane_size == 256 and config.preprocess.min_slice_spacing_mm == 4.0
    assert config.label_space == default_label_space()
    assert len(config.label_space.diagnoses) == 52


def test_config_json_round_trip():
    config = get_model_config("prima-lite")
    assert PrimaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ConfigError, match="prima-lite, prima-lite-head, prima-paper"):
        create_model("prima-huge")


def test_inconsistent_configs_raise_config_error():
    doc = get_model_config("prima-lite").to_dict()
    with pytest.raises(ConfigError, match="unknown keys"):
        PrimaConfig.from_dict({**doc, "colour": "blue"})
    doc["vision"]["study"]["description"]["out_dim"] = 7
    with pytest.raises(ConfigError, match="out_dim"):
        PrimaConfig.from_dict(doc)
    doc = get_model_config("prima-lite").to_dict()
    doc["diagnosis_thresholds"] = [0.0, 1.0]
    with pytest.raises(ConfigError, match="diagnosis_thresholds"):
        PrimaConfig.from_dict(doc)


def test_lite_head_is_lite_on_the_head_grid_reading_deviations_and_pooling_tokens():
    lite, head = (get_model_config(name).to_dict() for name in ("prima-lite", "prima-lite-head"))
    assert head["preprocess"]["grid"] == "head" and lite["preprocess"]["grid"] == "field_of_view"
    assert (head["vision"]["token_values"], lite["vision"]["token_values"]) == ("place_deviation", "latent")
    assert (head["heads"]["diagnosis_pool"], lite["heads"]["diagnosis_pool"]) == ("tokens", "embedding")
    for doc in (lite, head):
        del doc["name"], doc["preprocess"]["grid"], doc["vision"]["token_values"], doc["heads"]["diagnosis_pool"]
    assert lite == head
