"""Constitutions: the three formats, load-time errors, seeded sampling, verbatim prompt building.

    python -m pytest tests/test_constitution.py -q
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from cai_lite import constitution as C
from cai_lite import data

from conftest import FIXTURES


def test_our_constitutions_load():
    h = C.load("harmless")
    assert len(h.critique_revision) >= 12 and len(h.preference) >= 12
    assert any("refus" in p.critique.lower() for p in h.critique_revision)  # the evasiveness fix
    assert any("refusing" in p.text.lower() for p in h.preference)
    assert h.critique_demos and h.preference_demos and h.cot_template
    t = C.load("candid_tutor")
    assert t.name == "candid_tutor" and {p.id for p in t.critique_revision} != {p.id for p in h.critique_revision}


def test_anthropic_format(shared_data):
    c = C.load(str(shared_data / "anthropic-cai-paper" / "CritiqueRevisionInstructions.json"))
    assert len(c.critique_revision) == 16 and len(c.preference) == 16
    first = c.critique_revision[0]
    assert first.critique.startswith("Identify specific ways") and "CritiqueRequest" not in first.critique
    assert first.revision.startswith("Please rewrite") and "Revision:" not in first.revision
    assert not c.preference[0].text.endswith("Options:")
    assert len(c.critique_demos) == 5 and c.critique_demos[0][-2]["role"] == "user"
    assert len(c.preference_demos) == 5
    # A folder works too.
    assert C.load(str(shared_data / "anthropic-cai-paper")).critique_revision == c.critique_revision


def test_llm_swarm_format(shared_data):
    c = C.load(str(shared_data / "hf-llm-swarm-cai" / "constitution_anthropic.json"))
    assert len(c.critique_revision) == 16 and len(c.critique_demos) == 4
    assert c.preference == () and c.notes  # the format has no preference principles, and says so
    g = C.load(str(shared_data / "hf-llm-swarm-cai" / "constituion_grok.json"))
    assert len(g.critique_revision) == 2


def test_anthropic_format_fixture():
    """The same reading as test_anthropic_format, on files of that format in our own words."""
    c = C.load(str(FIXTURES / "anthropic-format" / "CritiqueRevisionInstructions.json"))
    assert [p.id for p in c.critique_revision] == ["plain0", "plain1", "plain2"] and len(c.preference) == 3
    first = c.critique_revision[0]
    assert first.critique.startswith("Point out every way") and "CritiqueRequest" not in first.critique
    assert first.critique.endswith("people.") and "Critique:" not in first.critique
    assert first.revision.startswith("Rewrite the assistant's") and "Revision:" not in first.revision
    assert not any(p.text.endswith("Options:") for p in c.preference)
    # Few-shot transcripts become chats; the second one has two human turns before the critique.
    assert len(c.critique_demos) == 2 and [m["role"] for m in c.critique_demos[1][:4]] == ["user", "assistant"] * 2
    assert c.critique_demos[0][-1]["content"].startswith("If the bike is yours") and not c.notes
    assert len(c.preference_demos) == 2 and c.preference_demos[1].rejected == "I can't give medical advice."
    assert C.load(str(FIXTURES / "anthropic-format")).critique_revision == c.critique_revision


def test_llm_swarm_format_fixture():
    c = C.load(str(FIXTURES / "llm-swarm" / "constitution_anthropic.excerpt.json"))
    assert len(c.critique_revision) == 3 and len(c.critique_demos) == 2
    assert all(len(d) == 6 for d in c.critique_demos) and c.critique_demos[0][0]["role"] == "user"
    assert c.preference == () and c.notes


def _bad(tmp_path, text, suffix=".yaml"):
    p = tmp_path / f"bad{suffix}"
    p.write_text(text)
    with pytest.raises(C.ConstitutionError) as e:
        C.load(str(p))
    return str(e.value), p


def test_bad_files_name_file_and_entry(tmp_path):
    msg, p = _bad(tmp_path, "name: x\ncritique_revision:\n  - {id: a, critique: c, revision: r}\n  - {id: b, critique: c2}\n"
                            "preference:\n  - {id: p, text: t}\n")
    assert str(p) in msg and "critique_revision[1]" in msg and "'b'" in msg and "'revision'" in msg
    msg, p = _bad(tmp_path, "name: x\ncritique_revision: []\npreference:\n  - {id: p, text: t}\n")
    assert str(p) in msg and "critique_revision" in msg and "non-empty" in msg
    msg, p = _bad(tmp_path, json.dumps({"constitutions": [{"critic": "c"}]}), ".json")
    assert str(p) in msg and "constitutions[0]" in msg and "'revision'" in msg
    with pytest.raises(C.ConstitutionError, match="no such file"):
        C.load("does_not_exist")


def test_sampling_is_seeded_and_covers_everything():
    c = C.load("harmless")
    draw = lambda seed: [C.rng_for(seed, f"p{i}").choice(c.critique_revision).id for i in range(200)]  # noqa: E731
    assert draw(0) == draw(0)
    assert draw(0) != draw(1)
    assert set(Counter(draw(0))) == {p.id for p in c.critique_revision}
    picks = C.sample(c.preference, 4, C.rng_for(0, "x"))
    assert len({p.id for p in picks}) == 4


NASTY = ["Use {braces} and {0} and %s and %(x)d", "{{ user }} {% if x %}jinja{% endif %} {# c #}",
         "Unicode: 你好 — ñ 🙂 \u202e rtl", "Backslash \\n and \"quotes\""]


@pytest.mark.parametrize("text", NASTY)
def test_user_text_passes_through_verbatim(text, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    c = C.load("harmless")
    p = c.critique_revision[0]
    for msgs in (C.critique_messages(c, text, text, p, 1, True), C.revision_messages(c, text, text, p, text, 1, False),
                 C.comparison_messages(text, c.preference[0].text, text, text, c.preference_demos)):
        rendered = data.render(tok, msgs, C.COMPARISON_PREFILL)
        assert rendered.count(text) >= 2, rendered
