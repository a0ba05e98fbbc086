"""cai_lite: Constitutional AI (SL-CAI + RLAIF) on one frozen 4-bit base shared by named LoRA adapters.

Importing the package turns the Hugging Face libraries offline and their telemetry off. It has to
happen here, before anything imports them: huggingface_hub reads these variables once, at import.
cai_lite reads models and data from local folders only, and only a configured judge URL opens a
socket. Each is a default (`os.environ.setdefault`): `HF_HUB_OFFLINE=0 cai-lite ...` lets the hub in.
"""

import os

__version__ = "0.1.0"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",  # huggingface_hub, and transformers, datasets, peft and trl through it
    "TRANSFORMERS_OFFLINE": "1",  # older spelling that transformers still reads
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",  # TRL's trainers report each run through huggingface_hub.send_telemetry
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)
