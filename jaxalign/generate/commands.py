"""`jaxalign sample`: print a completion of one prompt; `jaxalign chat`: multi-turn chat with models.

    jaxalign sample --model DIR --prompt "How do I ..." [--max-new-tokens 64 --temperature 1.0
                    --top-p 1.0 --top-k 0 --seed 0] [--raw]
    jaxalign chat --model DIR [DIR ...] [--template upstream|chat --moderation DIR --stop-unsafe]

The prompt is wrapped in the Safe RLHF template ("BEGINNING OF CONVERSATION: USER: ...
ASSISTANT:") unless --raw is given. The tokenizer is read from --tokenizer or the model dir. Both
load their models through jaxalign.generate.policy (EOS set, pad id, vocabulary and length checks).

Ctrl-C in chat: while a model answers, the answer stops and the prompt returns; at the prompt it
says how to leave; a second Ctrl-C before the next line exits with status 130 and one line.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys
import threading

from jaxalign.generate import sampler


def _add_sampling_arguments(parser, max_new_tokens: int) -> None:
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the model dir)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")


def _sampling(args) -> sampler.SamplingConfig:
    """The sampling flags, checked before any model is loaded (non-finite values are refused)."""
    return sampler.SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="HF causal-LM checkpoint dir (Llama, Qwen2/3, Gemma 2/3; with tokenizer files)")
    parser.add_argument("--prompt", required=True, help="the user prompt")
    parser.add_argument("--raw", action="store_true", help="do not apply the Safe RLHF prompt template")
    _add_sampling_arguments(parser, max_new_tokens=64)


def run(args) -> int:
    from jaxalign.data.views import format_prompt
    from jaxalign.generate import policy as policy_lib

    sampling = _sampling(args)
    policy = policy_lib.load(args.model, tokenizer=args.tokenizer, dtype=args.dtype)
    text = args.prompt if args.raw else format_prompt(args.prompt)
    print(policy.generate([text], sampling, seed=args.seed)[0])
    return 0


CHAT_HELP = """commands: /reset (or /clear) starts a new conversation, /regenerate answers the last turn
again, /help shows this, /quit (or /exit, or end of input) leaves; Ctrl-C stops an answer."""


def add_chat_arguments(parser) -> None:
    parser.add_argument("--model", nargs="+", required=True, help="one or more HF causal-LM dirs; each answers "
                        "every turn, side by side")
    parser.add_argument("--template", default="upstream", choices=["upstream", "chat"],
                        help="upstream: the Safe RLHF template; chat: the tokenizer's chat template")
    parser.add_argument("--moderation", default="", help="a moderation model dir: every answer gets its verdict")
    parser.add_argument("--stop-unsafe", action="store_true",
                        help="with --moderation: moderate while streaming and stop at the first unsafe token")
    _add_sampling_arguments(parser, max_new_tokens=128)


class _Interrupts:
    """The chat's SIGINT handler. While models load, Ctrl-C exits; while a model answers, the first
    one sets `stop` (the answer ends at its next token and the prompt returns); at the prompt it says
    how to leave; a second one before the next line is entered exits with status 130 and one line.
    It raises nothing into the code it interrupts (no traceback from inside a compile or a decode
    step), and leaves with os._exit so nothing of the runtime is torn down mid-call."""

    def __init__(self):
        self.stop = threading.Event()
        self.count = 0
        self.phase = "loading"  # loading | prompt | answering

    def __call__(self, signum, frame) -> None:
        del signum, frame
        self.count += 1
        # os.write: a print here could land inside a print of the main thread (a reentrant write).
        if self.phase == "loading" or self.count > 1:
            try:
                sys.stdout.flush()
            except (RuntimeError, OSError, ValueError):  # the signal interrupted a write to stdout
                pass
            os.write(sys.stderr.fileno(), b"\njaxalign chat: interrupted\n")
            os._exit(130)
        self.stop.set()
        if self.phase == "prompt":
            os.write(sys.stdout.fileno(), b"\n(Ctrl-C again to leave, or /quit)\n>>> ")

    def new_line(self) -> None:
        """A line was entered: Ctrl-C counts from zero again."""
        self.count = 0
        self.stop.clear()


def run_chat(args) -> int:
    interrupts = _Interrupts()
    handles_signals = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupts) if handles_signals else None
    try:
        return _chat(args, interrupts)
    finally:
        if handles_signals:
            signal.signal(signal.SIGINT, previous)


def _chat(args, interrupts: _Interrupts) -> int:
    from jaxalign.generate import chat
    from jaxalign.generate import policy as policy_lib
    from jaxalign.parallel import mesh as mesh_lib

    sampling = _sampling(args)
    mesh, rules = mesh_lib.mesh_and_rules(mesh_lib.MeshSettings())
    speakers = []
    for index, path in enumerate(args.model):
        policy = policy_lib.load(path, tokenizer=args.tokenizer, dtype=args.dtype, mesh=mesh, rules=rules)
        name = pathlib.Path(path).name if len(args.model) == 1 else f"{index + 1}:{pathlib.Path(path).parent.name}"
        speakers.append(chat.Speaker(name, policy))
    moderator = None
    if args.moderation:
        from jaxalign.moderation import api as moderation_api

        moderator = moderation_api.load_moderator(args.moderation, batch_size=1, mesh=mesh, rules=rules)
    session = chat.Chat(speakers, sampling, seed=args.seed, template=args.template, moderator=moderator,
                        stop_unsafe=args.stop_unsafe, stop=interrupts.stop.is_set)
    print(f"chatting with {', '.join(s.name for s in speakers)}; {CHAT_HELP}", flush=True)
    while True:
        interrupts.phase = "prompt"
        print(">>> ", end="", flush=True)
        line = sys.stdin.readline()
        interrupts.new_line()
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
        interrupts.phase = "answering"
        try:
            if text == "/regenerate":
                if session.last_user is None:
                    print("(nothing to regenerate yet)", flush=True)
                    continue
                answers = session.regenerate()
            elif text.startswith("/"):
                print(f"(unknown command {text}; {CHAT_HELP})", flush=True)
                continue
            else:
                answers = session.respond(text)
        except policy_lib.TooLong as error:
            print(f"(not answered: {error})", flush=True)
            continue
        for answer in answers:
            if answer.dropped:
                print(f"({answer.name}: left out the {answer.dropped} oldest turn(s) of the conversation to fit "
                      f"max_position_embeddings {answer.speaker.policy.max_length})", flush=True)
            print(f"[{answer.name}] ", end="", flush=True)
            for piece in answer.pieces:
                print(piece, end="", flush=True)
            print(" (stopped)" if answer.stopped else "", flush=True)
            if moderator is not None:
                print(f"    moderation: {chat.describe_verdict(answer.speaker.verdicts[-1])}", flush=True)


COMMANDS = {"sample": (add_arguments, run), "chat": (add_chat_arguments, run_chat)}
