"""Pipeline: tokenization and padding, truncation counts, sharded global batches, resume, epochs."""

import json

import jax
import numpy as np
import pytest

from jaxalign.data import mini, pipeline, views
from jaxalign.models import tokenizer as tk


@pytest.fixture(scope="module")
def rows():
    return mini.generate_rows(96, seed=2, noise=0.0)


@pytest.fixture(scope="module")
def tok(tmp_path_factory, rows):
    texts = [t for r in rows for t in (r["prompt"], r["response_0"], r["response_1"])]
    texts.append(views.PROMPT_TEMPLATE)
    return tk.train_bpe_tokenizer(texts, 600, tmp_path_factory.mktemp("tok"))


def _mesh(n):
    return jax.make_mesh((1, n, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:n])


def _gather(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sft_tokens_and_loss_mask(tok, rows):
    ex = views.sft_examples(rows[:4])
    arrays, truncated = pipeline.tokenize_examples("sft", ex, tok, max_length=128)
    assert truncated == {}
    assert arrays["input_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == bool
    for i, e in enumerate(ex):
        prompt = tok(e["prompt"])["input_ids"]
        full = tok(e["prompt"] + e["response"] + tok.eos_token)["input_ids"]
        n = len(full)
        assert full[0] == tok.bos_token_id and full[-1] == tok.eos_token_id
        np.testing.assert_array_equal(arrays["input_ids"][i, :n], full)
        assert (arrays["input_ids"][i, n:] == tok.pad_token_id).all()  # right padded
        assert arrays["attention_mask"][i].sum() == n and arrays["attention_mask"][i, :n].all()
        expected = np.zeros(128, bool)
        expected[len(prompt):n] = True
        np.testing.assert_array_equal(arrays["loss_mask"][i], expected)


def test_prompt_left_padded(tok, rows):
    ex = views.prompt_examples(rows[:3])
    arrays, _ = pipeline.tokenize_examples("prompt", ex, tok, max_length=64)
    for i, e in enumerate(ex):
        ids = tok(e["prompt"])["input_ids"]
        np.testing.assert_array_equal(arrays["input_ids"][i, 64 - len(ids):], ids)
        assert not arrays["attention_mask"][i, :64 - len(ids)].any()
        assert arrays["attention_mask"][i, 64 - len(ids):].all()


def test_truncation_counted(tok, rows):
    ex = views.preference_examples(rows[:20])
    lengths = [len(tok(e["prompt"] + e["better"] + tok.eos_token)["input_ids"]) for e in ex]
    cut = int(np.median(lengths))
    arrays, truncated = pipeline.tokenize_examples("preference", ex, tok, max_length=cut)
    assert truncated.get("better_input_ids", 0) == sum(n > cut for n in lengths) > 0
    long = int(np.argmax(lengths))
    assert arrays["better_attention_mask"][long].all()
    assert arrays["better_input_ids"][long, -1] != tok.eos_token_id  # the cut drops the EOS
    batches = pipeline.make_batches("preference", ex, tok, batch_size=4, max_length=cut, shuffle=False,
                                    num_epochs=1)
    list(batches)
    assert batches.truncated["better_input_ids"] == truncated["better_input_ids"]
    assert batches.get_state()["truncated"]["better_input_ids"] == truncated["better_input_ids"]


def test_qa_and_safety_fields(tok, rows):
    qa, _ = pipeline.tokenize_examples("qa", views.qa_examples(rows[:5]), tok, max_length=96)
    assert qa["categories"].shape == (10, 19) and qa["categories"].dtype == bool
    assert qa["severity"].dtype == np.int32 and qa["is_safe"].dtype == bool
    np.testing.assert_array_equal(qa["is_safe"], qa["severity"] == 0)
    sp, _ = pipeline.tokenize_examples("safety_preference", views.safety_preference_examples(rows[:5]), tok,
                                       max_length=96)
    assert set(sp) == {"safer_input_ids", "safer_attention_mask", "safer_response_mask", "unsafer_input_ids",
                       "unsafer_attention_mask", "unsafer_response_mask", "safer_sign", "unsafer_sign"}
    assert set(np.unique(sp["safer_sign"])) <= {-1, 1}


def test_pair_response_masks_cover_each_answer_and_its_eos(tok, rows):
    ex = views.preference_examples(rows[:6])
    arrays, _ = pipeline.tokenize_examples("preference", ex, tok, max_length=128)
    for i, e in enumerate(ex):
        start = len(tok(e["prompt"])["input_ids"])
        for side in ("better", "worse"):
            end = len(tok(e["prompt"] + e[side] + tok.eos_token)["input_ids"])
            expected = np.zeros(128, bool)
            expected[start:end] = True
            np.testing.assert_array_equal(arrays[f"{side}_response_mask"][i], expected)
            assert arrays[f"{side}_input_ids"][i, end - 1] == tok.eos_token_id


@pytest.mark.parametrize("kind,view", [("safety_preference", views.safety_preference_examples),
                                       ("sft", views.sft_examples), ("prompt", views.prompt_examples)])
def test_same_global_batches_on_1_and_8_devices(tok, rows, kind, view):
    ex = view(rows)
    kw = dict(batch_size=8, max_length=48, seed=7)
    one = pipeline.make_batches(kind, ex, tok, mesh=_mesh(1), **kw)
    eight = pipeline.make_batches(kind, ex, tok, mesh=_mesh(8), **kw)
    host = pipeline.make_batches(kind, ex, tok, **kw)
    for _ in range(3):
        b1, b8, bh = next(one), next(eight), next(host)
        arr = next(iter(b8.values()))
        assert len(arr.sharding.device_set) == 8
        assert {s.data.shape[0] for s in arr.addressable_shards} == {1}  # one row per device
        assert arr.sharding.spec[0] == ("data", "fsdp")
        _same(_gather(b1), _gather(b8))
        _same(_gather(b1), bh)


def test_resume_from_state(tok, rows):
    ex = views.preference_examples(rows)
    kw = dict(batch_size=8, max_length=48, seed=3, mesh=_mesh(8))
    first = pipeline.make_batches("preference", ex, tok, **kw)
    for _ in range(5):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    expected = [_gather(next(first)) for _ in range(9)]  # crosses the epoch boundary at 12 batches
    resumed = pipeline.make_batches("preference", ex, tok, **kw)
    resumed.set_state(state)
    for want in expected:
        _same(_gather(next(resumed)), want)
    assert resumed.get_state()["next_batch"] == 14


def test_epochs_reshuffled_and_complete(tok, rows):
    ex = views.Examples("prompt", [{"prompt": f"question {i} {r['prompt']}"} for i, r in enumerate(rows[:16])])

    def order(seed):
        it = pipeline.make_batches("prompt", ex, tok, batch_size=4, max_length=64, seed=seed, num_epochs=2)
        arrays, _ = pipeline.tokenize_examples("prompt", ex, tok, max_length=64)
        keys = {arrays["input_ids"][i].tobytes(): i for i in range(16)}
        out = [keys[b["input_ids"][j].tobytes()] for b in it for j in range(4)]
        assert len(out) == 32
        return out

    a = order(0)
    assert sorted(a[:16]) == sorted(a[16:]) == list(range(16))  # each epoch sees every example once
    assert a[:16] != a[16:]  # reshuffled each epoch
    assert order(0) == a and order(1) != a


def test_finite_and_remainder(tok, rows):
    ex = views.preference_examples(rows[:10])
    dropped = list(pipeline.make_batches("preference", ex, tok, batch_size=4, max_length=32, num_epochs=1))
    assert len(dropped) == 2
    kept = list(pipeline.make_batches("preference", ex, tok, batch_size=4, max_length=32, num_epochs=1,
                                      drop_remainder=False, shuffle=False))
    assert [b["better_input_ids"].shape[0] for b in kept] == [4, 4, 2]
    full, _ = pipeline.tokenize_examples("preference", ex, tok, max_length=32)
    np.testing.assert_array_equal(np.concatenate([b["worse_input_ids"] for b in kept]), full["worse_input_ids"])


def test_errors(tok, rows):
    with pytest.raises(ValueError, match="kind 'preference'"):
        pipeline.make_batches("sft", views.preference_examples(rows), tok, batch_size=4, max_length=32)
    with pytest.raises(ValueError, match="not divisible"):
        pipeline.make_batches("sft", views.sft_examples(rows), tok, batch_size=4, max_length=32, mesh=_mesh(8))
    with pytest.raises(ValueError, match="unknown batch kind"):
        pipeline.make_batches("dpo", views.sft_examples(rows), tok, batch_size=4, max_length=32)
