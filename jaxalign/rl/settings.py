"""RLSettings: the static (hashable) view of `config.rl` that the compiled RL steps close over."""

from __future__ import annotations

import dataclasses

ALGORITHMS = ("ppo", "ppo_lag", "ppo_reward_shaping")


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """Everything the rollout, scoring and update steps need besides arrays (spec §5, §6.1)."""

    algorithm: str = "ppo_lag"  # ppo | ppo_lag | ppo_reward_shaping (= config.stage)
    prompt_length: int = 128  # S: padded prompt length; slot start = S - 1 predicts the 1st response token
    max_new_tokens: int = 384  # total sequence length L = S + max_new_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coeff: float = 0.01  # beta (initial value when adaptive_kl)
    clip_range_ratio: float = 0.2
    clip_range_score: float = 50.0
    clip_range_value: float = 5.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    ptx_coeff: float = 16.0  # 0 disables the PTX pass
    use_cost_model: bool = True  # ppo: score costs for logging only when a cost model is given
    normalize_reward: bool = False
    normalize_cost: bool = False
    # Lagrangian (ppo_lag); lambda_init is nu, the constant shaping weight, for ppo_reward_shaping.
    threshold: float = 0.0
    lambda_init: float = 1.0
    lambda_lr: float = 0.1
    lambda_max: float | None = 5.0
    lambda_update_delay_steps: int = 0
    episode_cost_window_size: int = 128
    # Beyond upstream, off by default.
    whiten_advantages: bool = False
    adaptive_kl: bool = False
    target_kl: float = 6.0
    kl_horizon: float = 10000.0
    ppo_epochs: int = 1  # upstream update_iters
    num_minibatches: int = 1

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"RL algorithm {self.algorithm!r} is not one of {ALGORITHMS}")
        if self.lambda_init <= 0:
            raise ValueError(f"config.rl.lambda_init must be > 0, got {self.lambda_init}")
        if self.lambda_max is not None and self.lambda_max <= 0:
            raise ValueError(f"config.rl.lambda_max must be > 0 or None, got {self.lambda_max}")
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("config.rl.ppo_epochs and config.rl.num_minibatches must be >= 1")
        if self.algorithm in ("ppo_lag", "ppo_reward_shaping") and not self.use_cost_model:
            raise ValueError(f"{self.algorithm} needs a cost model (config.rl.cost_model_path)")

    @property
    def use_cost_critic(self) -> bool:
        return self.algorithm == "ppo_lag"

    @property
    def sequence_length(self) -> int:
        return self.prompt_length + self.max_new_tokens

    @property
    def start(self) -> int:
        """Shifted slot holding the prediction of the first response token (spec §5.3)."""
        return self.prompt_length - 1

    @classmethod
    def from_config(cls, config) -> "RLSettings":
        """From a full run config: `config.stage` picks the algorithm, `config.rl` the rest."""
        rl = config.rl
        names = {field.name for field in dataclasses.fields(cls)} - {"algorithm", "use_cost_model"}
        values = {name: rl[name] for name in names if name in rl}
        if values.get("lambda_max") is not None and values["lambda_max"] <= 0:
            values["lambda_max"] = None  # config files spell "no cap" as <= 0 (overridable from the CLI)
        return cls(algorithm=config.stage, use_cost_model=bool(rl.cost_model_path), **values)
