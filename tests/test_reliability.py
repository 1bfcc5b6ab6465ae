"""What a user relies on when something goes wrong (docs/reliability.md): exports that are never
torn and never called "up to date" when they are not, outputs never overwritten unasked,
`jaxalign moderate` verdicts about the text they were asked about, no untrained export from a
split without targets, resumes refused against changed frozen models, and every tiny config
either ready after the quickstart or naming the command that makes what it lacks."""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import conftest
from jaxalign import cli, files
from jaxalign import config as config_lib
from jaxalign.models import hf, loading
from jaxalign.stages import commands, common, inputs
from jaxalign.train import loop

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = ["--config.model.hf_config.hidden_size=32", "--config.model.hf_config.intermediate_size=64",
              "--config.model.hf_config.num_hidden_layers=1"]


def _sft_config(mini_data, *overrides):
    return config_lib.load_config(REPO / "configs" / "sft_tiny.py", [
        f"--config.data.source={mini_data / 'data'}", f"--config.tokenizer={mini_data / 'tokenizer'}",
        "--config.data.max_length=96", "--config.data.batch_size=8", "--config.data.eval_split=",
        "--config.train.lr_schedule=constant", "--config.train.warmup_ratio=0", "--config.train.log_every=1",
        "--config.checkpoint.save_every=1", "--config.checkpoint.async_save=False", *TINY_MODEL, *overrides])


def _sha(path):
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def _exported_step(export):
    return json.loads((export / common.EXPORT_STEP_NAME).read_text())["step"]


# --- exports: atomic, and "up to date" only when whole and of the final step ---------------------


def test_an_export_cut_off_keeps_the_previous_one_and_the_next_run_exports_again(mini_data, tmp_path, monkeypatch):
    """A run extended from 2 to 3 steps dies half-way through its export (weights written, tokenizer
    not): the step-2 export stays whole and loadable; the next run (already finished) exports step 3
    instead of calling the old export up to date."""
    import transformers

    workdir = tmp_path / "run"
    commands.train(_sft_config(mini_data, "--config.train.num_steps=2"), workdir)
    export = workdir / "export"
    before = {p.name: _sha(p) for p in export.iterdir()}
    assert _exported_step(export) == 2 and loading.check_export(export) == ""

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while exporting")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", killed)
        with pytest.raises(KeyboardInterrupt):
            commands.train(_sft_config(mini_data, "--config.train.num_steps=3"), workdir)
    assert {p.name: _sha(p) for p in export.iterdir()} == before  # not one byte of the old export changed
    assert sorted(p.name for p in workdir.iterdir() if p.name.startswith(".export")) == []
    result = commands.train(_sft_config(mini_data, "--config.train.num_steps=3"), workdir)
    assert result.trained_steps == 0 and _exported_step(export) == 3
    assert _sha(export / "model.safetensors") != before["model.safetensors"]
    _, params = hf.from_pretrained(export)
    state_params = jax.device_get(result.state.params)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state_params["lm_head"]["kernel"])


def test_up_to_date_checks_the_whole_export(mini_data, tmp_path):
    """A finished run whose export lost its tokenizer, has a flipped byte in its weights or no
    manifest (cut off, or written before manifests) exports again instead of calling it up to date."""
    from jaxalign.models.tokenizer import load_tokenizer

    workdir = tmp_path / "run"
    config = _sft_config(mini_data, "--config.train.num_steps=1")
    commands.train(config, workdir)
    export = workdir / "export"
    good = _sha(export / "model.safetensors")

    def flip(path):
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))

    for damage in (lambda: (export / "tokenizer.json").unlink(), lambda: flip(export / "model.safetensors"),
                   lambda: (export / files.MANIFEST_NAME).unlink(), lambda: (export / common.EXPORT_STEP_NAME).unlink()):
        damage()
        assert loading.check_export(export) != "" or not (export / common.EXPORT_STEP_NAME).exists()
        assert commands.train(config, workdir).trained_steps == 0
        assert loading.check_export(export) == "" and _sha(export / "model.safetensors") == good
        assert _exported_step(export) == 1
    assert len(load_tokenizer(export)) == len(load_tokenizer(mini_data / "tokenizer"))


# --- outputs are never replaced unasked ----------------------------------------------------------


def test_init_model_and_tokenizer_refuse_an_existing_out(mini_data, tmp_path, capsys):
    out = tmp_path / "model"
    spec = json.dumps(dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, max_position_embeddings=64))
    argv = ["init-model", "--out", str(out), "--config-json", spec, "--tokenizer", str(mini_data / "tokenizer")]
    assert cli.main(argv) == 0
    written = {p.name: _sha(p) for p in out.iterdir()}
    assert files.verify_manifest(out) == (True, "")
    capsys.readouterr()
    assert cli.main(argv[:-2] + ["--seed", "1"]) == 1
    error = capsys.readouterr().err.strip()
    assert error == f"jaxalign init-model: error: --out {out} already exists (a directory); pass --overwrite to " \
                    f"replace it, or choose another path"
    assert {p.name: _sha(p) for p in out.iterdir()} == written
    assert cli.main(argv + ["--seed", "1", "--overwrite"]) == 0
    assert _sha(out / "model.safetensors") != written["model.safetensors"]

    tokenizer_argv = ["tokenizer", "--data", str(mini_data / "data"), "--out", str(mini_data / "tokenizer"),
                      "--vocab-size", "260"]
    before = _sha(mini_data / "tokenizer" / "tokenizer.json")
    assert cli.main(tokenizer_argv) == 1
    assert f"--out {mini_data / 'tokenizer'} already exists" in capsys.readouterr().err
    assert _sha(mini_data / "tokenizer" / "tokenizer.json") == before


def test_evaluate_judge_report_curves_and_data_refuse_an_existing_output(mini_data, tmp_path, capsys):
    """Refused before any model is loaded or any data is read, naming the output."""
    taken = tmp_path / "judge_sft"
    taken.mkdir()
    (taken / "judge.json").write_text('{"mine": 1}')
    judge = ["evaluate", "judge", "--model", str(tmp_path / "no_model"), "--data", str(mini_data / "data"),
             "--out", str(taken)]
    assert cli.main(judge) == 1
    assert f"--out {taken} already exists" in capsys.readouterr().err
    assert (taken / "judge.json").read_text() == '{"mine": 1}'
    (tmp_path / "report.md").write_text("my notes")
    assert cli.main(["evaluate", "report", "--out", str(tmp_path)]) == 1
    assert "report.md already exists" in capsys.readouterr().err
    assert (tmp_path / "report.md").read_text() == "my notes"
    (tmp_path / "curves.json").write_text("{}")
    assert cli.main(["evaluate", "curves", "--runs", str(tmp_path), "--out", str(tmp_path / "curves.png")]) == 1
    assert "curves.json already exists" in capsys.readouterr().err
    assert cli.main(["data", "mini", "--out", str(mini_data / "data"), "--rows", "30"]) == 1
    assert f"--out {mini_data / 'data'} already exists" in capsys.readouterr().err


# --- jaxalign moderate: the verdict is about the response, rows say what was cut -----------------


MOD_LENGTH = 40


@pytest.fixture(scope="module")
def moderation_export(tmp_path_factory):
    from jaxalign.models import decoder, llama
    from jaxalign.models import moderation as mm
    from jaxalign.models import tokenizer as tokenizer_lib
    from jaxalign.data import mini

    root = tmp_path_factory.mktemp("moderate")
    mini.write_mini(root / "data", rows=60, seed=0)
    tok = tokenizer_lib.train_bpe_tokenizer(tokenizer_lib.release_texts(root / "data"), 300, root / "tok")
    cfg = llama.LlamaConfig.from_hf_config(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=128, vocab_size=len(tok)))
    head = mm.ModerationHead(max_length=MOD_LENGTH)
    params = mm.init_params_from_backbone(decoder.init_params(cfg, jax.random.PRNGKey(0))["model"], cfg,
                                          jax.random.PRNGKey(1), head)
    mm.save_moderation_model(root / "export", cfg, params, head)
    tok.save_pretrained(str(root / "export"))
    return root / "export"


def _reference_unsafe(moderator, ids):
    """P(unsafe) of the model at the end of exactly `ids` (one row, right-padded)."""
    arrays = {"input_ids": np.full((1, MOD_LENGTH), moderator.tokenizer.pad_token_id, np.int32),
              "attention_mask": np.zeros((1, MOD_LENGTH), bool)}
    arrays["input_ids"][0, :len(ids)] = ids
    arrays["attention_mask"][0, :len(ids)] = True
    return float(moderator.scorer(moderator.model.params, arrays, batch_size=moderator.batch_size)["unsafe"][0])


def test_moderate_scores_the_response_when_the_prompt_is_too_long(moderation_export, tmp_path, capsys):
    from jaxalign.data import views
    from jaxalign.moderation import api

    long_prompt = "How do I " + "really " * 60 + "bake bread?"
    answers = ["Sure! Mix flour, water, yeast and salt.", "Sure. Get a gun and shoot them."]
    rows = [{"prompt": long_prompt, "response": r, "id": i} for i, r in enumerate(answers)]
    rows.append({"prompt": "Hi?", "response": "Hello.", "id": 2})  # fits: scored as it always was
    rows.append({"prompt": long_prompt, "response": "Sure! " * 80, "id": 3})  # the response alone is too long
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    assert cli.main(["moderate", "--model", str(moderation_export), "--input", str(source), "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["truncated"] == 3 and summary["response_cut"] == 1
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert results[0]["unsafe_probability"] != results[1]["unsafe_probability"]  # the responses decide

    moderator = api.load_moderator(moderation_export, batch_size=4)
    tok = moderator.tokenizer
    for row, result in zip(rows, results):
        text = views.format_prompt(row["prompt"], moderator.template)
        prompt_ids = tok(text)["input_ids"]
        full = tok(text + row["response"] + tok.eos_token)["input_ids"]
        answer = full[len(prompt_ids):]
        if row["id"] == 2:
            assert result["truncated"] is False and len(full) <= MOD_LENGTH
            expected = full
        elif row["id"] == 3:
            keep = (MOD_LENGTH - 1) // 4  # a quarter of the room after BOS
            expected = full[:1] + prompt_ids[len(prompt_ids) - keep:] + answer[:MOD_LENGTH - 1 - keep]
            assert result["response_cut"] is True
        else:  # the prompt's first tokens go; the response and its end token stay
            keep = MOD_LENGTH - 1 - len(answer)
            expected = full[:1] + prompt_ids[len(prompt_ids) - keep:] + answer
            assert result["truncated"] is True and result["response_cut"] is False
            assert result["tokens_kept"] == {"prompt": keep, "response": len(answer) - 1}
        assert len(expected) <= MOD_LENGTH
        assert result["unsafe_probability"] == pytest.approx(_reference_unsafe(moderator, expected), abs=1e-6)


def test_moderate_caps_a_huge_line_before_tokenising(moderation_export, monkeypatch):
    """A 2M-character prompt and response: the tokenizer never sees more than the caps, and the
    verdict equals that of much shorter texts that keep the same tokens."""
    from jaxalign.moderation import api

    moderator = api.load_moderator(moderation_export, batch_size=2)
    longest_seen = []
    tokenizer_call = type(moderator.tokenizer).__call__
    monkeypatch.setattr(type(moderator.tokenizer), "__call__",
                        lambda self, text, **kw: longest_seen.append(len(text)) or tokenizer_call(self, text, **kw))
    prompt, response = "How do I bake bread? " * 100_000, "Sure. " * 400_000
    huge = moderator([(prompt, response)])[0]
    cap = (MOD_LENGTH + 2) * api.longest_token_chars(moderator.tokenizer)
    assert max(longest_seen) <= 2 * cap + 200 and cap < 10_000
    shorter = moderator([(prompt[-3000:], response[:3000])])[0]  # cut to the same tokens
    assert huge == shorter and huge["response_cut"] is True


# --- zero target tokens --------------------------------------------------------------------------


def test_sft_whose_max_length_cuts_every_response_is_refused(mini_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("JAXALIGN_DEBUG", raising=False)
    argv = ["train", "--config", "configs/sft_tiny.py", "--workdir", str(tmp_path / "run"),
            f"--config.data.source={mini_data / 'data'}", f"--config.tokenizer={mini_data / 'tokenizer'}",
            "--config.data.max_length=24", "--config.train.num_steps=2", *TINY_MODEL]
    assert cli.main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        "jaxalign train: error: config.data.max_length=24 leaves no response token in split 'train'")
    assert errors[0].endswith("raise config.data.max_length")
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_a_step_without_target_tokens_stops_before_saving(tmp_path):
    """The loop's stop for an update whose batch kept no target (num_loss_tokens = 0)."""
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.train import checkpoint as checkpoint_lib

    mesh_settings = config_lib.load_config(REPO / "configs" / "base.py").mesh
    mesh = mesh_lib.make_mesh(mesh_settings)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    counts = iter([5.0, 3.0, 0.0, 4.0])

    def step_fn(state, batch, frozen):
        return {"count": state["count"] + 1}, {"loss": 1.0, "num_loss_tokens": next(counts)}

    settings = loop.LoopSettings(num_steps=4, log_every=1,
                                 checkpoint=checkpoint_lib.CheckpointSettings(save_every=1, async_save=False))
    with pytest.raises(loop.NoTargetTokensError, match=r"step 3 had no target token .* last good checkpoint is step 2"):
        loop.run(settings=settings, workdir=tmp_path, mesh=mesh, rules=mesh_lib.axis_rules(mesh_settings),
                 step_fn=step_fn, init_state=lambda: {"count": np.zeros(4, np.int32)}, batches=iter(range(10)),
                 abstract_state={"count": jax.ShapeDtypeStruct((4,), np.int32, sharding=replicated)})
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2]


# --- frozen roles and init models are fingerprinted ----------------------------------------------


def test_resume_against_a_changed_reward_model_is_refused(tmp_path, caplog):
    conftest.tiny_rl_inputs(tmp_path, rows=60)
    config = config_lib.load_config(REPO / "configs" / "ppo_lag_tiny.py", [
        f"--config.model.init_path={tmp_path / 'sft'}", f"--config.data.source={tmp_path / 'data'}",
        f"--config.rl.reward_model_path={tmp_path / 'reward'}", f"--config.rl.cost_model_path={tmp_path / 'cost'}"])
    workdir = tmp_path / "run"
    assert set(inputs.input_paths(config)) == {"model.init_path", "rl.reward_model_path", "rl.cost_model_path"}
    inputs.check_and_save_fingerprints(config, workdir)  # what the run's first start stores
    stored = json.loads((workdir / inputs.INPUTS_NAME).read_text())
    assert set(stored["rl.reward_model_path"]["files"]) == {"config.json", "model.safetensors"}
    os.utime(tmp_path / "reward" / "model.safetensors")  # touched, same bytes: not a change
    assert inputs.check_and_save_fingerprints(config, workdir) == []
    shutil.copy(tmp_path / "cost" / "model.safetensors", tmp_path / "reward" / "model.safetensors")
    with pytest.raises(config_lib.ConfigError, match=r"config.rl.reward_model_path \(.*reward\): model.safetensors "
                                                     r"changed.*--allow-config-change"):
        commands.train(config, workdir)
    assert inputs.check_and_save_fingerprints(config, workdir, allow_change=True) == [
        f"config.rl.reward_model_path ({tmp_path / 'reward'}): model.safetensors changed"]
    assert "allowed by --allow-config-change" in caplog.text
    assert inputs.check_and_save_fingerprints(config, workdir) == []  # the new model is now the run's


# --- every tiny config runs after the quickstart or names the command that makes its inputs -----


def _quickstart_layout(root, mini_data):
    """What `make quickstart` leaves under out/ that other configs read (models as stand-ins)."""
    shutil.copytree(mini_data / "data", root / "out" / "mini")
    shutil.copytree(mini_data / "tokenizer", root / "out" / "mini_tokenizer")
    for name in ("sft_tiny", "reward_tiny", "cost_tiny", "moderation_tiny"):
        (root / "out" / name / "export").mkdir(parents=True)
        (root / "out" / name / "export" / "config.json").write_text("{}")


def test_every_tiny_config_resolves_after_the_quickstart_or_names_the_command(mini_data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = sorted((REPO / "configs").glob("*_tiny.py"))
    assert len(tiny) >= 15
    for path in tiny:  # before the quickstart, each names the command that makes what it lacks
        config = config_lib.load_config(path)
        config_lib.validate_config(config)
        with pytest.raises(FileNotFoundError, match=r"make .*with `(jaxalign (data mini|tokenizer|train)|python "
                                                    r"experiments/mini_single.py) "):
            inputs.check_inputs(config)
    _quickstart_layout(tmp_path, mini_data)
    missing = {}
    for path in tiny:
        try:
            inputs.check_inputs(config_lib.load_config(path))
        except FileNotFoundError as error:
            missing[path.stem] = str(error)
    assert set(missing) == {"reward_single_tiny", "ppo_single_tiny"}
    assert missing["reward_single_tiny"] == (
        "config.data.source: out/mini_single: no such dir; make the single-preference release of the mini dataset "
        "with `python experiments/mini_single.py --mini out/mini --out out/mini_single`, or point "
        "config.data.source at PKU-SafeRLHF-single")
    # the named command makes the data; the next config names the run that makes its reward model
    subprocess.run([sys.executable, str(REPO / "experiments" / "mini_single.py"), "--mini", "out/mini", "--out",
                    "out/mini_single"], check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    inputs.check_inputs(config_lib.load_config(REPO / "configs" / "reward_single_tiny.py"))
    with pytest.raises(FileNotFoundError, match=r"config.rl.reward_model_path: out/reward_single_tiny/export: no such "
                                                r"dir; make it with `jaxalign train --config configs/reward_single_tiny.py "
                                                r"--workdir out/reward_single_tiny`"):
        inputs.check_inputs(config_lib.load_config(REPO / "configs" / "ppo_single_tiny.py"))
