"""The teaching lab: a synthetic assistant world where harm is measurable exactly (kinds.py,
world.py), a ground-truth oracle (oracle.py), and a tiny Llama pretrained on CPU on documents the
stages' own prompt builders render (corpus.py, pretrain.py). `recipes/lab.yaml`, the default
recipe, runs the unchanged pipeline on it; docs/lab.md walks through a run.

    python -m cai_lite.lab.pretrain --seed 0      # build (or find in the cache) the lab model
"""
