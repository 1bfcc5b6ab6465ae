"""`jaxalign init-model`: write a randomly initialised Llama as an HF checkpoint dir.

    jaxalign init-model --out DIR --config-json '{"hidden_size": 64, ...}' [--tokenizer DIR] [--seed 0]

The config is an HF config.json dict (a file path or inline JSON). With --tokenizer, the vocab
size and bos/eos/pad ids come from the tokenizer and its files are copied into DIR, so DIR is a
complete model directory for `jaxalign train` / `jaxalign sample` / transformers.
"""

from __future__ import annotations

import json
import pathlib

import jax

from jaxalign.models import hf, llama


def add_arguments(parser) -> None:
    parser.add_argument("--out", required=True, help="output checkpoint dir")
    parser.add_argument("--config-json", required=True, help="HF config.json dict: a file path or inline JSON")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir: sets vocab/special ids, copied into --out")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the initialisation")
    parser.add_argument("--max-shard-size", default=None, help='shard the safetensors, e.g. "2GB"')


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


def run(args) -> int:
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
    cfg = llama.LlamaConfig.from_hf_config(config)
    params = llama.init_params(cfg, jax.random.PRNGKey(args.seed))
    hf.save_pretrained(args.out, cfg, params, max_shard_size=args.max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    print(f"wrote {args.out}: {n_params:,} parameters, vocab {cfg.vocab_size}, "
          f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}")
    return 0
