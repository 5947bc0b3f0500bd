"""Recipe loading, dotted overrides and the errors for bad keys and values."""

import pytest
import yaml

from megadistill.config import load_config, save_config


def write_recipe(tmp_path, body: dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_recipe_and_overrides(tmp_path):
    recipe = write_recipe(tmp_path, {"data": {"train_prefixes": ["a"]}, "train": {"max_steps": 7}})
    cfg = load_config(recipe, ["train.max_steps=9", "loss.temperature=2", "student.layer_map=[0, 3]", "optim.lr=1e-3"])
    assert cfg.train.max_steps == 9
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert cfg.student.layer_map == [0, 3]
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.data.train_prefixes == ["a"]


def test_unknown_key_suggests_closest(tmp_path):
    recipe = write_recipe(tmp_path, {"data": {"train_prefixes": ["a"]}})
    with pytest.raises(ValueError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(recipe, ["train.max_step=3"])
    with pytest.raises(ValueError, match="unknown config key 'trian'"):
        load_config(recipe, ["trian.max_steps=3"])


def test_wrong_type_and_range(tmp_path):
    recipe = write_recipe(tmp_path, {"data": {"train_prefixes": ["a"]}})
    with pytest.raises(ValueError, match="train.max_steps' expects int"):
        load_config(recipe, ["train.max_steps=many"])
    with pytest.raises(ValueError, match="loss.temperature must be > 0"):
        load_config(recipe, ["loss.temperature=0"])
    with pytest.raises(ValueError, match="not key=value"):
        load_config(recipe, ["train.max_steps"])


def test_missing_recipe_and_empty_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="train_prefixes is empty"):
        load_config(None, [])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.train_prefixes=[x]", "train.precision=bf16"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
