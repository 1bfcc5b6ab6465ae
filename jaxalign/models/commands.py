"""`jaxalign init-model` and `jaxalign tokenizer`: a random causal LM as an HF dir; a small BPE tokenizer.

    jaxalign init-model --out DIR --config-json '{"model_type": "qwen3", "hidden_size": 64, ...}' [--tokenizer DIR]
    jaxalign tokenizer --data out/mini --out out/mini_tokenizer --vocab-size 1024

The config is an HF config.json dict (a file path or inline JSON); its model_type (llama by
default, qwen2, qwen3) picks the family. With --tokenizer, the vocab
size and bos/eos/pad ids come from the tokenizer and its files are copied into DIR, so DIR is a
complete model directory for `jaxalign train` / `jaxalign sample` / transformers.

Both write their dir atomically (a temporary sibling renamed into place, jaxalign/files.py) and
refuse an existing --out unless --overwrite.
"""

from __future__ import annotations

import json
import pathlib

import jax

from jaxalign import files, models
from jaxalign.models import hf


def add_init_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output checkpoint dir")
    parser.add_argument("--config-json", required=True, help="HF config.json dict: a file path or inline JSON")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir: sets vocab/special ids, copied into --out")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the initialisation")
    parser.add_argument("--max-shard-size", default=None, help='shard the safetensors, e.g. "2GB"')
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")


def read_config_arg(value: str) -> dict:
    """Parses --config-json: inline JSON (starts with '{') or a path to a JSON file."""
    text = value if value.lstrip().startswith("{") else pathlib.Path(value).read_text()
    try:
        config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config-json is not valid JSON ({value[:80]!r}): {e}") from e
    if not isinstance(config, dict):
        raise ValueError("--config-json must be a JSON object")
    return config


def run_init(args) -> int:
    files.check_new(args.out, args.overwrite)
    config = read_config_arg(args.config_json)
    tokenizer = None
    if args.tokenizer:
        from jaxalign.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
        config.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    config.setdefault("model_type", "llama")
    cfg = models.config_from_hf(config)
    params = models.init_params(cfg, jax.random.PRNGKey(args.seed))
    with files.atomic_dir(args.out, overwrite=args.overwrite, manifest=True) as tmp:
        hf.save_pretrained(tmp, cfg, params, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n_params:,} parameters, vocab {cfg.vocab_size}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
    return 0


def add_tokenizer_arguments(parser) -> None:
    parser.add_argument("--data", required=True, help="release-layout dir (data/<Model>/{train,test}.jsonl)")
    parser.add_argument("--out", required=True, help="output tokenizer dir")
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocab size incl. the 4 special tokens")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out dir")
    parser.add_argument("--split", action="append", default=None, choices=("train", "test"),
                        help="split(s) whose texts train the tokenizer (repeatable; default: train and test)")


def run_tokenizer(args) -> int:
    from jaxalign.models.tokenizer import release_texts, train_bpe_tokenizer

    files.check_new(args.out, args.overwrite)
    with files.atomic_dir(args.out, overwrite=args.overwrite) as tmp:
        tokenizer = train_bpe_tokenizer(release_texts(args.data, splits=args.split), args.vocab_size, tmp)
    print(f"wrote {args.out}: vocab {len(tokenizer)}, bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id} "
          f"unk={tokenizer.unk_token_id} pad={tokenizer.pad_token_id}")
    return 0


COMMANDS = {"init-model": (add_init_arguments, run_init), "tokenizer": (add_tokenizer_arguments, run_tokenizer)}
