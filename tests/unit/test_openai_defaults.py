"""/v1's sampling defaults: the model's generation_config.json over OpenAI's neutral values."""
import json

from hypothesis import given, strategies as st

from preprocess.contract import SETTINGS
from preprocess.sampling import OPENAI_NEUTRAL, model_sampling_defaults


def test_without_a_generation_config_the_defaults_are_openais(tmp_path):
    assert model_sampling_defaults(tmp_path) == OPENAI_NEUTRAL
    (tmp_path / "generation_config.json").write_text("{not json")
    assert model_sampling_defaults(tmp_path) == OPENAI_NEUTRAL


def test_the_models_sampling_fields_are_taken_and_the_rest_stays_neutral(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "do_sample": True,
         "max_new_tokens": 64, "eos_token_id": 2}))
    assert model_sampling_defaults(tmp_path) == {**OPENAI_NEUTRAL, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                                 "repetition_penalty": 1.05}


@given(st.dictionaries(st.sampled_from(["temperature", "top_p", "top_k", "repetition_penalty"]),
                       st.one_of(st.floats(allow_nan=True), st.integers(), st.booleans(), st.text(), st.none())))
def test_whatever_the_file_says_every_default_is_in_range(tmp_path_factory, config):
    folder = tmp_path_factory.mktemp("model")
    (folder / "generation_config.json").write_text(json.dumps(config))
    defaults = model_sampling_defaults(folder)
    assert set(defaults) == set(OPENAI_NEUTRAL)
    for name, value in defaults.items():
        assert SETTINGS[name].problem(value) is None, (name, value)
