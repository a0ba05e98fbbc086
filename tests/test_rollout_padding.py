"""Scores and values read the right hidden state under left padding: `rollout.last_hidden` on a
padded batch equals the decoder run on each sequence alone, with its own positions from 0; and
which completions count as missing their EOS. Uses a tiny NF4 model.

    python -m pytest -q tests/test_rollout_padding.py
"""

from __future__ import annotations

import pytest
import torch

from cai_lite import generation, models, rollout

from conftest import tiny_config


@pytest.fixture(scope="module")
def sharp_base(sharp_llama, tmp_path_factory):
    """Larger weights than the usual init, so attending to a padding token visibly moves a hidden state."""
    return models.load_base(tiny_config(tmp_path_factory.mktemp("run"), sharp_llama))


def test_last_hidden_under_left_padding_equals_each_sequence_alone(sharp_base):
    base = sharp_base
    texts = ["hello there", "a much longer text, so that the first one is padded on the left"]
    enc, _ = generation.tokenize_left(base, texts, 64)
    assert (enc["attention_mask"][0] == 0).any()  # the short one is padded
    batched = rollout.last_hidden(base, enc["input_ids"], enc["attention_mask"])  # (2, T, H)
    model = base.model.get_base_model() if base.adapters else base.model
    for i, text in enumerate(texts):
        alone, _ = generation.tokenize_left(base, [text], 64)
        with torch.no_grad():
            want = model.get_decoder()(input_ids=alone["input_ids"]).last_hidden_state[0]  # positions 0..n-1
        n = want.shape[0]
        assert torch.allclose(batched[i, -n:].detach(), want, atol=1e-4), i


def test_missing_eos_by_last_id():
    assert rollout.missing_eos([[5, 2], [5, 3], [], [2, 5]], [2, 9]) == [False, True, True, True]
    assert rollout.missing_eos([[9]], [2, 9]) == [False]
