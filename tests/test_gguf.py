"""GGUF out (tunelab export) and in (a local .gguf as model:), round-tripped through transformers' loader."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from conftest import tiny_config
from tunelab.models import ModelError, load_model, load_tokenizer, resolve_model
from tunelab.run import RunError, export, merge, train

PROMPT = "the sky is blue and the cat sat"


@pytest.fixture(scope="module")
def lora_run(tiny_llama, tmp_path_factory):
    from conftest import MEMO_ROWS, write_jsonl

    d = tmp_path_factory.mktemp("gguf-run")
    data = write_jsonl(d / "memo.jsonl", MEMO_ROWS * 4)
    return train(tiny_config(tiny_llama, data, d / "run", "lora", max_steps=4, lr=5e-2)).run_dir


def gguf_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}  # eager attention, as tunelab loads models on CPU: the same arithmetic
    return (
        AutoModelForCausalLM.from_pretrained(
            path.parent, dtype=torch.float32, attn_implementation="eager", **kw
        ).eval(),
        AutoTokenizer.from_pretrained(path.parent, **kw),
    )


def greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)


@pytest.mark.parametrize("ftype", ["f32", "f16", "bf16", "q8_0"])
def test_export_loads_back_with_the_merged_models_greedy_answers(lora_run, tmp_path, ftype):
    merged_dir = merge(lora_run, tmp_path / "merged")
    merged, tok = load_model(merged_dir).eval(), load_tokenizer(merged_dir)
    old = os.umask(0o022)
    try:
        out = export(lora_run, tmp_path / "out" / f"model-{ftype}.gguf", ftype=ftype)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644 and sorted(p.name for p in out.parent.iterdir()) == [out.name]
    back, back_tok = gguf_model(out)
    ids = torch.tensor([tok(PROMPT).input_ids])
    assert back_tok(PROMPT).input_ids == ids[0].tolist()  # the tokenizer travelled, merges and all
    assert back_tok.chat_template == tok.chat_template
    assert back_tok.eos_token == tok.eos_token and back_tok.bos_token == tok.bos_token
    with torch.no_grad():
        diff = (back(ids).logits - merged(ids).logits).abs().max().item()
    assert diff == 0.0 if ftype == "f32" else diff < 1.0  # f32 is exact; the others round the weights
    assert torch.equal(greedy(back, ids), greedy(merged, ids))


def test_export_never_overwrites_and_refuses_what_it_cannot_write(lora_run, tiny_gpt2, memo_data, tmp_path):
    taken = tmp_path / "taken.gguf"
    taken.write_text("the user's file")
    with pytest.raises(RunError, match="exists; export writes a new file"):
        export(lora_run, taken)
    assert taken.read_text() == "the user's file"
    with pytest.raises(RunError, match=r"--type q4: allowed: f32, f16, bf16, q8_0"):
        export(lora_run, tmp_path / "x.gguf", ftype="q4")
    gpt2 = train(tiny_config(tiny_gpt2, memo_data, tmp_path / "gpt2", "full", max_steps=1)).run_dir
    with pytest.raises(
        RunError, match=f"^{gpt2}: GGUF export writes the llama architecture; this model is 'gpt2'"
    ):
        export(gpt2, tmp_path / "gpt2.gguf")
    # a LoRA run is merged into a temporary directory first: the refusal still names the run
    gpt2_lora = train(tiny_config(tiny_gpt2, memo_data, tmp_path / "gpt2-lora", "lora", max_steps=1)).run_dir
    with pytest.raises(RunError, match=f"^{gpt2_lora}: GGUF export writes the llama architecture"):
        export(gpt2_lora, tmp_path / "gpt2.gguf")
    assert not (tmp_path / "gpt2.gguf").exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_local_gguf_trains_as_model_converted_once(lora_run, tiny_llama, memo_data, tmp_path):
    source = export(lora_run, tmp_path / "base.gguf", ftype="f32")
    model_dir = resolve_model(str(source))
    assert model_dir.parent.name == "gguf" and (model_dir / "model.safetensors").is_file()
    assert resolve_model(str(source)) == model_dir  # cached: not converted again
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(load_model(model_dir)(ids).logits, gguf_model(source)[0](ids).logits)
    run = train(tiny_config(source, memo_data, tmp_path / "run", "lora", max_steps=2))
    assert run.summary["train"]["steps"] == 2 and run.summary["model"] == str(model_dir)


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_one_clear_error(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "nonsense")
    w.add_name("odd")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(
        ModelError, match=r"odd.gguf: transformers cannot load this GGUF .*architectures it reads: .*llama"
    ):
        resolve_model(str(tmp_path / "odd.gguf"))


def test_the_export_verb_writes_the_file_and_refuses_in_one_line(lora_run, tmp_path):
    import subprocess
    import sys

    def tunelab(*args):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.run(
            [sys.executable, "-m", "tunelab.cli", *args], capture_output=True, text=True, env=env
        )

    p = tunelab("-q", "export", str(lora_run), str(tmp_path / "m.gguf"), "--type", "q8_0")
    assert p.returncode == 0 and (tmp_path / "m.gguf").stat().st_size > 0, p.stderr[-2000:]
    p = tunelab("export", str(lora_run), str(tmp_path / "m.gguf"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "exists" in p.stderr
    # a GGUF as the model, converted on first use: under -q not even the conversion's bar is drawn
    data = lora_run / "config.yaml"
    p = tunelab(
        "-q", "eval", str(tmp_path / "m.gguf"), "--data", yaml.safe_load(data.read_text())["data"]["train"]
    )
    assert p.returncode == 0 and p.stderr == "", p.stderr[-2000:]
