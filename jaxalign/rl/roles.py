"""The roles of RLHF and the pure functions that apply them (upstream
safe-rlhf/safe_rlhf/trainers/rl_trainer.py init_models, safe_rlhf/algorithms/ppo_lag/trainer.py).

    actor          causal LM, trained (AdamW, cosine)        params["actor"]
    reference      causal LM, frozen copy of the actor init  params["reference"]
    reward, cost   score models (end score), frozen          params["reward"], params["cost"]
    <s>_critic     score models (per token), trained         params["reward_critic"], params["cost_critic"]
                   (initialised from the reward / cost model unless a critic path is given)

With LoRA (config.lora) a trained role can be adapters on a frozen role's params (RoleFns.bases): the
actor on the reference, and with config.lora.critics each critic on its reward / cost model (its
trained params: the adapters + its own score head, a copy of the scorer's at the start).

An algorithm (rl/algorithms) names the roles it uses. Params travel separately from the
functions, so the same `RoleFns` serve every jit and a test can inject exact score functions of
the tokens through the same interface.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxalign import models
from jaxalign.generate import sampler
from jaxalign.models import loading, lora, moderation, score
from jaxalign.objectives.common import chunked_next_token_log_probs
from jaxalign.rl.settings import RLSettings

TRAINED = ("actor",)  # plus every "<stream>_critic" role

# (params, input_ids [B,L], attention_mask [B,L][, logits_from]) -> logits [B,L-logits_from,V] fp32
PolicyFn = Callable[..., jax.Array]
# (params, input_ids [B,L], attention_mask [B,L], start) -> log-probs [B,L-start-1] fp32 of each next
# token: log pi(input_ids[:, t+1] | input_ids[:, :t+1]) for t >= start
LogProbsFn = Callable[[Any, jax.Array, jax.Array, int], jax.Array]
# (params, input_ids [B,L], attention_mask [B,L]) -> per-token scores [B,L] fp32
ScoreFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, prompt_ids [B,S], prompt_mask [B,S], rng) ->
#   (input_ids [B,S+N], attention_mask [B,S+N], log_probs [B,N]):
# prompt + sampled response, pad after EOS; the mask covers real prompt tokens and the response
# up to and including EOS, less any masked token id (upstream: <pad>/<unk> anywhere); log_probs are
# the sampler's own log-probs of the response tokens (jaxalign.generate.sampler.sample)
GenerateFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class RoleFns:
    """How each role is applied: the policy (actor and reference), its sampler, and a ScoreFn per
    score role ("reward", "cost", "reward_critic", ...). Sequence scores are read at the last
    real token (upstream safe_rlhf/models/score_model: end_scores)."""

    policy: PolicyFn
    generate: GenerateFn | None
    scores: dict[str, ScoreFn]
    # {scorer role: its own tokenizer} for a reward / cost model trained with another tokenizer:
    # its inputs are the actor's sequences re-tokenised (rollout.retokenize, upstream rl_trainer.py batch_retokenize)
    retokenizers: dict = dataclasses.field(default_factory=dict)
    actor_tokenizer: Any = None  # decodes the actor's sequences for re-tokenisation
    # LoRA: {trained role: the frozen role whose params are its base} (actor -> "reference"; with
    # config.lora.critics "<s>_critic" -> "<s>"); such a role's trained params are only its adapters
    # (+ a critic's score head) and steps.role_params pairs them with the base. Absent = fully trained.
    bases: dict = dataclasses.field(default_factory=dict)
    # The policy's next-token log-probs without its full logits (log_probs_fn); None: from `policy`'s
    # logits (rollout.policy_log_probs).
    log_probs: LogProbsFn | None = None

    def __hash__(self):  # closed over by jit; identity is enough
        return id(self)

    @property
    def actor_base(self) -> str:
        """The LoRA actor's base role ("" = a fully trained actor)."""
        return self.bases.get("actor", "")


@dataclasses.dataclass(frozen=True)
class RolePaths:
    """Score-model dirs of config.rl (critics default to the reward / cost model).

    cost_signal: the moderation signal (models/moderation.cost_signal) the "cost" role reads when the
    cost model is a moderation export; constraints: (role, signal) pairs of multi_lag's extra cost
    roles, each reading the moderation model at `cost` with its own signal (its critic: the
    moderation backbone + a fresh head)."""

    reward: str = ""
    cost: str = ""
    reward_critic: str = ""
    cost_critic: str = ""
    cost_signal: str = "unsafe"
    constraints: tuple[tuple[str, str], ...] = ()

    def path(self, role: str) -> str:
        base = role[: -len("_critic")] if role.endswith("_critic") else role
        if base in dict(self.constraints):
            return self.cost
        if role.endswith("_critic"):
            return getattr(self, role) or getattr(self, base)
        return getattr(self, role)

    def signal(self, role: str) -> str:
        """The moderation signal a (non-critic) role reads from a moderation model."""
        return dict(self.constraints).get(role, self.cost_signal)

    def check(self, token_streams: tuple[str, ...] = (), where: str = "config.rl") -> None:
        """ValueError naming the config field when a role reads a moderation signal (cost_signal other
        than "unsafe", the constraints, per-token costs of `token_streams`) but `cost` is not a
        moderation export, or when a signal is unknown. where: the algorithm's group, for the
        per-token costs' field."""
        moderation_cost = bool(self.cost) and moderation.is_moderation_dir(self.cost)
        if moderation_cost:
            check_signal(self.cost_signal, "config.rl.cost_signal")
        elif self.cost_signal != "unsafe":
            raise ValueError(f"config.rl.cost_signal={self.cost_signal!r} needs config.rl.cost_model_path to be a "
                             f"moderation export (got {self.cost!r})")
        if self.constraints and not moderation_cost:
            raise ValueError(f"{where}.constraints: {', '.join(s for _, s in self.constraints)} read a moderation "
                             f"model but config.rl.cost_model_path={self.cost!r} is not a moderation export")
        if token_streams and not moderation_cost:
            raise ValueError(f"{where}.cost_per_token needs config.rl.cost_model_path to be a moderation export (its "
                             f"streaming head scores every prefix), got {self.cost!r}")


def check_signal(signal: str, field: str) -> None:
    """A moderation signal (models/moderation.cost_signal) or ValueError naming `field`."""
    index = signal[len("category:"):] if signal.startswith("category:") else ""
    if signal in moderation.COST_SIGNALS or (index.isdigit() and int(index) < len(moderation.HARM_CATEGORIES)):
        return
    raise ValueError(f"{field}: unknown moderation signal {signal!r}; expected one of "
                     f"{', '.join(moderation.COST_SIGNALS)} or category:<index> with index < "
                     f"{len(moderation.HARM_CATEGORIES)}")


def policy_fn(cfg, lora_settings: lora.LoraSettings | None = None) -> PolicyFn:
    """PolicyFn of a causal LM of any family; with lora_settings it also takes a LoRA model's
    lora.Adapted(base, adapters) params (the actor), plain params being the base model (the reference)."""
    module = models.causal_lm(cfg)
    adapted = lora.wrap(module, lora_settings) if lora_settings is not None and lora_settings.enabled else None

    def apply(params, input_ids, attention_mask, logits_from=0):
        if isinstance(params, lora.Adapted):
            params = lora.combine(params.base, params.adapters, cfg.compute_dtype)
            return adapted.apply({"params": params}, input_ids, attention_mask=attention_mask,
                                 logits_from=logits_from).logits
        return module.apply({"params": params}, input_ids, attention_mask=attention_mask, logits_from=logits_from).logits

    return apply


def log_probs_fn(cfg, lora_settings: lora.LoraSettings | None = None, chunk_size: int = 0) -> LogProbsFn | None:
    """LogProbsFn of policy_fn's model (the same params: plain or lora.Adapted) whose LM head and
    log-softmax run chunk_size positions at a time (objectives.common.chunked_next_token_log_probs):
    the [B, L - start, V] fp32 logits, the largest temporary of a 128k-vocabulary update, are never
    materialised. chunk_size 0 (config.rl.logits_chunk's default): None, the log-probs come from
    policy_fn's whole logits (RoleFns.log_probs)."""
    if chunk_size <= 0:
        return None
    module = models.causal_lm(cfg)
    adapted = lora.wrap(module, lora_settings) if lora_settings is not None and lora_settings.enabled else None

    def apply(params, input_ids, attention_mask, start=0):
        model = module
        if isinstance(params, lora.Adapted):
            params, model = lora.combine(params.base, params.adapters, cfg.compute_dtype), adapted
        variables = {"params": params}
        # the backbone's hidden states [B, L, D]; logits of the last position only (qwix's LoRA cannot
        # reshape an empty [B, 0, V])
        hidden = model.apply(variables, input_ids, attention_mask=attention_mask,
                             logits_from=input_ids.shape[1] - 1).hidden_states[:, start:]
        head = lambda h: module.apply(variables, h, method="head")  # noqa: E731 (no adapter on the LM head)
        return chunked_next_token_log_probs(hidden, head, input_ids[:, start:], chunk_size)

    return apply


@dataclasses.dataclass(frozen=True, eq=False)
class ScoreModelFn:
    """ScoreFn of a ScoreModel (first score dimension), normalized with `stats` when given.

    Split in two so that roles of one architecture run as one vmapped pass over stacked params
    (rl/stacking.py): `raw` is the module's pass (shared when `stack_key`s are equal), `finish`
    the role's own normalization."""

    module: nn.Module
    stats: dict | None = None
    score_type: str | None = None
    # a LoRA critic: lora.wrap(module), applied to lora.Adapted(frozen scorer params, adapters + head)
    adapted: nn.Module | None = None

    @property
    def stack_key(self):
        # A LoRA critic runs alone: stacking it with another would stack their frozen bases (a copy of each).
        return self if self.adapted is not None else self.module

    def raw(self, params, input_ids, attention_mask):
        """-> scores [B,L,K] fp32."""
        if isinstance(params, lora.Adapted):
            params = lora.combine(params.base, params.adapters, self.module.cfg.compute_dtype)
            return self.adapted.apply({"params": params}, input_ids, attention_mask=attention_mask).scores
        return self.module.apply({"params": params}, input_ids, attention_mask=attention_mask).scores

    def finish(self, scores):
        """[..., K] -> [...]."""
        if self.stats is not None:
            scores = score.normalize(scores, self.stats, self.score_type)
        return scores[..., 0]

    def __call__(self, params, input_ids, attention_mask):
        return self.finish(self.raw(params, input_ids, attention_mask))


def score_role_fn(module: nn.Module, stats: dict | None = None, score_type: str | None = None) -> ScoreFn:
    """ScoreFn of a ScoreModel (first score dimension), normalized with `stats` when given."""
    return ScoreModelFn(module, stats, score_type)


def sampler_fn(cfg, settings: RLSettings, pad_token_id: int, masked_token_ids: tuple[int, ...] = (),
               lora_settings: lora.LoraSettings | None = None) -> GenerateFn:
    """GenerateFn of the jit sampler with the run's temperature / top-p / max new tokens.

    masked_token_ids: ids left out of the attention mask wherever they occur, as upstream's
    `mask = (seq != pad) & (seq != unk)` (safe_rlhf/trainers/rl_trainer.py generate): a <pad>/<unk> sampled mid-response is then
    neither attended to nor scored (the sampler itself still fed it, as HF generate does). EOS ids
    are never masked. lora.Adapted params (a LoRA actor) are merged (W + alpha/r * A @ B) before sampling."""
    sampling = sampler.SamplingConfig(
        max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        eos_token_ids=cfg.eos_token_ids, pad_token_id=pad_token_id)
    # EOS is never masked (a tokenizer whose pad is its EOS would otherwise lose every end score).
    masked = tuple(sorted({int(i) for i in masked_token_ids if i is not None} - set(cfg.eos_token_ids)))

    def generate(params, prompt_ids, prompt_mask, rng):
        if isinstance(params, lora.Adapted):
            params = lora.merge(params.base, params.adapters, lora_settings)
        out = sampler.sample(params, cfg, prompt_ids, prompt_mask, rng, sampling)
        mask = out.sequence_mask
        if masked:
            mask = mask & ~jnp.isin(out.sequences, jnp.asarray(masked, jnp.int32))
        return out.sequences, mask, out.log_probs

    return generate


def check_sequence_length(cfg, settings: RLSettings) -> None:
    """Warns when rl.prompt_length + rl.max_new_tokens exceeds the actor's max_position_embeddings
    (RoPE then runs past the positions the model was trained on)."""
    total = settings.prompt_length + settings.max_new_tokens
    if total > cfg.max_position_embeddings:
        logging.warning("config.rl.prompt_length + config.rl.max_new_tokens = %d + %d = %d exceeds the actor's "
                        "max_position_embeddings %d: positions past it were never trained",
                        settings.prompt_length, settings.max_new_tokens, total, cfg.max_position_embeddings)


def param_count(params: Any) -> int:
    """Number of scalars in a params pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))


def moderation_role(role: str, path: str, model: loading.ModelSettings, tokenizer, mesh, rules,
                    rng: jax.Array, signal: str = "unsafe", loaded: dict | None = None) -> tuple[ScoreFn, Any, Any]:
    """A moderation model (models/moderation.py) in a score role -> (fn, params, shardings): a scorer
    reads `signal` (moderation.cost_signal; default P(unsafe)) at every token (at the end token: the
    sequence cost, in [0, 1] or [0, 3]); a critic is its backbone + a fresh critic head. `loaded`
    ({path: placed model}) lets several frozen scorers of one export (multi_lag) share one copy."""
    settings = dataclasses.replace(model, init_path=path)
    if role.endswith("_critic"):
        placed = loading.load_backbone_with_head(settings, score.ScoreHead(score_type="critic"), mesh, rules,
                                                 vocab_size=len(tokenizer), special=loading.special_ids(tokenizer),
                                                 rng=rng)
        return score_role_fn(placed.module), placed.params, placed.shardings
    placed = (loaded or {}).get(path) or loading.load_moderation_model(settings, mesh, rules,
                                                                       min_vocab_size=len(tokenizer))
    if loaded is not None:
        loaded[path] = placed
    return moderation_score_fn(placed.module, signal), placed.params, placed.shardings


def moderation_score_fn(module: nn.Module, signal: str = "unsafe") -> ScoreFn:
    """ScoreFn of a moderation model reading `signal` (moderation.cost_signal) at every token."""

    def apply(params, input_ids, attention_mask):
        out = module.apply({"params": params}, input_ids, attention_mask=attention_mask)
        return moderation.cost_signal(out, signal)

    return apply


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def own_tokenizer(role: str, path: str, tokenizer):
    """The tokenizer saved in a score-model dir when it differs from the actor's (vocab or special
    tokens), else None (no tokenizer there, or the same one). A critic must share the actor's
    tokenizer (upstream rl_trainer.py init_models raises too): ValueError naming the dir."""
    from jaxalign.models import tokenizer as tokenizer_lib

    if not any((pathlib.Path(path) / name).is_file() for name in TOKENIZER_FILES):
        return None
    own = tokenizer_lib.load_tokenizer(path)
    if own.get_vocab() == tokenizer.get_vocab() and own.all_special_tokens == tokenizer.all_special_tokens:
        return None
    if role.endswith("_critic"):
        raise ValueError(f"{role} model {path}: its tokenizer differs from the actor's; a critic must use the actor's "
                         f"tokenizer (set config.rl.{role}_model_path to a score model trained with it)")
    return own


def load_roles(role_names: tuple[str, ...], model: loading.ModelSettings, paths: RolePaths, settings: RLSettings,
               tokenizer, mesh, rules, rng: jax.Array, lora_settings: lora.LoraSettings | None = None,
               lora_critics: bool = False, frozen_param_dtype: str = "") -> tuple[RoleFns, dict, dict, Any]:
    """Every role in `role_names`, placed on the mesh. -> (fns, params, shardings, actor cfg),
    params and shardings keyed by role. The actor and the reference are loaded separately so they
    never share buffers (the train step donates the actor). With LoRA (lora_settings.rank > 0) the
    policy is loaded once, as the reference, and the actor's params are fresh adapters on it;
    lora_critics: each critic is fresh adapters + a copy of its scorer's head on the frozen scorer.
    frozen_param_dtype: the storage dtype of the frozen roles (reference, scorers; "" = model.param_dtype)."""
    lora_on = lora_settings is not None and lora_settings.enabled
    if lora_critics and not lora_on:
        raise ValueError("config.lora.critics=True needs LoRA on: set config.lora.rank > 0")
    frozen_model = dataclasses.replace(model, param_dtype=frozen_param_dtype) if frozen_param_dtype else model
    special = loading.special_ids(tokenizer)
    reference = loading.load_policy(frozen_model, mesh, rules, vocab_size=len(tokenizer), special=special, rng=rng)
    bases = {}
    if lora_on:
        actor = reference
        adapters, adapter_shardings = lora.init_adapters(reference.module, lora_settings, jax.random.fold_in(rng, 7),
                                                         mesh, rules)
        params = {"actor": adapters, "reference": reference.params}
        shardings = {"actor": adapter_shardings, "reference": reference.shardings}
        bases["actor"] = "reference"
        logging.info("actor: LoRA rank %d on the reference (%d trained of %d parameters)", lora_settings.rank,
                     param_count(adapters), param_count(reference.params))
    else:
        actor = loading.load_policy(model, mesh, rules, vocab_size=len(tokenizer), special=special, rng=rng)
        params = {"actor": actor.params, "reference": reference.params}
        shardings = {"actor": actor.shardings, "reference": actor.shardings}
    score_fns, retokenizers, modules = {}, {}, {}
    loaded_moderation = {}  # frozen scorers of one moderation export share its params
    # scorers first: a LoRA critic is adapters on its scorer's params
    for role in sorted(role_names, key=lambda name: name.endswith("_critic")):
        if role in params:
            continue
        path = paths.path(role)
        if not path:
            raise ValueError(f"the {role} role needs a model: set config.rl.{role}_model_path")
        is_critic = role.endswith("_critic")
        if moderation.is_moderation_dir(path):  # a moderation model as the cost (P(unsafe))
            if is_critic and lora_critics:
                raise ValueError(f"config.lora.critics: the {role} is a moderation backbone + a fresh head ({path} is "
                                 f"a moderation export), which stays fully trained: set config.lora.critics=False")
            score_fns[role], params[role], shardings[role] = moderation_role(
                role, path, model if is_critic else frozen_model, tokenizer, mesh, rules, jax.random.fold_in(rng, 10),
                signal=paths.signal(role), loaded=loaded_moderation)
            logging.info("%s: %s (moderation model%s, %d parameters)", role, path,
                         "" if is_critic else f", signal {paths.signal(role)}", param_count(params[role]))
            continue
        own = own_tokenizer(role, path, tokenizer)
        if own is not None:  # a reward / cost model with its own tokenizer: re-tokenised inputs
            retokenizers[role] = own
            logging.info("%s: %s has its own tokenizer (%d tokens): sequences are re-tokenised", role, path, len(own))
        if is_critic and lora_critics:
            score_fns[role], params[role], shardings[role] = lora_critic(role, paths, model, lora_settings, params,
                                                                         shardings, modules, mesh, rules,
                                                                         jax.random.fold_in(rng, 11))
            bases[role] = role[: -len("_critic")]
            continue
        placed = loading.load_score_model(path, mesh, rules, model if is_critic else frozen_model,
                                          score_type="critic" if is_critic else role,
                                          min_vocab_size=len(own if own is not None else tokenizer))
        normalize = {"reward": settings.normalize_reward, "cost": settings.normalize_cost}.get(role, False)
        score_fns[role] = score_role_fn(placed.module, placed.stats if normalize else None, placed.head.score_type)
        params[role], shardings[role], modules[role] = placed.params, placed.shardings, placed.module
        logging.info("%s: %s (%s, %d parameters)", role, path, placed.head.score_type, param_count(placed.params))
    check_sequence_length(actor.cfg, settings)
    masked = (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None))
    fns = RoleFns(policy=policy_fn(actor.cfg, lora_settings),
                  log_probs=log_probs_fn(actor.cfg, lora_settings, settings.logits_chunk),
                  generate=sampler_fn(actor.cfg, settings, tokenizer.pad_token_id, masked, lora_settings),
                  scores=score_fns, retokenizers=retokenizers, actor_tokenizer=tokenizer, bases=bases)
    return fns, params, shardings, actor.cfg


def lora_critic(role: str, paths: RolePaths, model: loading.ModelSettings, lora_settings: lora.LoraSettings,
                params: dict, shardings: dict, modules: dict, mesh, rules,
                rng: jax.Array) -> tuple[ScoreFn, dict, dict]:
    """A LoRA critic on its frozen scorer (loaded before, in params / shardings / modules) -> (fn, trained
    params, their shardings): fresh adapters (B = 0) + a copy of the scorer's score head in
    model.param_dtype, so a fresh critic's values are the full critic's."""
    scorer = role[: -len("_critic")]
    if getattr(paths, role, ""):
        raise ValueError(f"config.lora.critics: a LoRA {role} is adapters on the frozen {scorer} model, so it starts "
                         f"from it: set config.rl.{role}_model_path='' (or config.lora.critics=False)")
    if scorer not in modules:
        raise ValueError(f"config.lora.critics: the {role} needs the {scorer} role's score model as its base "
                         f"(this algorithm has no {scorer} model): set config.lora.critics=False")
    module = modules[scorer]
    adapters, adapter_shardings = lora.init_adapters(module, lora_settings, rng, mesh, rules)
    dtype = jnp.dtype(model.param_dtype)
    # a copy (own buffers, trained dtype): the train step donates the critic, never the frozen scorer
    head = jax.tree.map(lambda x: jnp.array(x, dtype=dtype, copy=True), params[scorer]["score_head"])
    trained = {**adapters, "score_head": head}
    trained_shardings = {**adapter_shardings, "score_head": shardings[scorer]["score_head"]}
    logging.info("%s: LoRA rank %d on the %s model + its own score head (%d trained of %d parameters)", role,
                 lora_settings.rank, scorer, param_count(trained), param_count(params[scorer]))
    return ScoreModelFn(module, None, "critic", adapted=lora.wrap(module, lora_settings)), trained, trained_shardings
