"""Every run's model/ carries a model card: front matter a model hub reads, and the run's own figures."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import tiny_config
from tunelab.run import train


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.mark.parametrize("strategy, library", [("lora", "peft"), ("full", "transformers"), ("adapters", None)])
def test_the_card_records_the_run_as_summary_json_does(tiny_llama, memo_data, tmp_path, strategy, library):
    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", strategy, max_steps=3)
    cfg["eval"]["before"] = True
    run = train(cfg).run_dir
    summary = json.loads((run / "summary.json").read_text())
    card = (run / "model" / "README.md").read_text()
    meta = front_matter(card)
    # the library that loads the artefact on its own; none for tunelab's own parts (the card says how)
    assert meta.get("library_name") == library and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["tunelab", strategy]
    assert "base_model" not in meta  # a model known only by its path has no hub id to name
    t = meta["tunelab"]
    assert t["strategy"] == [strategy] and t["data"]["train"] == memo_data.name
    assert (
        t["eval"]["loss"] == summary["eval"]["loss"] and t["eval_before"]["loss"] == summary["eval_before"]["loss"]
    )
    assert t["training"]["steps"] == 3 == summary["train"]["steps"]
    assert t["parameters"]["trainable"] == summary["parameters"]["trainable"]
    assert t["forgetting"]["after"]["kl"] == summary["forgetting"]["after"]["kl"] > 0
    # and in prose: the scores table, before and after
    assert f"| loss | {summary['eval_before']['loss']:.4g} | {summary['eval']['loss']:.4g} |" in card
    kl = summary["forgetting"]
    assert f"| kl | {kl['before']['kl']:.4g} | {kl['after']['kl']:.4g} | {kl['delta']['kl']:.4g} |" in card
    assert ("AutoPeftModelForCausalLM" in card) == (library == "peft")
    assert ("tunelab.load_artefact(PATH, base=BASE)" in card) == (library is None)


def test_a_known_model_and_a_hub_named_one_give_their_hub_id(tmp_path):
    from tunelab.modelcard import base_model_id

    assert base_model_id("smollm2-135m-instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "org/some-model"}))
    assert base_model_id(str(tmp_path), tmp_path) == "org/some-model"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))
    assert base_model_id(str(tmp_path), tmp_path) is None


def test_push_uploads_model_dir_with_its_card_and_says_what_it_needs(tiny_llama, memo_data, tmp_path, monkeypatch):
    """The upload itself needs the network and a token (never in tests); what it would upload, and its
    refusals, are checked here."""
    import huggingface_hub

    from tunelab.run import RunError, push, push_files

    run = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=1)).run_dir
    files = push_files(run)
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(files)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunError, match="push needs the network, and HF_HUB_OFFLINE is set"):
        push(run, "someone/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # as on a machine never logged in
    with pytest.raises(RunError, match="push needs a Hugging Face token"):
        push(run, "someone/model")
    with pytest.raises(RunError, match="has no model/ with a model card"):
        push_files(tmp_path)
