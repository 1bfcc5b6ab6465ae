"""The small BPE tokenizer and the pad-token rule of load_tokenizer."""

import pytest

from jaxalign import cli
from jaxalign.data import mini
from jaxalign.models import tokenizer as tk


@pytest.fixture(scope="module")
def texts():
    rows = mini.generate_rows(200, seed=0)
    return [t for r in rows for t in (r["prompt"], r["response_0"], r["response_1"])]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, texts):
    out = tmp_path_factory.mktemp("tok")
    tk.train_bpe_tokenizer(texts, 400, out)
    return out


def test_saved_dir_loads_with_auto_tokenizer(tok_dir):
    from transformers import AutoTokenizer

    assert (tok_dir / "tokenizer.json").exists() and (tok_dir / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert len(tok) == 400
    assert [tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id] == [0, 1, 2, 3]
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<s>", "</s>", "<unk>", "<pad>"]


def test_bos_prepended_no_eos_and_round_trip(tok_dir):
    tok = tk.load_tokenizer(tok_dir)
    assert tok.jaxalign_added_tokens == []
    text = "How do I bake bread? Ünïcode 日本 and  spaces\ttabs"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert tok.eos_token_id not in ids and tok.unk_token_id not in ids  # byte-level: nothing unknown
    assert tok.decode(ids, skip_special_tokens=True) == text
    with_eos = tok(text + tok.eos_token)["input_ids"]
    assert with_eos == ids + [tok.eos_token_id]  # the eos string is one special token


def test_pad_token_added_when_missing(tmp_path, texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>"],
                                                        show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(tmp_path))
    tok = tk.load_tokenizer(tmp_path, padding_side="left")
    assert tok.jaxalign_added_tokens == ["<pad>"]
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 300 and len(tok) == 301
    assert tok.padding_side == "left"
    batch = tok(["a", "a b c d"], padding=True)
    assert batch["input_ids"][0][0] == 300


def test_cli_trains_on_release_dir(tmp_path):
    mini.write_mini(tmp_path / "d", rows=60, seed=0)
    assert cli.main(["tokenizer", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "t"),
                     "--vocab-size", "600"]) == 0
    tok = tk.load_tokenizer(tmp_path / "t")
    assert tok.jaxalign_added_tokens == [] and len(tok) == 600
    template = tok("BEGINNING OF CONVERSATION: USER:")["input_ids"]
    assert len(template) < 12  # trained on formatted prompts: the template is a few tokens


def _remote_code_dir(base, texts, marker):
    """A tokenizer dir whose tokenizer_config.json maps AutoTokenizer to evil.py (which writes `marker`)."""
    import json
    import shutil

    out = base / "remote"
    tk.train_bpe_tokenizer(texts[:200], 300, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    (out / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    shutil.rmtree(out / "__pycache__", ignore_errors=True)
    return out


@pytest.fixture
def answers_yes(monkeypatch):
    """An interactive terminal where the user types "y" at transformers' [y/N] prompt."""
    import builtins

    prompts = []

    def fake_input(prompt=""):
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


def test_auto_map_dir_is_refused_without_running_its_code(tmp_path, texts, answers_yes):
    marker = tmp_path / "marker"
    remote = _remote_code_dir(tmp_path, texts, marker)
    with pytest.raises(ValueError) as error:
        tk.load_tokenizer(remote)
    message = str(error.value)
    assert "\n" not in message and str(remote) in message and "auto_map" in message
    assert not marker.exists() and answers_yes == []


def test_transformers_is_told_never_to_trust_remote_code(tmp_path, texts, answers_yes, monkeypatch):
    """Even past the auto_map check, transformers gets trust_remote_code=False: no prompt, no code."""
    marker = tmp_path / "marker"
    remote = _remote_code_dir(tmp_path, texts, marker)
    monkeypatch.setattr(tk, "check_no_remote_code", lambda path: None, raising=False)
    try:
        tk.load_tokenizer(remote)
    except (ValueError, OSError):
        pass  # transformers refusing the unknown class is fine; running it is not
    assert not marker.exists() and answers_yes == []


def test_malformed_tokenizer_config_names_the_file(tmp_path, tok_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tok_dir, bad)
    (bad / "tokenizer_config.json").write_text('{"model_max_length": ')
    with pytest.raises(ValueError, match=r"bad/tokenizer_config\.json: not valid JSON"):
        tk.load_tokenizer(bad)
