"""Tokenizers: load an HF tokenizer dir with the pad-token rule of Safe RLHF; train the small BPE.

    tok = load_tokenizer(path)                 # tok.jaxalign_added_tokens: tokens appended to the vocab
    train_bpe_tokenizer(texts, 1024, out_dir)  # byte-level BPE saved as an ordinary HF dir

Upstream (safe-rlhf models/pretrained.py) adds any missing special token (`<pad>`, `</s>`, `<s>`, `<unk>`) after
loading, then resizes the embeddings. `load_tokenizer` does the same and records the tokens it
added in `tok.jaxalign_added_tokens`; when that is not empty the caller resizes with
`jaxalign.models.decoder.resize_token_embeddings(cfg, params, len(tok))`.
Encoding prepends BOS (`add_special_tokens=True`, like Llama) and never appends EOS: training
texts append `tok.eos_token` as a string (as upstream's safe_rlhf/datasets/*.py do).

Code shipped in a tokenizer dir is never run: transformers is always called with
`trust_remote_code=False`, and a dir whose tokenizer_config.json or config.json has an `auto_map`
(custom Python classes) is refused with one error line naming the dir, never a [y/N] prompt.

`jaxalign tokenizer` (models/commands.py) trains one on the prompts and responses of a release-layout dir.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Sequence

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# Files transformers reads to pick the tokenizer class; an `auto_map` in either asks for custom code.
_CLASS_FILES = ("tokenizer_config.json", "config.json")


def check_no_remote_code(path: str | os.PathLike) -> None:
    """ValueError (one line naming the dir and file) when `path` asks transformers to run code
    from the dir (`auto_map` in tokenizer_config.json / config.json); a malformed one is named too."""
    for name in _CLASS_FILES:
        file = pathlib.Path(path) / name
        if not file.is_file():
            continue
        try:
            content = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{file}: not valid JSON ({error})") from None
        if isinstance(content, dict) and content.get("auto_map"):
            classes = ", ".join(sorted(str(k) for k in content["auto_map"])) if isinstance(content["auto_map"], dict) else ""
            raise ValueError(
                f"tokenizer dir {str(path)!r} needs custom code ({name} has auto_map {classes}); jaxalign never "
                f"runs code from a model or tokenizer dir: use a dir with a standard tokenizer class"
            )


def load_tokenizer(path: str | os.PathLike, *, padding_side: str = "right", model_max_length: int | None = None):
    """Load an HF tokenizer dir -> tokenizer, with `tokenizer.jaxalign_added_tokens: list[str]`.

    Missing special tokens are added in the order pad, eos, bos, unk (upstream's), so a
    Llama-1 tokenizer gets `<pad>` as id 32000. `len(tokenizer)` is then the vocab size the
    embeddings must have.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"tokenizer dir {str(path)!r} does not exist (relative paths resolve against {os.getcwd()})"
        )
    check_no_remote_code(path)
    kwargs = {"padding_side": padding_side, "trust_remote_code": False}
    if model_max_length is not None:
        kwargs["model_max_length"] = model_max_length
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    added = []
    for key in ("pad_token", "eos_token", "bos_token", "unk_token"):
        if getattr(tokenizer, key) is None:
            tokenizer.add_special_tokens({key: SPECIAL_TOKENS[key]})
            added.append(SPECIAL_TOKENS[key])
    tokenizer.jaxalign_added_tokens = added
    return tokenizer


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | os.PathLike):
    """Train a byte-level BPE on texts and save it as an HF tokenizer dir; returns the loaded tokenizer.

    Ids 0..3 are `<s>`, `</s>`, `<unk>`, `<pad>`. The dir holds tokenizer.json and
    tokenizer_config.json and loads with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL_TOKENS[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")]
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> at run time
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        add_bos_token=True,  # builds the "<s> $A" post-processor, saved with the dir
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        **SPECIAL_TOKENS,
    )
    pathlib.Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return load_tokenizer(out_dir)


def release_texts(data_dir: str | os.PathLike, splits: Sequence[str] | None = None) -> Iterable[str]:
    """Prompts (formatted with the upstream template, as the models see them) and responses of
    every file (all subsets) of the given splits (None: every split) of a release-layout dir."""
    from jaxalign.data import pku_saferlhf
    from jaxalign.data.views import format_prompt

    kind = pku_saferlhf.detect_kind(data_dir)
    config = "v0" if kind == "v0" else ("single-default" if kind == "single" else "default")
    for split in splits or pku_saferlhf.SPLITS:
        paths = pku_saferlhf.find_files(data_dir, config, split)
        if not paths and splits:
            raise FileNotFoundError(f"{data_dir}: no {split} files for the tokenizer (expected "
                                    f"data/<Model>/{split}.jsonl or .parquet)")
        for _, _, row in pku_saferlhf.iter_rows(paths, kind, check_sha256=False):
            yield format_prompt(row["prompt"])
            yield row["response_0"]
            yield row["response_1"]
