"""The export stage: the merged model computes what the shared base with the adapter computes, and
its GGUF runs in llama.cpp with the same next-token logits.

    python -m pytest tests/test_export.py -q
"""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from cai_lite import adapter_files, models
from cai_lite.judge_llamacpp import load_gguf
from cai_lite.stages import export

from conftest import tiny_config

TEXT = "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"


def test_export_merges_the_adapter_and_writes_a_gguf(tmp_path, sharp_llama):
    cfg = tiny_config(tmp_path / "run", sharp_llama, "export.adapter=sft", "export.gguf_types=[f32,q8_0]",
                      "export.dtype=float32")
    base = models.load_base(cfg)
    models.add_adapter(base, "sft")
    with torch.no_grad():
        for n, p in base.model.named_parameters():
            if ".sft." in n and "lora_B" in n:
                p.normal_(0, 0.05)  # LoRA B starts at zero; make the adapter matter
    adapter_files.save_adapter(base, "sft", cfg.path / "sft" / "adapter")
    (cfg.path / "sft" / "stage.json").write_text("{}")
    assert export.check(cfg) == []
    (cfg.path / "export").mkdir()
    out = export.run(cfg, base, cfg.path / "export")
    ids = base.tokenizer(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad(), models.role(base, "sft") as m:
        shared = m(input_ids=ids).logits[0, -1].float()
        with models.no_adapter(base.model) as bare:
            assert not torch.allclose(bare(input_ids=ids).logits[0, -1].float(), shared, atol=1e-2)
    merged = AutoModelForCausalLM.from_pretrained(cfg.path / "export" / "hf", dtype=torch.float32)
    with torch.no_grad():
        hf = merged(input_ids=ids).logits[0, -1]
    # The merge lands on the de-quantized NF4 weights the adapter was trained on.
    assert (hf - shared).abs().max().item() < 1e-3
    llm = load_gguf(out["gguf"]["f32"]["path"], n_ctx=256, logits_all=False, verbose=False)
    try:
        tokens = llm.tokenize(TEXT.encode(), add_bos=False, special=True)
        assert tokens == ids[0].tolist()
        llm.eval(tokens)
        cpp = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()
    finally:
        llm.close()
    assert np.abs(cpp - hf.numpy()).max() < 1e-2  # measured 3.4e-3 on this sharp model (logits up to ~6)
    assert out["gguf"]["q8_0"]["bytes"] < out["gguf"]["f32"]["bytes"]
    # The ollama Modelfile points at the first type and carries the ChatML template (tests/test_modelfile.py).
    text = (cfg.path / "export" / "Modelfile").read_text()
    assert "FROM ./model-f32.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text and "<|im_start|>" in text


def test_gguf_types_are_validated() -> None:
    from cai_lite.gguf_export import GGUF_TYPES
    from cai_lite.recipe import GGUF_TYPES as VALIDATED
    from cai_lite.recipe import load_config
    from cai_lite.typed_yaml import ConfigError

    assert VALIDATED == GGUF_TYPES
    assert load_config(["recipe=tiny_cpu", "export.gguf_types=[q4_k_m,q5_k_m,q8_0]"]).export.gguf_types[0] == "q4_k_m"
    with pytest.raises(ConfigError, match=r"export\.gguf_types: unknown type 'q4_0' \(f32, f16, q8_0, q4_k_m, q5_k_m\)"):
        load_config(["recipe=tiny_cpu", "export.gguf_types=[q4_0]"])
    with pytest.raises(ConfigError, match=r"export\.gguf_types: empty"):
        load_config(["recipe=tiny_cpu", "export.gguf_types=[]"])
