"""run.toml: strict loading with errors that name the key."""

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer import run_config
from peer.run_config import ObjectiveSection, RunConfig, RunConfigError


def write(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    run = RunConfig.load(
        write(
            tmp_path,
            """
run_id = "my-run"
[model]
preset = "tiny"
overrides = { num_hidden_layers = 3 }
[training]
target_batch_size = 128
lr = 1
""",
        )
    )
    assert run.run_id == "my-run" and run.training.target_batch_size == 128
    assert run.training.lr == 1.0 and isinstance(run.training.lr, float)
    assert run.model_config().num_hidden_layers == 3
    assert run.averaging.compression == "adaptive-8bit"
    assert RunConfig.from_dict(run.to_dict()) == run


@pytest.mark.parametrize(
    "text, culprit",
    [
        ("[training]\nlrr = 0.1\n", "unknown key 'training.lrr'"),
        ("colour = 'blue'\n", "unknown key 'colour'"),
        ('[averaging]\n"\\n" = 1\n', "unknown key 'averaging.\\n'"),  # quoted, so the error stays one line
        ("[training]\ntarget_batch_size = 'many'\n", "training.target_batch_size must be int, got str"),
        ("[training]\ntarget_batch_size = true\n", "training.target_batch_size must be int"),
        ("[training]\noptimizer = 'sgdm'\n", "training.optimizer must be one of"),
        ("[averaging]\ncompression = 'zip'\n", "averaging.compression must be one of"),
        ("[averaging]\ngroup_key_bits = 20\n", "averaging.group_key_bits must be in [0, 16]"),
        (
            "[averaging]\naveraging_timeout = 20\npart_timeout = 30\n",
            "averaging.part_timeout must be positive and at most",
        ),
        ("[training]\nlr = inf\n", "training.lr must be a finite number, got inf"),
        ("[model]\npreset = 'tiny'\noverrides = { num_key_value_heads = 3 }\n", "[model] does not validate"),
        ("[model]\npreset = 'gpt-5'\n", "unknown preset 'gpt-5'"),
        ("training = 3\n", "[training] must be a table"),
        ("run_id = 'a b'\n", "run_id must be"),
        ("[training\n", "not valid TOML"),
        ("[objective]\nkind = 'rlhf'\n", "objective.kind must be one of pretrain, sft, distill"),
        ("[objective]\nkind = 'sft'\n", 'objective.kind = "sft" needs a model of at least 32768 tokens'),
        ("[objective]\nkind = 'distill'\n", "objective.teacher_sha256 must be the SHA-256 of the teacher's weights"),
        ("[objective]\nteacher = 'teachers/t'\n", 'objective.teacher must be set only when objective.kind = "distill"'),
        (
            "[objective]\nkind = 'distill'\nteacher = 't'\nteacher_sha256 = 'abc'\n",
            "objective.teacher_sha256 must be the SHA-256 of the teacher's weights (64 lowercase hex digits)",
        ),
        ("[objective]\ntemperature = 0\n", "objective.temperature must be positive"),
        ("[objective]\nkl_weight = 1.5\n", "objective.kl_weight must be in [0, 1]"),
    ],
)
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
    return {
        name: [f.name for f in dataclasses.fields(getattr(run_config, kind))]
        for name, kind in sections.items()
        if isinstance(kind, str) and hasattr(run_config, kind)
    }


SECTIONS = _known_keys()
values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.sampled_from(
            [
                "tiny",
                "demo",
                "adamw",
                "adaptive-8bit",
                "open",
                "token",
                "fp16",
                "none",
                "batch",
                "diloco",
                "blockwise-4bit",
                "sgd",
            ]
        ),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
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


DISTILL = ObjectiveSection(kind="distill", teacher="teachers/t", teacher_sha256="ab" * 32)


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
        dataclasses.replace(base, objective=DISTILL),
        dataclasses.replace(base, objective=dataclasses.replace(base.objective, kind="sft")),
        dataclasses.replace(base, objective=dataclasses.replace(DISTILL, teacher_sha256="cd" * 32)),
        dataclasses.replace(base, objective=dataclasses.replace(DISTILL, temperature=1.0)),
    ]
    assert len({key, *(config.training_key() for config in disagreeing)}) == 1 + len(disagreeing)
    local_choices = [
        dataclasses.replace(base, model=dataclasses.replace(base.model, kernels="torch")),
        dataclasses.replace(base, data=dataclasses.replace(base.data, path="/data/plays")),
        dataclasses.replace(base, averaging=dataclasses.replace(base.averaging, matchmaking_time=9.0)),
        dataclasses.replace(base, coordinator=dataclasses.replace(base.coordinator, checkpoint_every=3)),
    ]
    assert all(config.training_key() == key for config in local_choices)
    # The teacher is agreed on by its digest; where each peer keeps it is its own choice.
    elsewhere = dataclasses.replace(base, objective=dataclasses.replace(DISTILL, teacher="/elsewhere"))
    assert elsewhere.training_key() == dataclasses.replace(base, objective=DISTILL).training_key()


EXAMPLE = Path(__file__).parents[2] / "coordinator" / "run.example.toml"
# A commented-out option or section header of the example: "# key = value", "# [section]".
COMMENTED_OUT = re.compile(r"^#\s*(?=\[\w+\]|\w+\s*=)", re.MULTILINE)


def _options(document: dict[str, Any]) -> dict[str, Any]:
    """A run config document's values by dotted key ("training.lr"), its sections flattened."""
    options = {}
    for name, value in document.items():
        if name in SECTIONS:
            options.update({f"{name}.{key}": item for key, item in value.items()})
        else:
            options[name] = value
    return options


def _example_options() -> tuple[dict[str, Any], set[str]]:
    """The options the example shows, by dotted key, its commented-out lines read as if they were not;
    and the keys of those commented-out lines."""
    text = EXAMPLE.read_text(encoding="utf-8")
    shown = _options(tomllib.loads(COMMENTED_OUT.sub("", text)))
    return shown, set(shown) - set(_options(tomllib.loads(text)))


DEFAULTS = _options(dataclasses.asdict(RunConfig()))


def test_the_example_run_config_shows_every_option_and_no_other():
    """coordinator/run.example.toml is where users look options up: each option of RunConfig is in
    it (set or commented out), and nothing else is."""
    shown, _ = _example_options()
    assert set(shown) == set(DEFAULTS), (
        f"not options of RunConfig: {sorted(set(shown) - set(DEFAULTS))}; "
        f"missing from the example: {sorted(set(DEFAULTS) - set(shown))}"
    )


def test_the_example_run_config_holds_the_defaults():
    """The example says "the values below are the defaults", so every value in it equals RunConfig's
    default, commented-out ones included (the [diloco] section is commented out only because it is
    refused outside DiLoCo mode). The one deliberate exception: a commented-out option whose default is
    None (model.init_from, data.path) shows what a value looks like, as there is no default to write.
    Loaded as it is, the example is the default run."""
    shown, commented = _example_options()
    differing = {
        key: (value, DEFAULTS[key])
        for key, value in shown.items()
        if key in DEFAULTS and value != DEFAULTS[key] and not (key in commented and DEFAULTS[key] is None)
    }
    assert differing == {}, f"(example, default) by key: {differing}"
    assert RunConfig.load(EXAMPLE) == RunConfig()
