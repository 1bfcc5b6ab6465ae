"""Views: counts, pair orientation and safety signs, the #181 policy, dedup, templates."""

import pytest

from jaxalign.data import mini, pku_saferlhf as pku, views


def _row(prompt="q", r0="a0", r1="a1", better=0, safer=0, safe0=True, safe1=True, sev0=0, sev1=0):
    cats = [{name: False for name in pku.HARM_CATEGORIES} for _ in range(2)]
    for i, sev in enumerate((sev0, sev1)):
        if sev:
            cats[i]["Violence"] = True
    return {
        "prompt": prompt, "response_0": r0, "response_1": r1, "prompt_source": "t",
        "response_0_source": "t", "response_1_source": "t",
        "is_response_0_safe": safe0, "is_response_1_safe": safe1,
        "response_0_harm_category": cats[0], "response_1_harm_category": cats[1],
        "response_0_severity_level": sev0, "response_1_severity_level": sev1,
        "better_response_id": better, "safer_response_id": safer,
        "response_0_sha256": pku.response_sha256(prompt, r0), "response_1_sha256": pku.response_sha256(prompt, r1),
    }


ROWS = [
    _row("q1", "help", "refuse", better=0, safer=1, safe0=False, safe1=True, sev0=2),
    _row("q2", "x", "y", better=1, safer=0),
    _row("q3", "bad", "worse", better=1, safer=0, safe0=False, safe1=False, sev0=1, sev1=3),
]
PROMPT = "BEGINNING OF CONVERSATION: USER: {} ASSISTANT:"


def test_sft():
    both = views.sft_examples(ROWS)
    assert both.kind == "sft" and len(both) == 6
    assert both[0] == {"prompt": PROMPT.format("q1"), "response": "help"}
    assert [e["response"] for e in views.sft_examples(ROWS, response="better")] == ["help", "y", "worse"]
    assert [e["response"] for e in views.sft_examples(ROWS, response="safer")] == ["refuse", "x", "bad"]


def test_preference_orientation():
    ex = views.preference_examples(ROWS)
    assert ex.kind == "preference" and len(ex) == 3
    assert [(e["better"], e["worse"]) for e in ex] == [("help", "refuse"), ("y", "x"), ("worse", "bad")]
    single = [{k: v for k, v in r.items() if k in pku.SINGLE_FIELDS} for r in ROWS]
    assert views.single_preference_examples(single) == ex


def test_safety_preference_signs():
    ex = views.safety_preference_examples(ROWS)
    assert ex.kind == "safety_preference"
    assert [(e["safer"], e["unsafer"], e["safer_sign"], e["unsafer_sign"]) for e in ex] == [
        ("refuse", "help", 1, -1), ("x", "y", 1, 1), ("bad", "worse", -1, -1)]


def test_inconsistent_policy():
    rows = ROWS + [_row("q4", "u", "s", safer=0, safe0=False, safe1=True, sev0=1)]
    with pytest.raises(ValueError, match="row 3.*#181"):
        views.safety_preference_examples(rows)
    skipped = views.safety_preference_examples(rows, inconsistent="skip")
    assert len(skipped) == 3 and skipped.counts["inconsistent_skipped"] == 1
    kept = views.safety_preference_examples(rows, inconsistent="keep")
    assert len(kept) == 4 and kept.counts["inconsistent_kept"] == 1
    assert (kept[3]["safer_sign"], kept[3]["unsafer_sign"]) == (-1, 1)


def test_identical_pairs_skipped_and_counted():
    ex = views.preference_examples(ROWS + [_row("q5", "same", "same")])
    assert len(ex) == 3 and ex.counts["skipped_identical"] == 1


def test_qa_two_per_row():
    ex = views.qa_examples(ROWS)
    assert ex.kind == "qa" and len(ex) == 6
    assert ex[0]["response"] == "help" and ex[0]["is_safe"] is False and ex[0]["severity"] == 2
    assert len(ex[0]["categories"]) == 19 and ex[0]["categories"][pku.HARM_CATEGORIES.index("Violence")]
    assert sum(ex[1]["categories"]) == 0 and ex[1]["is_safe"] is True


def test_prompt_dedup_keeps_last_occurrence_order():
    rows = [_row("a"), _row("b"), _row("a"), _row("c")]
    ex = views.prompt_examples(rows)
    assert [e["prompt"] for e in ex] == [PROMPT.format(p) for p in ("b", "a", "c")]
    assert ex.counts["duplicates_removed"] == 1


def test_templates():
    assert views.sft_examples(ROWS[:1], template="Q: {input}\nA:")[0]["prompt"] == "Q: q1\nA:"
    assert views.prompt_examples(ROWS[:1], template=str.upper)[0]["prompt"] == "Q1"

    class ChatTok:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return f"<user>{messages[0]['content']}</user><assistant>"

    assert views.prompt_examples(ROWS[:1], template=views.chat_template(ChatTok()))[0]["prompt"] == \
        "<user>q1</user><assistant>"


def test_missing_field_named():
    v0 = [{k: v for k, v in r.items() if k in pku.V0_FIELDS} for r in ROWS]
    with pytest.raises(KeyError, match="response_0_harm_category"):
        views.qa_examples(v0)
    assert len(views.safety_preference_examples(v0)) == 3


def test_views_of_generated_and_real_rows(shared_head_dir):
    rows = mini.generate_rows(300, seed=1, noise=0.0)
    safety = views.safety_preference_examples(rows)  # no #181 pair at zero noise
    assert len(safety) == 300 and all(e["safer_sign"] >= e["unsafer_sign"] for e in safety)
    real, _ = pku.read_release(shared_head_dir, "alpaca-7b", "test")
    assert len(views.qa_examples(real)) == 282
    assert len(views.safety_preference_examples(real, inconsistent="skip")) == 141
