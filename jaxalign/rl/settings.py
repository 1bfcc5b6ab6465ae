"""The static (hashable) settings the compiled RL steps close over.

RLSettings: what every algorithm uses, the fields of the shared group `config.rl` (configs/base.py
holds their defaults with a comment). AlgorithmSettings: the base of each algorithm's own settings
(rl/algorithms/<name>.py), read from its group `config.rl.<name>`; configs/base.py builds those groups
from the dataclasses' defaults (rl/algorithms.config_groups). The role paths, PTX data and the critic
optimizer of `config.rl` are read by the stage.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


OLD_LOG_PROBS = ("recompute", "sampler")  # where the PPO ratio's old log-probs come from


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Rollout, KL shaping, GAE, PPO update and PTX settings of every algorithm (upstream
    safe-rlhf/safe_rlhf/trainers/rl_trainer.py and safe_rlhf/algorithms/ppo/trainer.py)."""

    prompt_length: int  # S: padded prompt length; slot start = S - 1 predicts the 1st response token
    max_new_tokens: int  # total sequence length L = S + max_new_tokens
    temperature: float
    top_p: float
    kl_coeff: float  # beta (initial value when adaptive_kl)
    clip_range_ratio: float
    clip_range_score: float
    clip_range_value: float
    gamma: float
    gae_lambda: float
    ptx_coeff: float  # 0 disables the PTX pass
    normalize_reward: bool
    normalize_cost: bool
    whiten_advantages: bool
    adaptive_kl: bool
    target_kl: float
    kl_horizon: float
    ppo_epochs: int  # upstream update_iters
    num_minibatches: int
    num_return_sequences: int  # responses sampled per prompt (the group of a GRPO-family algorithm); 1 upstream
    # > 0: each rollout drops the padding columns no row uses (prompts on the left, responses on the
    # right), keeping a multiple of length_bucket; 0: every batch is prompt_length + max_new_tokens
    length_bucket: int
    # > 0: the actor's log-probs (scoring, update, PTX) from its LM head and log-softmax this many
    # positions at a time, never the whole [B, L, V] fp32 logits; 0: the whole logits
    logits_chunk: int
    # "recompute": the actor's old log-probs from a scoring forward; "sampler": the sampler's own,
    # recorded while it decoded (one forward fewer), refused when they differ from the actor's by
    # more than max_logprob_gap (measured by each iteration's first update, rl/iteration.py)
    old_log_probs: str
    max_logprob_gap: float

    def __post_init__(self):
        check_finite(self, "config.rl")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("config.rl.ppo_epochs and config.rl.num_minibatches must be >= 1")
        if self.prompt_length < 1 or self.max_new_tokens < 1:
            raise ValueError("config.rl.prompt_length and config.rl.max_new_tokens must be >= 1")
        if self.num_return_sequences < 1:
            raise ValueError(f"config.rl.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.logits_chunk < 0:
            raise ValueError(f"config.rl.logits_chunk must be >= 0 (0 = whole logits), got {self.logits_chunk}")
        if self.old_log_probs not in OLD_LOG_PROBS:
            raise ValueError(f"config.rl.old_log_probs must be one of {', '.join(OLD_LOG_PROBS)}, "
                             f"got {self.old_log_probs!r}")
        if not self.max_logprob_gap > 0:
            raise ValueError(f"config.rl.max_logprob_gap must be > 0, got {self.max_logprob_gap}")
        if self.length_bucket < 0:
            raise ValueError(f"config.rl.length_bucket must be >= 0 (0 = fixed lengths), got {self.length_bucket}")

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.max_new_tokens

    @property
    def start(self) -> int:
        """Shifted slot holding the prediction of the first response token (upstream
        safe_rlhf/algorithms/ppo/trainer.py: start = prompt.size(-1) - 1)."""
        return self.prompt_length - 1

    def bucketed(self, used: int, cap: int) -> int:
        """The columns kept when `used` of `cap` carry a real token: `used` rounded up to a multiple
        of length_bucket, at most cap (cap when length_bucket is 0)."""
        if self.length_bucket <= 0:
            return cap
        return min(cap, max(1, -(-used // self.length_bucket)) * self.length_bucket)

    @classmethod
    def from_group(cls, rl: Mapping) -> "RLSettings":
        """From the shared `config.rl` group (its other fields and sub-groups are read elsewhere)."""
        return cls(**{field.name: rl[field.name] for field in dataclasses.fields(cls)})


def check_finite(settings: Any, where: str) -> None:
    """ValueError naming `where`.<field> for the first float field that is nan or +-inf."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{where}.{field.name} must be finite, got {value}")


@dataclasses.dataclass(frozen=True)
class AlgorithmSettings:
    """Base of an algorithm's own settings (none here). A subclass lists its fields with defaults
    (ints, floats, bools or strings: the types a config field can hold) and extends `check`. The
    algorithm checks its settings when it is built (rl/algorithms/base.py), naming its group."""

    def check(self, where: str) -> None:
        """ValueError naming `where`.<field> (e.g. config.rl.ppo_lag.lambda_lr) for a bad value; here
        a non-finite float."""
        check_finite(self, where)

    @classmethod
    def from_group(cls, group: Mapping, where: str) -> "AlgorithmSettings":
        """From the config group at `where` (e.g. config.rl.ppo_lag): exactly one value per field."""
        missing = [field.name for field in dataclasses.fields(cls) if field.name not in group]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)} (configs/base.py builds this group from "
                             f"{cls.__name__}'s defaults)")
        names = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(group) - set(names))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(names)}")
        return cls(**{name: group[name] for name in names})

    @classmethod
    def defaults(cls) -> dict:
        """{field: default}: the config group of these settings."""
        return {field.name: field.default for field in dataclasses.fields(cls)}
