"""Model FLOPs of the passes a step runs, for MFU: the formula of PaLM (Chowdhery et al. 2022,
arXiv:2204.02311, Appendix B), 6N + 12·L·H·Q·T per trained token and a third of it per forward token.

    passes = [Pass(counts, tokens=B * T, seq_len=T, kind="train")]
    model_flops(passes)

N counts the parameters of every matmul a token goes through (the decoder layers and the LM or score
head; not the input embedding, a lookup), H·Q the attention width (heads x head dim), L the layers,
T the sequence length. A trained pass with a frozen base (LoRA) computes no weight gradients of the
base: 4N instead of 6N. A decode pass of one token at context length c costs 2N + 4·L·H·Q·c.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax

KINDS = ("forward", "train", "train_frozen", "decode")


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """The sizes the formula reads from one model."""

    matmul_params: int  # N: every parameter used as a matmul weight (tied LM head included)
    layers: int
    attention_width: int  # heads x head_dim

    @classmethod
    def of(cls, cfg: Any, params: Any) -> "ModelCounts":
        """From a model config and its params (arrays or ShapeDtypeStructs): every leaf but the input
        embedding table; a tied LM head (no lm_head leaf in a causal LM) counted once more."""
        total, embedding, tops = 0, 0, set()
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
            names = [str(getattr(key, "key", key)) for key in path]
            tops.add(names[0])
            if "embed_tokens" in names:
                embedding = math.prod(leaf.shape)
            else:
                total += math.prod(leaf.shape)
        if tops == {"model"}:  # a tied causal LM: the embedding table is also its LM head
            total += embedding
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(int(total), int(cfg.num_hidden_layers), int(cfg.num_attention_heads * head_dim))


@dataclasses.dataclass(frozen=True)
class Pass:
    """One model run over `tokens` tokens of sequences `seq_len` long (decode: `tokens` new tokens
    at an average context length `seq_len`)."""

    model: ModelCounts
    tokens: int
    seq_len: int
    kind: str = "forward"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Pass.kind: expected one of {KINDS}, got {self.kind!r}")

    @property
    def flops(self) -> float:
        forward = 2 * self.model.matmul_params + 4 * self.model.layers * self.model.attention_width * self.seq_len
        factor = {"forward": 1, "decode": 1, "train": 3}.get(self.kind)
        if self.kind == "train_frozen":  # activations' gradients only: 4N, attention backward in full
            return self.tokens * (4 * self.model.matmul_params
                                  + 12 * self.model.layers * self.model.attention_width * self.seq_len)
        return self.tokens * forward * factor


def model_flops(passes: list[Pass]) -> float:
    """Total model FLOPs of the passes (all devices together)."""
    return float(sum(p.flops for p in passes))
