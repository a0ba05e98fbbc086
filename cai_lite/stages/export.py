"""Stage export: merge a trained adapter into a de-quantized copy of the base, and write a Hugging
Face folder and GGUF files you can run in llama.cpp or ollama (or use as the llamacpp judge).

Reads `<export.adapter>/adapter/` (sft, ppo, rloo or dpo) and the base model folder. Writes
`export/hf/` (safetensors + tokenizer + chat template), `export/model-<type>.gguf` for each of
`export.gguf_types` (f32, f16, q8_0, q4_k_m, q5_k_m) and `export/Modelfile` for ollama, pointing at
the first of them.

    python run.py recipe=tiny_cpu stages=[export] export.adapter=ppo export.gguf_types=[q4_k_m,f16]
    llama-cli -m runs/tiny_cpu/export/model-q4_k_m.gguf   # or, in export/: ollama create cai -f Modelfile
"""

from __future__ import annotations

import logging
from pathlib import Path

from cai_lite import models, rundir
from cai_lite.config import Config
from cai_lite.gguf_export import export_gguf
from cai_lite.modelfile import write_modelfile
from cai_lite.models import SharedBase

log = logging.getLogger(__name__)


def check(cfg: Config) -> list[str]:
    a = cfg.export.adapter
    if a != "none" and a not in cfg.stages and not rundir.is_done(cfg.path, a):
        return [f"export.adapter: stage {a!r} has not run in {cfg.path}; add it to stages or pick another"]
    return []


# The contract pipeline.py reads: config keys in this stage's hash, stages it reads (OPTIONAL_READS:
# when they ran), what it leaves in export/ before stage.json, and the metric the run's summary shows.
KEYS = rundir.BASE_KEYS + ("export",)
READS = ()
OPTIONAL_READS = ("sft", "ppo", "rloo", "dpo")
OUTPUTS = ("hf", "Modelfile")
HEADLINE = "written"


def run(cfg: Config, base: SharedBase, out: Path) -> dict:
    ec = cfg.export
    folder = None if ec.adapter == "none" else rundir.adapter_dir(cfg.path, ec.adapter)
    model = models.merged_copy(base, folder, ec.dtype)
    hf = out / "hf"
    model.save_pretrained(hf)
    base.tokenizer.save_pretrained(hf)
    del model
    files = {}
    for t in ec.gguf_types:
        path = export_gguf(hf, out / f"model-{t}.gguf", t)
        files[t] = {"path": str(path), "bytes": path.stat().st_size}
        log.info("wrote %s (%.1f MB)", path, path.stat().st_size / 2**20)
    modelfile = write_modelfile(out, f"model-{ec.gguf_types[0]}.gguf", base.tokenizer)
    ggufs = ", ".join(f"{Path(f['path']).name} ({f['bytes'] / 2**20:.1f} MB)" for f in files.values())
    return {"adapter": ec.adapter, "hf_folder": str(hf), "gguf": files, "modelfile": str(modelfile),
            "written": f"{ggufs}, hf/ and Modelfile in {out} (adapter {ec.adapter})"}
