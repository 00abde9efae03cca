"""Model and tokenizer loading for evaluation: tokenizers come from gsa.data (the byte tokenizer itself is tested in
tests/data); a model folder's own tokenizer is found whichever kind it is; bad input is named."""

import importlib.util

import pytest

from gsa.data import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer
from gsa.eval.loading import load_causal_lm, model_tokenizer, resolve_dtype, resolve_device

has_mistral = importlib.util.find_spec("mistral_common") is not None


def test_the_model_folders_tokenizer_is_found_and_a_spec_overrides_it(model_dir, tmp_path):
    saved = model_tokenizer(model_dir)
    assert isinstance(saved, HFTokenizer) and saved.encode("ab") == [97 + 4, 98 + 4]
    assert isinstance(model_tokenizer(model_dir, "bytes"), ByteTokenizer)
    assert model_tokenizer(None, saved) is saved  # a tokenizer object is taken as it is
    with pytest.raises(ValueError, match="no tokenizer in the model folder .* --tokenizer bytes"):
        model_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="unknown tokenizer 'no/such/tokenizer'"):
        model_tokenizer(model_dir, "no/such/tokenizer")
    with pytest.raises(ValueError, match="model '.*missing' is not a folder"):  # not "no tokenizer in the folder"
        model_tokenizer(tmp_path / "missing")


def test_a_transformers_tokenizer_object_is_wrapped_with_the_same_ids(model_dir):
    from transformers import AutoTokenizer

    wrapped = model_tokenizer(None, AutoTokenizer.from_pretrained(model_dir))
    assert isinstance(wrapped, HFTokenizer)
    text = "Héllo, wörld! €"
    assert wrapped.encode(text) == ByteTokenizer().encode(text)
    assert (wrapped.bos_id, wrapped.eos_id) == (1, 2) and wrapped.fingerprint.startswith("hf-")


@pytest.mark.skipif(not has_mistral, reason="mistral-common not installed")
def test_a_bare_sentencepiece_tokenizer_model_is_read_with_sentencepiece(tmp_path):
    """What `gsa train --tokenizer mistral` saves beside the weights: tokenizer.model and nothing else."""
    load_tokenizer("mistral").save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.model"]
    tokenizer = model_tokenizer(tmp_path)
    assert isinstance(tokenizer, SentencePieceTokenizer) and (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    assert tokenizer.encode("Fair is foul") == load_tokenizer("mistral").encode("Fair is foul")


def test_load_causal_lm_reads_a_saved_folder_and_rejects_others(model_dir, tmp_path):
    model = load_causal_lm(model_dir, "cpu", "float32")
    assert not model.training and model.config.model_type == "gsa"
    with pytest.raises(ValueError, match="is not a folder"):
        load_causal_lm(tmp_path / "missing", "cpu")
    with pytest.raises(ValueError, match="has no config.json"):
        load_causal_lm(tmp_path, "cpu")


def test_devices_and_dtypes_are_checked():
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        resolve_dtype("float8", resolve_device("cpu"))


def test_a_gsa_folder_loads_our_class_when_another_package_registered_the_model_type(model_dir, monkeypatch):
    """flash-linear-attention registers its own GSA classes for model_type "gsa" with the Auto classes on import;
    our folders must still load as ours."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from gsa.models import GSAForCausalLM

    class OtherConfig(PretrainedConfig):
        model_type = "gsa"

    monkeypatch.setitem(CONFIG_MAPPING._extra_content, "gsa", OtherConfig)
    model = load_causal_lm(model_dir, device="cpu")
    assert type(model) is GSAForCausalLM
