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


# Regression tests for what fuzzing load_config found (issue 15): each error is one line of ValueError
# naming the file or the field, never a yaml/Unicode/Type/Overflow error with a traceback.


def test_broken_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  max_steps: 3\n   seed: 4\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml:3:8: invalid YAML: mapping values are not allowed here") as err:
        load_config(path)
    assert "\n" not in str(err.value) and err.value.__suppress_context__
    path.write_text("train: [1, 2\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml:2:1: invalid YAML: expected ',' or ']'"):
        load_config(path)


def test_unsafe_tag_and_non_utf8_recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("!!python/object:os.system {}\n")
    with pytest.raises(ValueError, match=r"recipe\.yaml:1:1: invalid YAML: could not determine a constructor"):
        load_config(path)
    path.write_bytes(b"train: \xff\n")
    with pytest.raises(ValueError, match=r"recipe .*recipe\.yaml: not UTF-8 text \(invalid start byte at byte 7\)"):
        load_config(path)


def test_missing_recipe_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"recipe .*nope\.yaml not found"):
        load_config(tmp_path / "nope.yaml")


def test_non_string_keys_are_value_errors(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("1: 2\n")
    with pytest.raises(ValueError, match=r"config key 1 is not a name \(a int\); valid keys: run_dir"):
        load_config(path)
    path.write_text("train:\n  null: 2\n")
    with pytest.raises(ValueError, match=r"config key train\.None is not a name .* valid keys of train: micro_batch_size"):
        load_config(path)


def test_broken_override_values_and_keys():
    with pytest.raises(ValueError, match=r"override train\.max_steps: column 2: invalid YAML"):
        load_config(None, ["train.max_steps=["])
    with pytest.raises(ValueError, match=r"override student\.layer_map: YAML nested too deeply"):
        load_config(None, ["student.layer_map=" + "[" * 10000])
    with pytest.raises(ValueError, match=r"override 'train\.\.x=1': empty key or key part"):
        load_config(None, ["train..x=1"])
    with pytest.raises(ValueError, match=r"override '=3': empty key"):
        load_config(None, ["=3"])


def test_floats_must_be_finite_and_fit():
    base = ["data.train_prefixes=[a]"]
    with pytest.raises(ValueError, match=r"'optim\.lr' expects a float, got an int too large for one \(1111"):
        load_config(None, base + ["optim.lr=" + "1" * 400])
    with pytest.raises(ValueError, match=r"'optim\.lr' expects a finite float, got inf"):
        load_config(None, base + ["optim.lr=.inf"])
    with pytest.raises(ValueError, match=r"'optim\.grad_clip' expects a finite float, got nan"):
        load_config(None, base + ["optim.grad_clip=.nan"])
    with pytest.raises(ValueError, match=r"'loss\.top_p' expects a finite float, got '1e999'"):
        load_config(None, base + ["loss.top_p=1e999"])


def test_layer_maps_and_optimizer_ranges():
    base = ["data.train_prefixes=[a]"]
    with pytest.raises(ValueError, match=r"student\.layer_map must be an int > 0, .* got \{'a': 1\}"):
        load_config(None, base + ["student.layer_map={a: 1}"])
    with pytest.raises(ValueError, match=r"student\.layer_map .* got \[0, 'x'\]"):
        load_config(None, base + ["student.layer_map=[0, x]"])
    with pytest.raises(ValueError, match=r"features\.layer_map must be student, uniform, 'last:k' .* got \[\[0\]\]"):
        load_config(None, base + ["features.layer_map=[[0]]"])
    assert load_config(None, base + ["features.layer_map=[[0, 0], [4, 17]]"]).features.layer_map == [[0, 0], [4, 17]]
    for override, message in [("optim.betas=[0.9, 1.5]", "optim.betas must have two values in"),
                              ("optim.eps=0", "optim.eps must be > 0"),
                              ("optim.weight_decay=-1", "optim.weight_decay must be >= 0"),
                              ("optim.grad_clip=-1", "optim.grad_clip must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            load_config(None, base + [override])


def test_long_values_are_cut_in_messages():
    with pytest.raises(ValueError) as err:
        load_config(None, ["train.max_steps=" + "x" * 10000])
    assert len(str(err.value)) < 200


def test_override_key_with_a_newline_stays_one_line():
    """Found by bench/fuzz.py: the key was printed raw, so the message spanned two lines."""
    with pytest.raises(ValueError, match=r"^override 0\\n0: column 1: invalid YAML: found undefined alias '0'$"):
        load_config(None, ["0\n0=*0"])
    with pytest.raises(ValueError, match=r"^override a\\nb\.c: a\\nb is not a section$") as err:
        load_config(None, ["a\nb=1", "a\nb.c=2"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"override train\.max_steps: line 2, column 1: invalid YAML"):
        load_config(None, ["train.max_steps=0\n:"])


def test_a_mapping_override_merges_into_its_section():
    from megadistill.config import load_config

    from pathlib import Path

    recipe = Path(__file__).resolve().parents[1] / "megadistill" / "recipes" / "quickstart.yaml"
    base = load_config(recipe, [])
    cfg = load_config(recipe, ["train={max_steps: 7}"])
    assert cfg.train.max_steps == 7
    assert cfg.train.micro_batch_size == base.train.micro_batch_size and cfg.train.seed == base.train.seed


def test_the_own_tokenizer_recipe_loads_and_validates():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[1] / "megadistill" / "recipes" / "own-tokenizer.yaml", [])
    assert cfg.student.tokenizer and len(cfg.data.student_train_prefixes) == len(cfg.data.train_prefixes) == 1


def test_own_tokenizer_needs_paired_prefixes_and_an_online_teacher(tmp_path):
    body = {"student": {"tokenizer": "tok"}, "data": {"train_prefixes": ["a"], "valid_prefixes": ["v"],
                                                     "student_train_prefixes": ["sa"], "student_valid_prefixes": ["sv"]}}
    cfg = load_config(write_recipe(tmp_path, body), [])
    assert cfg.student.tokenizer == "tok" and cfg.loss.cross_tokenizer == "span" and cfg.student.embedding_init == "mean"
    with pytest.raises(ValueError, match="needs data.student_train_prefixes, one per data.train_prefixes entry"):
        load_config(write_recipe(tmp_path, body), ["data.student_train_prefixes=[]"])
    with pytest.raises(ValueError, match="needs data.student_valid_prefixes"):
        load_config(write_recipe(tmp_path, body), ["data.student_valid_prefixes=[]"])
    with pytest.raises(ValueError, match="runs the teacher online"):
        load_config(write_recipe(tmp_path, body), ["teacher.mode=offline", "teacher.logit_cache=c"])
    with pytest.raises(ValueError, match="loss.cross_tokenizer must be span or uld"):
        load_config(write_recipe(tmp_path, body), ["loss.cross_tokenizer=gold"])
    with pytest.raises(ValueError, match="student.embedding_init must be mean or random"):
        load_config(write_recipe(tmp_path, body), ["student.embedding_init=focus"])
    with pytest.raises(ValueError, match="builds a new student"):
        load_config(write_recipe(tmp_path, body), ["student.init=checkpoint", "student.checkpoint=x"])
