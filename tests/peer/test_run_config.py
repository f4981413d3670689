"""run.toml: strict loading with errors that name the key."""

import pytest

from peer.run_config import RunConfig, RunConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    run = RunConfig.load(write(tmp_path, """
run_id = "my-run"
[model]
preset = "tiny"
overrides = { num_hidden_layers = 3 }
[training]
target_batch_size = 128
lr = 1
"""))
    assert run.run_id == "my-run" and run.training.target_batch_size == 128
    assert run.training.lr == 1.0 and isinstance(run.training.lr, float)
    assert run.model_config().num_hidden_layers == 3
    assert run.averaging.compression == "adaptive-8bit"
    assert RunConfig.from_dict(run.to_dict()) == run


@pytest.mark.parametrize("text, culprit", [
    ("[training]\nlrr = 0.1\n", "unknown key 'training.lrr'"),
    ("colour = 'blue'\n", "unknown key 'colour'"),
    ("[training]\ntarget_batch_size = 'many'\n", "training.target_batch_size must be int, got str"),
    ("[training]\ntarget_batch_size = true\n", "training.target_batch_size must be int"),
    ("[training]\noptimizer = 'sgd'\n", "training.optimizer must be one of"),
    ("[averaging]\ncompression = 'zip'\n", "averaging.compression must be one of"),
    ("[averaging]\naveraging_timeout = 20\npart_timeout = 30\n", "averaging.part_timeout must be positive and at most"),
    ("[model]\npreset = 'tiny'\noverrides = { num_key_value_heads = 3 }\n", "[model] does not validate"),
    ("[model]\npreset = 'gpt-5'\n", "unknown preset 'gpt-5'"),
    ("training = 3\n", "[training] must be a table"),
    ("run_id = 'a b'\n", "run_id must be"),
    ("[training\n", "not valid TOML"),
])
def test_bad_config_names_the_key(tmp_path, text, culprit):
    with pytest.raises(RunConfigError) as error:
        RunConfig.load(write(tmp_path, text))
    assert culprit in str(error.value) and "run.toml" in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(RunConfigError, match="no such file"):
        RunConfig.load(tmp_path / "absent.toml")
