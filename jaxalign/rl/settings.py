"""RLSettings: the static (hashable) view of `config.rl` that the compiled RL steps close over.

Its fields are exactly the numeric/flag fields of `config.rl` (configs/base.py holds every default
with a comment); the role paths and the critic optimizer are read by the stage.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Everything the rollout, scoring and update steps need besides arrays (spec §5, §6.1)."""

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
    cost_per_token: bool  # ppo_lag / multi_lag: moderation costs per token from the streaming head
    threshold: float  # ppo_lag: mean episode cost <= threshold
    lambda_init: float  # ppo_lag: initial lambda; ppo_reward_shaping: the constant nu
    lambda_lr: float
    lambda_max: float | None  # None: no cap
    lambda_update_delay_steps: int
    episode_cost_window_size: int
    whiten_advantages: bool
    adaptive_kl: bool
    target_kl: float
    kl_horizon: float
    ppo_epochs: int  # upstream update_iters
    num_minibatches: int
    num_return_sequences: int  # responses sampled per prompt (safe_grpo's group size); 1 upstream
    # > 0: each rollout drops the padding columns no row uses (prompts on the left, responses on the
    # right), keeping a multiple of length_bucket; 0: every batch is prompt_length + max_new_tokens
    length_bucket: int

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"config.rl.{field.name} must be finite, got {value}")
        if self.lambda_init <= 0:
            raise ValueError(f"config.rl.lambda_init must be > 0, got {self.lambda_init}")
        if self.lambda_max is not None and self.lambda_max <= 0:
            raise ValueError(f"config.rl.lambda_max must be > 0 or None, got {self.lambda_max}")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("config.rl.ppo_epochs and config.rl.num_minibatches must be >= 1")
        if self.prompt_length < 1 or self.max_new_tokens < 1:
            raise ValueError("config.rl.prompt_length and config.rl.max_new_tokens must be >= 1")
        if self.num_return_sequences < 1:
            raise ValueError(f"config.rl.num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.length_bucket < 0:
            raise ValueError(f"config.rl.length_bucket must be >= 0 (0 = fixed lengths), got {self.length_bucket}")
        if self.episode_cost_window_size < 1:
            raise ValueError("config.rl.episode_cost_window_size must be >= 1")

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.max_new_tokens

    @property
    def start(self) -> int:
        """Shifted slot holding the prediction of the first response token (spec §5.3)."""
        return self.prompt_length - 1

    def bucketed(self, used: int, cap: int) -> int:
        """The columns kept when `used` of `cap` carry a real token: `used` rounded up to a multiple
        of length_bucket, at most cap (cap when length_bucket is 0)."""
        if self.length_bucket <= 0:
            return cap
        return min(cap, max(1, -(-used // self.length_bucket)) * self.length_bucket)

    @classmethod
    def from_group(cls, rl) -> "RLSettings":
        """From the `config.rl` group; lambda_max <= 0 means no cap (config files cannot hold None
        and stay overridable from the command line)."""
        values = {field.name: rl[field.name] for field in dataclasses.fields(cls)}
        if values["lambda_max"] is not None and values["lambda_max"] <= 0:
            values["lambda_max"] = None
        return cls(**values)
