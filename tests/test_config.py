"""The job spec: validation errors name the key path and what was expected."""

from __future__ import annotations

import pytest

from raycls.config import EMBEDDED_MODEL, VLLMConfig, load_spec, parse_spec
from raycls.errors import SpecError

MINIMAL = {"input": {"path": "data.jsonl"}, "labels": ["a", "b"], "output": {"path": "out"}}


def spec_with(**changes):
    data = {**MINIMAL, **changes}
    return parse_spec(data)


def test_minimal_spec_defaults_to_the_embedded_vllm_model():
    spec = parse_spec(MINIMAL)
    assert isinstance(spec.backend, VLLMConfig)
    assert spec.backend.model == EMBEDDED_MODEL
    assert spec.label_names == ["a", "b"]
    assert spec.checkpoint_path == "out/_checkpoint"


def test_unknown_key_is_named_with_its_path():
    with pytest.raises(SpecError) as err:
        spec_with(input={"path": "x", "colour": "red"})
    assert err.value.key == "input.colour"
    assert "unknown key" in str(err.value)


def test_unknown_backend_key_is_named_without_the_union_tag():
    with pytest.raises(SpecError) as err:
        spec_with(backend={"kind": "vllm", "engnes": 2})
    assert err.value.key == "backend.engnes"


def test_wrong_type_names_key_and_value():
    with pytest.raises(SpecError) as err:
        spec_with(backend={"kind": "vllm", "engines": "many"})
    assert err.value.key == "backend.engines"
    assert "'many'" in str(err.value)


def test_out_of_range_value_says_the_bound():
    with pytest.raises(SpecError) as err:
        spec_with(backend={"kind": "vllm", "engines": 0})
    assert err.value.key == "backend.engines"
    assert "greater than or equal to 1" in str(err.value)


def test_missing_required_key_is_named():
    with pytest.raises(SpecError) as err:
        parse_spec({"input": {"path": "x"}, "labels": ["a", "b"]})
    assert err.value.key == "output"
    assert "missing" in str(err.value)


def test_unknown_backend_kind_is_rejected():
    with pytest.raises(SpecError) as err:
        spec_with(backend={"kind": "llamacpp"})
    assert err.value.key == "backend"


def test_duplicate_labels_are_rejected():
    with pytest.raises(SpecError, match="unique"):
        spec_with(labels=["a", "a"])


def test_few_shot_label_must_be_in_the_label_set():
    with pytest.raises(SpecError, match=r"few_shot\[0\]\.label 'c'"):
        spec_with(few_shot=[{"text": "t", "label": "c"}])


def test_labels_accept_names_and_descriptions():
    spec = spec_with(labels=["a", {"name": "b", "description": "the second"}])
    assert spec.labels[1].description == "the second"


def test_literal_api_key_is_rejected_without_echoing_it():
    backend = {"kind": "openai", "base_url": "http://x", "model": "m", "api_keys": ["sk-LITERAL-123"]}
    with pytest.raises(SpecError) as err:
        spec_with(backend=backend)
    assert err.value.key == "backend.api_keys"
    assert "sk-LITERAL-123" not in str(err.value)


def test_set_overrides_parse_values_as_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: a.jsonl}\nlabels: [x, y]\noutput: {path: out}\n")
    spec = load_spec(path, ["backend.batch_size=64", "input.gold_column=label"], **{"output.path": "/tmp/o", "limit": 5})
    assert spec.backend.batch_size == 64
    assert spec.input.gold_column == "label"
    assert spec.output.path == "/tmp/o"
    assert spec.limit == 5


def test_set_override_without_equals_is_an_error(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: {path: a.jsonl}\nlabels: [x, y]\noutput: {path: out}\n")
    with pytest.raises(SpecError, match="KEY=VALUE"):
        load_spec(path, ["backend.batch_size"])


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("input: [unclosed\n")
    with pytest.raises(SpecError, match="job.yaml is not valid YAML"):
        load_spec(path)


def test_gpu_device_without_gpus_per_engine_names_the_key():
    with pytest.raises(SpecError) as err:
        spec_with(backend={"kind": "vllm", "device": "gpu", "gpus_per_engine": 0})
    assert err.value.key == "backend.device"
    assert "gpus_per_engine" in str(err.value)


def test_device_chooses_engines_without_asking_the_cluster():
    from raycls.backends.vllm import engines_on_gpu

    assert engines_on_gpu(spec_with(backend={"kind": "vllm", "device": "gpu"}).backend)
    assert not engines_on_gpu(spec_with(backend={"kind": "vllm", "device": "cpu"}).backend)
    assert not engines_on_gpu(spec_with(backend={"kind": "vllm", "gpus_per_engine": 0}).backend)


def test_engine_kwargs_max_model_len_becomes_the_backends():
    spec = parse_spec({**MINIMAL, "backend": {"engine_kwargs": {"max_model_len": 512}}})
    assert spec.backend.max_model_len == 512


def test_engine_kwargs_max_model_len_cannot_disagree_with_the_backends():
    with pytest.raises(SpecError) as err:
        parse_spec({**MINIMAL, "backend": {"max_model_len": 1024, "engine_kwargs": {"max_model_len": 512}}})
    assert err.value.key == "backend.engine_kwargs.max_model_len" and "1024" in str(err.value)
