"""`jaxalign plan`: compile every step a stage runs for a TPU slice (or H100s), from the stage's config, on any machine.

    jaxalign plan --config configs/ppo_lag_llama2_7b.py --topology v5p-64 [--json OUT] [--search] [--config.a.b=v]

This module reads the config (the stages' own readers: common.model_settings, score.score_head,
rl.make_optimizers, ...) and builds the steps the stage compiles, from abstract inputs, with the
library the stage uses (jaxalign/plan: supervised.py, rl.py); jaxalign/plan compiles them on the
slice's compile-only devices and reads memory, flops, collectives and a roofline from the TPU
compiler. Model shapes: config.model.init_path's config.json when it exists, else
config.model.hf_config; the vocabulary of config.tokenizer (or init_path) when it exists. A score
role whose export does not exist yet (rl.reward_model_path, ...) takes the actor's architecture
(as a reward model trained from the SFT policy has); a cost model that a moderation signal or
the algorithm's per-token costs (config.rl.ppo_lag.cost_per_token) read is then a moderation model.
Data-dependent values that do not change the program (moderation's per-category positive weights)
are stand-ins.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pathlib

import jax

from jaxalign import config as config_lib
from jaxalign import models
from jaxalign.evaluate import moderation as moderation_eval
from jaxalign.evaluate import scores as scores_lib
from jaxalign.models import hf, loading, lora
from jaxalign.models import moderation as moderation_model
from jaxalign.models import score
from jaxalign.objectives import moderation as moderation_objective
from jaxalign.objectives import pairwise, preference, sft
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.plan import chips, flops, report, search as search_lib, supervised
from jaxalign.plan import rl as rl_plan
from jaxalign.plan import steps as steps_lib
from jaxalign.rl import algorithms
from jaxalign.rl.settings import RLSettings
from jaxalign.stages import STAGES, common
from jaxalign.stages import dpo as dpo_stage
from jaxalign.stages import moderation as moderation_stage
from jaxalign.stages import rl as rl_stage
from jaxalign.stages import score as score_stage
from jaxalign.train import optim, state as state_lib

log = logging.getLogger(__name__)
SCHEDULE_STEPS = 1000  # the learning-rate schedule's length does not change the program


# ------------------------------------------------------------------------------------ models


def _tokenizer(config):
    """The config's tokenizer when its directory exists, else None (shapes from the config)."""
    path = config.tokenizer or config.model.init_path
    if path and (pathlib.Path(path) / "tokenizer_config.json").is_file():
        return common.load_tokenizer(config)
    return None


def model_config(config, tokenizer=None):
    """The config's model: init_path's config.json if present, else config.model.hf_config; the
    tokenizer's vocabulary and special ids when there is one."""
    settings = common.model_settings(config)
    if settings.init_path and not (pathlib.Path(settings.init_path) / hf.CONFIG_NAME).is_file():
        log.info("config.model.init_path %s has no config.json yet: shapes from config.model.hf_config",
                 settings.init_path)
        settings = dataclasses.replace(settings, init_path="")
    if tokenizer is None:
        cfg = loading.model_config(settings)
        return cfg if cfg.pad_token_id is not None else dataclasses.replace(cfg, pad_token_id=0)
    return loading.model_config(settings, vocab_size=len(tokenizer), special=loading.special_ids(tokenizer))


def _export(path: str) -> str:
    """`path` when it holds a model export (config.json), else ""."""
    return path if path and (pathlib.Path(path) / hf.CONFIG_NAME).is_file() else ""


def score_module(config, path: str, role: str, actor_cfg, moderation: bool = False):
    """The module of a score role: the export at `path` (a score or moderation model), or, when it does
    not exist yet, a ScoreModel (moderation=True: a moderation model) of the actor's architecture."""
    runtime = common.model_settings(config).runtime()
    if _export(path):
        cfg = hf.load_config(path, **runtime)
        stored = hf.read_config(path)
        if moderation_model.is_moderation_config(stored):
            head = moderation_model.read_moderation_head(stored, str(pathlib.Path(path) / hf.CONFIG_NAME))
            return (head.model(cfg) if not role.endswith("_critic")
                    else score.ScoreHead(score_type="critic").model(cfg)), True
        head = score.read_score_head(stored, str(pathlib.Path(path) / hf.CONFIG_NAME),
                                     **({"score_type": "critic"} if role.endswith("_critic") else {}))
        return head.model(cfg), False
    if moderation and not role.endswith("_critic"):
        return moderation_model.ModerationHead().model(actor_cfg), True
    return score.ScoreHead(score_type="critic" if role.endswith("_critic") else role).model(actor_cfg), moderation


def _counts(module, mesh, rules) -> flops.ModelCounts:
    return flops.ModelCounts.of(module.cfg, loading.abstract_params(module, mesh, rules))


# ------------------------------------------------------------------------------------ supervised stages


def _optimizer(config):
    steps = int(config.train.num_steps) if int(config.train.num_steps) > 0 else SCHEDULE_STEPS
    return optim.make_optimizer(common.optimizer_settings(config), steps)


def _supervised(config, mesh, rules, *, kind, loss_fn, eval_fn, eval_args, init_fn, frozen=None, extra=None,
                passes_per_row, eval_passes_per_row, sequences=1):
    """The train and eval steps of a supervised stage (sequences: the model's sequences per batch row,
    e.g. 2 for a preference pair)."""
    batch_size = common.check_batch_size(config, mesh)
    length, accum = int(config.data.max_length), int(config.train.grad_accum_steps)
    tx = _optimizer(config)
    abstract = state_lib.abstract_train_state(init_fn, tx, mesh, rules, extra)
    batch = supervised.batch_spec(kind, batch_size, length, mesh)
    rows = batch_size * sequences
    out = [supervised.train_step(loss_fn, tx, accum, abstract, batch, frozen, tokens=rows * length * accum,
                                 passes=[dataclasses.replace(p, tokens=p.tokens * batch_size * accum)
                                         for p in passes_per_row],
                                 note=f"{accum} x {batch_size} {kind} rows of {length}")]
    if config.data.eval_split and eval_fn is not None:
        eval_size = common.check_batch_size(config, mesh, "eval_batch_size")
        args = eval_args(abstract, supervised.batch_spec(kind, eval_size, length, mesh), eval_size)
        eval_rows = eval_size * sequences
        out.append(supervised.eval_step(eval_fn, args, tokens=eval_rows * length,
                                        passes=[dataclasses.replace(p, tokens=p.tokens * eval_size)
                                                for p in eval_passes_per_row],
                                        note=f"{eval_size} {kind} rows of {length}"))
    return out


def _row_pass(counts, sequences: int, length: int, kind: str) -> flops.Pass:
    """A Pass per batch row (tokens scaled by the batch size later)."""
    return flops.Pass(counts, sequences * length, length, kind)


def sft_steps(config, mesh, rules, cfg):
    module = models.causal_lm(cfg)
    lora_settings = common.lora_settings(config)
    trained = lora.wrap(module, lora_settings) if lora_settings.enabled else module
    loss_fn, metrics_fn = sft.make_loss_fn(trained), sft.make_metrics_fn(trained)
    init_fn, frozen = loading.init_fn(module), None
    if lora_settings.enabled:
        loss_fn, metrics_fn = lora.on_base(loss_fn, cfg.compute_dtype), lora.on_base(metrics_fn, cfg.compute_dtype)
        init_fn, frozen = lora.adapter_init_fn(module, lora_settings), loading.abstract_params(module, mesh, rules)
    counts, length = _counts(module, mesh, rules), int(config.data.max_length)
    frozen_args = () if frozen is None else (frozen,)
    return _supervised(config, mesh, rules, kind="sft", loss_fn=loss_fn, eval_fn=jax.jit(metrics_fn),
                       eval_args=lambda state, batch, _: (state.params, batch, state.extra, *frozen_args),
                       init_fn=init_fn, frozen=frozen,
                       passes_per_row=[_row_pass(counts, 1, length, "train_frozen" if frozen else "train")],
                       eval_passes_per_row=[_row_pass(counts, 1, length, "forward")])


def score_steps(config, mesh, rules, cfg):
    head = score_stage.score_head(config)
    kind = score_stage.STAGE_KINDS[config.stage]
    module = head.model(cfg)
    loss_fn = preference.make_score_loss_fn(module, head, kind, config.score.loss_type, float(config.score.regularization))
    forward = scores_lib.make_pair_scorer(module, mesh, rules).forward
    counts, length = _counts(module, mesh, rules), int(config.data.max_length)

    def eval_args(state, batch, size):  # the pair scorer runs both sides as one [2B, L] batch
        side = supervised.batch_spec("sft", 2 * size, length, mesh)
        return state.params, side["input_ids"], side["attention_mask"]

    return _supervised(config, mesh, rules, kind=kind, loss_fn=loss_fn, eval_fn=forward,
                       eval_args=eval_args, init_fn=loading.init_fn(module),
                       extra={"normalizer": score.init_normalizer(head.score_dim)},
                       passes_per_row=[_row_pass(counts, 2, length, "train")],
                       eval_passes_per_row=[_row_pass(counts, 2, length, "forward")])


def pairwise_steps(config, mesh, rules, cfg):
    """The train / eval steps of a method of objectives/pairwise.py (config.stage), as stages/dpo.py builds them."""
    method = pairwise.method(config.stage)
    settings = dpo_stage.method_settings(config, method)
    module = models.causal_lm(cfg)
    counts, length, sides = _counts(module, mesh, rules), int(config.data.max_length), len(method.sides)
    frozen, score_fns, frozen_passes = {}, {}, []
    for role in method.scorers:
        if role == "reference":  # the initial policy, a separate copy
            frozen[role] = loading.abstract_params(module, mesh, rules)
            frozen_passes.append(_row_pass(counts, sides, length, "forward"))
            continue
        scorer, _ = score_module(config, getattr(settings, f"{role}_model_path"), role, cfg)
        score_fns[role] = pairwise.score_fn(scorer, None, role)
        frozen[role] = loading.abstract_params(scorer, mesh, rules)
        frozen_passes.append(_row_pass(_counts(scorer, mesh, rules), sides, length, "forward"))
    policy = pairwise.policy_fn(cfg)
    loss_fn = pairwise.make_loss_fn(method, settings, policy, score_fns)
    eval_fn = jax.jit(pairwise.make_eval_metrics_fn(method, settings, policy, score_fns))
    return _supervised(config, mesh, rules, kind=method.batch_kind, loss_fn=loss_fn, eval_fn=eval_fn,
                       eval_args=lambda state, batch, _: (state.params, batch, state.extra, frozen),
                       init_fn=loading.init_fn(module), frozen=frozen, extra=method.init_extra(settings),
                       passes_per_row=[_row_pass(counts, sides, length, "train"), *frozen_passes],
                       eval_passes_per_row=[_row_pass(counts, sides, length, "forward"), *frozen_passes],
                       sequences=sides)


def moderation_steps(config, mesh, rules, cfg, tokenizer=None):
    head = moderation_stage.moderation_head(config, tokenizer)
    module = head.model(cfg)
    weights = (1.0,) * head.num_categories  # from the training data's frequencies in the stage
    loss_fn = moderation_objective.make_loss_fn(module, moderation_stage.loss_settings(config, weights))
    forward = moderation_eval.make_scorer(module, mesh, rules).forward
    counts, length = _counts(module, mesh, rules), int(config.data.max_length)

    def eval_args(state, batch, _):
        threshold = jax.ShapeDtypeStruct((), jax.numpy.float32, sharding=mesh_lib.replicated(mesh))
        return state.params, batch["input_ids"], batch["attention_mask"], batch["response_mask"], threshold

    return _supervised(config, mesh, rules, kind="qa", loss_fn=loss_fn, eval_fn=forward,
                       eval_args=eval_args, init_fn=loading.init_fn(module),
                       passes_per_row=[_row_pass(counts, 1, length, "train")],
                       eval_passes_per_row=[_row_pass(counts, 1, length, "forward")])


# ------------------------------------------------------------------------------------ RL stages


def rl_steps(config, mesh, rules, cfg):
    rl = config.rl
    algorithm = algorithms.make(config.stage, has_cost_model=bool(rl.cost_model_path),
                                settings=algorithms.settings_from_group(config.stage, rl))
    settings = RLSettings.from_group(rl)
    paths = rl_stage.role_paths(config, algorithm, settings, check=bool(_export(rl.cost_model_path)))
    batch_size = rl_stage.check_minibatches(config, settings, mesh)
    # the roles that read a moderation model: per-token costs, another signal, multi_lag's constraints
    moderated = set(algorithm.token_streams(settings)) | ({"cost"} if rl.cost_signal != "unsafe" else set())
    moderated |= set(dict(algorithm.moderation_signals))
    scorers = {}
    for role in algorithm.roles:
        if role in ("actor", "reference"):
            continue
        base = role[: -len("_critic")] if role.endswith("_critic") else role
        module, is_moderation = score_module(config, paths.path(role), role, cfg, moderation=base in moderated)
        signal = paths.signal(role) if is_moderation and not role.endswith("_critic") else ""
        scorers[role] = rl_plan.ScoreRole(module, signal)
    plan = rl_plan.RLPlan(algorithm=algorithm, settings=settings,
                          optimizers=rl_stage.make_optimizers(config, SCHEDULE_STEPS), actor_cfg=cfg, scorers=scorers,
                          batch_size=batch_size, lora=common.lora_settings(config), lora_critics=bool(config.lora.critics),
                          frozen_param_dtype=rl_stage.frozen_param_dtype(config),
                          masked_token_ids=(cfg.pad_token_id,))
    return rl_plan.rl_steps(plan, mesh, rules)


_BUILDERS = {"sft": sft_steps, "reward": score_steps, "cost": score_steps, "moderation": moderation_steps,
             **dict.fromkeys(pairwise.METHODS, pairwise_steps)}
SUPERVISED = tuple(_BUILDERS)  # the other stages are RL algorithms


def stage_steps(config, mesh, rules) -> list:
    """The steps `config.stage` compiles, with abstract arguments on `mesh`."""
    if config.stage not in STAGES:
        raise ValueError(f"config.stage: unknown stage {config.stage!r}; valid: {', '.join(STAGES)}")
    tokenizer = _tokenizer(config)
    cfg = model_config(config, tokenizer)
    if config.stage == "moderation":
        return moderation_steps(config, mesh, rules, cfg, tokenizer)
    builder = _BUILDERS.get(config.stage, rl_steps)
    return builder(config, mesh, rules, cfg)


def plan_config(config, topology: chips.Topology, only: tuple[str, ...] = (), progress: bool = True):
    """(mesh, steps, StepPlans) of `config`'s steps (those named in `only`, or all) compiled for
    `topology` with config.mesh."""
    devices = chips.compile_only_devices(topology)
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    rules = mesh_lib.axis_rules(config.mesh)
    built = [step for step in stage_steps(config, mesh, rules) if not only or step.name in only]
    return mesh, built, steps_lib.compile_steps(built, topology, mesh, rules, progress=progress)


def with_layout(config, data: int, fsdp: int, tensor: int, num_minibatches: int | None = None):
    """A copy of `config` with another mesh (and rl.num_minibatches)."""
    config = copy.deepcopy(config)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    if num_minibatches is not None:
        config.rl.num_minibatches = num_minibatches
    return config


def search(config, chip: chips.ChipSpec, min_bytes: float, progress: bool = True) -> search_lib.SearchResult:
    """The smallest slice of `chip` (with a mesh and rl.num_minibatches) on which every step fits;
    min_bytes: the largest step's argument bytes (all chips), the first slice's lower bound."""
    rl = config.stage not in SUPERVISED

    def try_layout(topology, layout, num_minibatches, only):
        return plan_config(with_layout(config, *layout, num_minibatches), topology, only, progress=False)[2]

    batch_rows = int(config.data.batch_size)
    return search_lib.smallest_fit(chip, try_layout, min_bytes=min_bytes, batch_rows=batch_rows, rl=rl,
                                   rollout_rows=batch_rows * int(config.rl.num_return_sequences), progress=progress)


# ------------------------------------------------------------------------------------ command


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True, help="config file defining get_config(), e.g. configs/sft_tiny.py")
    parser.add_argument("--topology", required=True,
                        help="TPU slice as Cloud TPU names it (v5e-16, v5p-8, v4-8, v6e-8, ...) or h100-N (N GPUs of "
                             "one host; needs jax's CUDA plugin); a bad name lists the valid ones")
    parser.add_argument("--json", default="", help="also write the plan as JSON to this file")
    parser.add_argument("--search", action="store_true",
                        help="try meshes (data x fsdp x tensor) and rl.num_minibatches on slices of the topology's "
                             "chip and name the smallest slice on which every step fits")


def run(args) -> int:
    topology = chips.topology(args.topology)  # a bad name fails before anything is loaded
    chips.check_compiler(topology)
    chips.compile_only_host(f"{topology.chip.name}-{topology.chip.cores_per_chip}")  # any host, never the TPU
    config = config_lib.load_config(args.config, args.extra_args)
    config_lib.validate_config(config)
    mesh, built, plans = plan_config(config, topology)
    print(report.render(plans, topology, mesh_lib.describe(mesh).split(" (")[0], args.config, args.extra_args))
    found = None
    if args.search:
        found = search(config, topology.chip, max(steps_lib.argument_bytes(step) for step in built))
        print(report.render_search(found))
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = report.to_json(plans, topology, config_lib.config_to_json(config), found)
        out.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


COMMANDS = {"plan": (add_arguments, run)}
