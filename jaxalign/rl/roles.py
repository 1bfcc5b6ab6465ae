"""The six roles of PPO-Lagrangian and the pure functions that apply them (spec §3.3).

    actor          Llama, trained (AdamW, cosine)         params["actor"]
    reference      Llama, frozen copy of the actor init    params["reference"]
    reward         ScoreModel end score, frozen            params["reward"]
    cost           ScoreModel end score, frozen            params["cost"]
    reward_critic  ScoreModel per-token, trained (const)   params["reward_critic"] (init: reward model)
    cost_critic    ScoreModel per-token, trained (const)   params["cost_critic"]   (init: cost model)

Params travel separately from the functions, so the same `RoleFns` serve every jit and a test
can inject exact score functions of the tokens through the same interface.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.generate import sampler
from jaxalign.models import score
from jaxalign.models.llama import Llama, LlamaConfig
from jaxalign.parallel import mesh as mesh_lib

ROLES = ("actor", "reference", "reward", "cost", "reward_critic", "cost_critic")
TRAINED_ROLES = ("actor", "reward_critic", "cost_critic")

# (params, input_ids [B,L], attention_mask [B,L]) -> logits [B,L,V] fp32
PolicyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, input_ids [B,L], attention_mask [B,L]) -> per-token scores [B,L] fp32
ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, prompt_ids [B,S], prompt_mask [B,S], rng) -> (input_ids [B,S+N], attention_mask [B,S+N]):
# prompt + sampled response, pad after EOS; the mask covers real prompt tokens and the response
# up to and including EOS (jaxalign.generate.sampler.sample)
GenerateFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RoleFns:
    """How each role is applied. Critics and score models return per-token scores; the
    sequence score is read at the last real token (spec §3.2)."""

    policy: PolicyFn  # actor and reference
    generate: GenerateFn  # the actor's sampler
    reward: ScoreFn
    reward_critic: ScoreFn
    cost: ScoreFn | None = None
    cost_critic: ScoreFn | None = None


def llama_policy(cfg: LlamaConfig) -> PolicyFn:
    """PolicyFn of a Llama LM."""
    model = Llama(cfg)

    def apply(params, input_ids, attention_mask):
        return model.apply({"params": params}, input_ids, attention_mask=attention_mask).logits

    return apply


def used_roles(algorithm: str, use_cost_model: bool) -> tuple[str, ...]:
    """Roles an algorithm needs: ppo (+ cost model for logging), ppo_lag (all six),
    ppo_reward_shaping (no cost critic)."""
    roles = ["actor", "reference", "reward", "reward_critic"]
    if use_cost_model or algorithm in ("ppo_lag", "ppo_reward_shaping"):
        roles.append("cost")
    if algorithm == "ppo_lag":
        roles.append("cost_critic")
    return tuple(roles)


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------------ loading


def score_role_fn(model: nn.Module, stats: dict | None = None, score_type: str | None = None) -> ScoreFn:
    """ScoreFn of a ScoreModel (first score dimension), normalized with `stats` when given."""

    def apply(params, input_ids, attention_mask):
        scores = model.apply({"params": params}, input_ids, attention_mask=attention_mask).scores
        if stats is not None:
            scores = score.normalize(scores, stats, score_type)
        return scores[..., 0]

    return apply


def param_shardings_of(model: nn.Module, mesh, rules) -> Any:
    """NamedShardings of `model`'s params from its logical axis annotations (nothing allocated)."""
    with mesh_lib.sharding_context(mesh, rules):
        boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"], jax.random.PRNGKey(0))
        return mesh_lib.logical_shardings(boxed, mesh, rules)


def load_policy(config, tokenizer, mesh, rules, rng: jax.Array) -> tuple[LlamaConfig, Any, Any]:
    """(cfg, params, shardings) of the policy in config.model.init_path (random init when "").

    Called once for the actor and once for the reference, so the two never share buffers.
    """
    from jaxalign.train import sft_stage

    cfg = dataclasses.replace(sft_stage.model_config_for(config, tokenizer), vocab_size=len(tokenizer))
    model = Llama(cfg)
    shardings = param_shardings_of(model, mesh, rules)
    if config.model.init_path:
        _, params = sft_stage.load_hf_params(sft_stage.model_config_for(config, tokenizer), config.model.init_path,
                                             len(tokenizer), shardings)
    else:
        init_fn = lambda r: model.init(r, jnp.zeros((1, 1), jnp.int32))["params"]  # noqa: E731
        params, _ = mesh_lib.init_sharded(init_fn, rng, mesh, rules)
    return cfg, params, shardings


def load_score_role(config, path: str, score_type: str, vocab_size: int, mesh, rules,
                    normalize: bool = False) -> tuple[ScoreFn, Any, Any]:
    """(score_fn, params, shardings) of a score-model dir (score_stage export) as `score_type`.

    score_type: "reward" / "cost" (frozen scorers, optionally normalized with the stored
    statistics) or "critic" (trainable, never normalized). The model's vocabulary must cover
    the actor's tokenizer: upstream requires the same tokenizer for critics (spec §3.3).
    """
    cfg, head, host_params, stats = score.load_score_model(
        path, dtype=config.model.dtype, score_type=score_type, on_host=True,
        param_dtype=config.model.param_dtype, scan_layers=bool(config.model.scan_layers),
        remat_policy=config.model.remat_policy)
    if cfg.vocab_size < vocab_size:
        raise ValueError(f"score model {path} has a vocabulary of {cfg.vocab_size} < the actor tokenizer's "
                         f"{vocab_size}; RL needs score models trained with the actor's tokenizer")
    model = head.model(cfg)
    shardings = param_shardings_of(model, mesh, rules)
    params = jax.tree.map(lambda x, s: mesh_lib.put_sharded(np.asarray(x), s), host_params, shardings)
    fn = score_role_fn(model, jax.device_get(stats) if normalize else None, score_type)
    return fn, params, shardings


def sampler_fn(cfg: LlamaConfig, settings, pad_token_id: int) -> GenerateFn:
    """GenerateFn of the jit sampler with the run's temperature / top-p / max new tokens."""
    sampling = sampler.SamplingConfig(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        eos_token_ids=cfg.eos_token_ids, pad_token_id=pad_token_id)

    def generate(params, prompt_ids, prompt_mask, rng):
        out = sampler.sample(params, cfg, prompt_ids, prompt_mask, rng, sampling)
        return out.sequences, out.sequence_mask

    return generate


def load_roles(config, settings, tokenizer, mesh, rules) -> tuple[RoleFns, dict, dict, LlamaConfig]:
    """Every role the algorithm uses, placed on the mesh. -> (fns, params, shardings, actor cfg)
    where params/shardings are dicts keyed by role name (spec §3.3: critics default to the RM/CM)."""
    rl = config.rl
    rng = jax.random.PRNGKey(config.seed)
    vocab_size = len(tokenizer)
    cfg, actor, actor_sh = load_policy(config, tokenizer, mesh, rules, rng)
    _, reference, _ = load_policy(config, tokenizer, mesh, rules, rng)
    params = {"actor": actor, "reference": reference}
    shardings = {"actor": actor_sh, "reference": actor_sh}
    fns = {}
    paths = {
        "reward": (rl.reward_model_path, "reward", settings.normalize_reward),
        "reward_critic": (rl.reward_critic_model_path or rl.reward_model_path, "critic", False),
        "cost": (rl.cost_model_path, "cost", settings.normalize_cost),
        "cost_critic": (rl.cost_critic_model_path or rl.cost_model_path, "critic", False),
    }
    for role in used_roles(settings.algorithm, settings.use_cost_model):
        if role in params:
            continue
        path, score_type, normalize = paths[role]
        if not path:
            raise ValueError(f"{settings.algorithm} needs a {role} model: set config.rl.{role}_model_path")
        fns[role], params[role], shardings[role] = load_score_role(config, path, score_type, vocab_size, mesh,
                                                                   rules, normalize)
        logging.info("%s: %s (%s, %d parameters)", role, path, score_type, param_count(params[role]))
    role_fns = RoleFns(policy=llama_policy(cfg), generate=sampler_fn(cfg, settings, tokenizer.pad_token_id), **fns)
    return role_fns, params, shardings, cfg
