"""`jaxalign sample`: print a completion of one prompt; `jaxalign chat`: multi-turn chat with models.

    jaxalign sample --model DIR --prompt "How do I ..." [--max-new-tokens 64 --temperature 1.0
                    --top-p 1.0 --top-k 0 --seed 0] [--raw]

The prompt is wrapped in the Safe RLHF template ("BEGINNING OF CONVERSATION: USER: ...
ASSISTANT:") unless --raw is given. The tokenizer is read from --tokenizer or the model dir.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.generate import sampler
from jaxalign.models import hf


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF causal-LM checkpoint dir (Llama, Qwen2, Qwen3; with tokenizer files)")
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="do not apply the Safe RLHF prompt template")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")


def run(args) -> int:
    from jaxalign.data.views import format_prompt
    from jaxalign.models import loading
    from jaxalign.models.tokenizer import load_tokenizer
    from jaxalign.parallel import mesh as mesh_lib

    # config.json first: a malformed one is one line naming it (the tokenizer would raise from transformers).
    if not pathlib.Path(args.model).is_dir():
        raise FileNotFoundError(f"--model {args.model} is not a directory")
    stored = hf.load_config(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model, padding_side="left")
    settings = mesh_lib.MeshSettings()
    mesh, rules = mesh_lib.make_mesh(settings), mesh_lib.axis_rules(settings)
    # A tokenizer with more tokens than the checkpoint (e.g. an added <pad>) resizes the embeddings.
    policy = loading.load_policy(loading.ModelSettings(init_path=args.model, dtype=args.dtype), mesh, rules,
                                 vocab_size=max(len(tokenizer), stored.vocab_size),
                                 rng=jax.random.PRNGKey(args.seed))
    cfg = policy.cfg
    text = args.prompt if args.raw else format_prompt(args.prompt)
    ids = np.asarray([tokenizer(text)["input_ids"]], np.int32)
    eos = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    sampling = sampler.SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_ids=tuple(sorted(eos)),
        pad_token_id=tokenizer.pad_token_id,
    )
    with mesh_lib.sharding_context(mesh, rules):
        out = sampler.sample(
            policy.params, cfg, jnp.asarray(ids), jnp.ones(ids.shape, bool), jax.random.PRNGKey(args.seed), sampling
        )
    response = np.asarray(out.sequences)[0, ids.shape[1] :][np.asarray(out.response_mask)[0]]
    print(tokenizer.decode(response.tolist(), skip_special_tokens=True))
    return 0


CHAT_HELP = """commands: /reset (or /clear) starts a new conversation, /regenerate answers the last turn
again, /help shows this, /quit (or /exit, or end of input) leaves."""


def add_chat_arguments(parser) -> None:
    parser.add_argument("--model", nargs="+", required=True, help="one or more HF causal-LM dirs; each answers "
                        "every turn, side by side")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the first --model)")
    parser.add_argument("--template", default="upstream", choices=["upstream", "chat"],
                        help="upstream: the Safe RLHF template; chat: the tokenizer's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    parser.add_argument("--moderation", default="", help="a moderation model dir: every answer gets its verdict")
    parser.add_argument("--stop-unsafe", action="store_true",
                        help="with --moderation: moderate while streaming and stop at the first unsafe token")


def run_chat(args) -> int:
    import pathlib
    import sys

    from jaxalign.generate import chat
    from jaxalign.models import loading
    from jaxalign.models.tokenizer import load_tokenizer
    from jaxalign.parallel import mesh as mesh_lib

    tokenizer = load_tokenizer(args.tokenizer or args.model[0], padding_side="left")
    settings = mesh_lib.MeshSettings()
    mesh, rules = mesh_lib.make_mesh(settings), mesh_lib.axis_rules(settings)
    speakers, eos = [], {tokenizer.eos_token_id} - {None}
    for index, path in enumerate(args.model):
        policy = loading.load_policy(loading.ModelSettings(init_path=path, dtype=args.dtype), mesh, rules,
                                     vocab_size=max(len(tokenizer), hf.load_config(path).vocab_size),
                                     rng=jax.random.PRNGKey(args.seed))
        eos |= set(policy.cfg.eos_token_ids)
        name = pathlib.Path(path).name if len(args.model) == 1 else f"{index + 1}:{pathlib.Path(path).parent.name}"
        speakers.append(chat.Speaker(name, policy))
    sampling = sampler.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, eos_token_ids=tuple(sorted(eos)),
                                      pad_token_id=tokenizer.pad_token_id)
    dialogue = chat.chat_template_dialogue(tokenizer) if args.template == "chat" else None
    moderator = None
    if args.moderation:
        from jaxalign.moderation import api as moderation_api

        moderator = moderation_api.load_moderator(args.moderation, batch_size=1, mesh=mesh, rules=rules)
    session = chat.Chat(speakers, tokenizer, sampling, seed=args.seed, dialogue=dialogue, moderator=moderator,
                        stop_unsafe=args.stop_unsafe)
    print(f"chatting with {', '.join(s.name for s in speakers)}; {CHAT_HELP}", flush=True)
    with mesh_lib.sharding_context(mesh, rules):
        while True:
            print(">>> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line:  # end of input
                print()
                return 0
            text = line.strip()
            if not text:
                continue
            if text in ("/quit", "/exit"):
                return 0
            if text == "/help":
                print(CHAT_HELP, flush=True)
                continue
            if text in ("/reset", "/clear"):
                session.reset()
                print("(new conversation)", flush=True)
                continue
            if text == "/regenerate":
                if session.last_user is None:
                    print("(nothing to regenerate yet)", flush=True)
                    continue
                turns = session.regenerate()
            elif text.startswith("/"):
                print(f"(unknown command {text}; {CHAT_HELP})", flush=True)
                continue
            else:
                turns = session.respond(text)
            for speaker, (name, pieces) in zip(session.speakers, turns):
                print(f"[{name}] ", end="", flush=True)
                for piece in pieces:
                    print(piece, end="", flush=True)
                print(flush=True)
                if moderator is not None:
                    print(f"    moderation: {chat.describe_verdict(speaker.verdicts[-1])}", flush=True)


COMMANDS = {"sample": (add_arguments, run), "chat": (add_chat_arguments, run_chat)}
