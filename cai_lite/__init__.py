"""cai_lite: Constitutional AI (SL-CAI + RLAIF) on one frozen 4-bit base shared by named LoRA adapters."""

__version__ = "0.1.0"
