"""run.toml: strict loading with errors that name the key."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import run_config
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
    ('[averaging]\n"\\n" = 1\n', "unknown key 'averaging.\\n'"),  # quoted, so the error stays one line
    ("[training]\ntarget_batch_size = 'many'\n", "training.target_batch_size must be int, got str"),
    ("[training]\ntarget_batch_size = true\n", "training.target_batch_size must be int"),
    ("[training]\noptimizer = 'sgdm'\n", "training.optimizer must be one of"),
    ("[averaging]\ncompression = 'zip'\n", "averaging.compression must be one of"),
    ("[averaging]\naveraging_timeout = 20\npart_timeout = 30\n", "averaging.part_timeout must be positive and at most"),
    ("[training]\nlr = inf\n", "training.lr must be a finite number, got inf"),
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


def _known_keys() -> dict[str, list[str]]:
    """Section name -> key names, from the dataclasses behind run.toml."""
    sections = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    return {name: [f.name for f in dataclasses.fields(getattr(run_config, kind))]
            for name, kind in sections.items() if isinstance(kind, str) and hasattr(run_config, kind)}


SECTIONS = _known_keys()
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
              st.sampled_from(["tiny", "demo", "adamw", "adaptive-8bit", "open", "token", "fp16", "none", "batch",
                              "diloco", "blockwise-4bit", "sgd"])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)),
    max_leaves=6,
)
sections = st.dictionaries(
    st.sampled_from(sorted(SECTIONS) + ["run_id", "extra"]),
    st.one_of(values, st.dictionaries(st.sampled_from(sum(SECTIONS.values(), []) + ["bogus"]), values, max_size=4)),
    max_size=4,
)


@settings(max_examples=400, deadline=None)
@given(data=sections)
def test_any_document_loads_or_names_what_is_wrong(data):
    try:
        run = RunConfig.from_dict(data, source="fuzz.toml")
    except RunConfigError as error:
        assert str(error).startswith("fuzz.toml") and "\n" not in str(error)
    else:
        assert RunConfig.from_dict(run.to_dict()) == run


@settings(max_examples=200, deadline=None)
@given(text=st.binary(max_size=200))
def test_any_file_loads_or_names_what_is_wrong(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "run.toml"
    path.write_bytes(text)
    try:
        RunConfig.load(path)
    except RunConfigError as error:
        assert str(path) in str(error)


def test_training_key_separates_what_peers_must_agree_on():
    base = RunConfig()
    key = base.training_key()
    assert key.startswith(f"{base.run_id}_") and key == RunConfig().training_key()
    disagreeing = [
        dataclasses.replace(base, run_id="another-run"),
        dataclasses.replace(base, model=dataclasses.replace(base.model, preset="tiny")),
        dataclasses.replace(base, model=dataclasses.replace(base.model, overrides={"num_hidden_layers": 3})),
        dataclasses.replace(base, data=dataclasses.replace(base.data, seq_len=64)),
        dataclasses.replace(base, training=dataclasses.replace(base.training, lr=1e-3)),
        dataclasses.replace(base, training=dataclasses.replace(base.training, target_batch_size=128)),
    ]
    assert len({key, *(config.training_key() for config in disagreeing)}) == 1 + len(disagreeing)
    local_choices = [
        dataclasses.replace(base, model=dataclasses.replace(base.model, kernels="torch")),
        dataclasses.replace(base, data=dataclasses.replace(base.data, path="/data/plays")),
        dataclasses.replace(base, averaging=dataclasses.replace(base.averaging, matchmaking_time=9.0)),
        dataclasses.replace(base, coordinator=dataclasses.replace(base.coordinator, checkpoint_every=3)),
    ]
    assert all(config.training_key() == key for config in local_choices)
