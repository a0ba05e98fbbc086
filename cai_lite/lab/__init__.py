"""The teaching lab: a synthetic assistant world composed from parts (acts, objects, owners,
consents, settings, frames: parts.py) with a harm rule over them and a seeded held-out split
(world.py), a strict ground-truth oracle (oracle.py), and a tiny Llama pretrained on CPU on
documents the stages' own prompt builders render (corpus.py, pretrain.py). `recipes/lab.yaml`, the
default recipe, runs the unchanged pipeline on it; docs/lab.md walks through a run. The wing knows
no stage and no shared 4-bit base: it makes an ordinary HF model folder and measures answers.

    python -m cai_lite.lab.pretrain --seed 0      # build (or find in the cache) the lab model
"""
