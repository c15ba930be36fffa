"""Config validation: every kind of bad input is a one-line error naming the file and the field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rto.config import load_config, stage_order
from rto.errors import UserError

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_quickstart_is_valid():
    cfg = load_config(QUICKSTART)
    assert cfg.stages == [s for s in stage_order() if s in cfg.stages]
    assert stage_order() == ("sft", "dpo", "rm", "ftp", "ppo", "eval")  # derived from what each uses
    assert cfg.reward.mode == "rto"


def test_stages_run_in_canonical_order(tmp_path):
    cfg = load_config(write(tmp_path, "stages: [eval, sft]\n"))
    assert cfg.stages == ["sft", "eval"]


def test_overrides_apply_and_parse_yaml(tmp_path):
    cfg = load_config(QUICKSTART, ["stages=[sft,eval]", "sft.lr=0.01", "reward.mode=ppo", "ppo.steps=3"])
    assert cfg.stages == ["sft", "eval"] and cfg.sft.lr == 0.01 and cfg.ppo.steps == 3
    assert cfg.reward.beta1 == 0.0  # ppo mode has no DPO term


BAD = [
    # (yaml text, overrides, words the message must contain)
    ("stages: [sft]\nsft: {lr: abc}\n", [], ["sft.lr", "number"]),
    ("stages: [sft]\nsft: {lrr: 0.1}\n", [], ["sft.lrr", "unknown key"]),
    ("stages: [sft, train]\n", [], ["stages", "unknown stage 'train'"]),
    ("sft: {lr: 0.1}\n", [], ["stages", "missing"]),
    ("stages: []\n", [], ["stages", "at least one"]),
    ("stages: [sft]\nsft: {lr: -1}\n", [], ["sft.lr", "greater than 0"]),
    ("stages: [sft]\npolicy: {path: ./no/such/model}\n", [], ["policy.path", "does not exist"]),
    ("stages: [sft]\npolicy: {path: x, builtin: tiny-llama}\n", [], ["policy", "exactly one"]),
    ("stages: [sft]\ndata: {sft: {path: missing.jsonl}}\n", [], ["data.sft.path", "does not exist"]),
    ("stages: [ppo]\nreward: {mode: rto, beta1: 0}\n", [], ["reward", "beta1"]),
    ("stages: [ppo]\nreward: {mode: ppo, beta3: 0}\n", [], ["reward", "beta3"]),
    ("stages: [ppo]\nreward: {mode: sparse}\n", [], ["reward.mode", "rto"]),
    ("stages: [ppo]\nppo: {rollout_batch_size: 8, train_batch_size: 16}\n", [], ["ppo", "train_batch_size"]),
    (
        "stages: [ppo]\nppo: {rollout_batch_size: 12, train_batch_size: 6, micro_batch_size: 2}\n"
        "resources: {policy: {ranks: 2}}\n",
        [],
        ["ppo.train_batch_size", "ppo.micro_batch_size", "resources.policy.ranks"],
    ),
    (
        "stages: [ppo]\nppo: {rollout_batch_size: 8, train_batch_size: 8, micro_batch_size: 4}\n"
        "resources: {critic: {ranks: 3}}\n",
        [],
        ["ppo.train_batch_size", "resources.critic.ranks"],
    ),
    (
        "stages: [ppo]\nppo: {rollout_batch_size: 12, train_batch_size: 8, micro_batch_size: 4}\n",
        [],
        ["ppo.rollout_batch_size", "ppo.train_batch_size", "dropped"],
    ),
    ("stages: [ppo]\nppo: {train_batch_size: 16, micro_batch_size: 32}\n", [], ["ppo.micro_batch_size"]),
    ("stages: [sft]\nppo: {advantage_estimator: td0}\n", [], ["ppo.advantage_estimator", "gae"]),
    ("stages: [sft]\nreward: {mode: rs_ppo}\nppo: {gamma: 0.9}\n", [], ["ppo.gamma", "rs_ppo"]),
    ("stages: [sft]\nppo: {policy_loss: grpo}\n", [], ["ppo.policy_loss", "ppo_clip"]),
    ("stages: [sft]\nppo: {rollout_pruner: magic}\n", [], ["ppo.rollout_pruner", "adaptinfer, ftp, none"]),
    ("stages: [sft]\nppo: {rollout_pruner: adaptinfer}\n", [], ["ppo.rollout_pruner", "vision-language"]),
    ("stages: [sft]\ntask: null\n", [], ["data.sft", "no built-in task"]),
    ("stages: [sft]\ndevice: tpu\n", [], ["device", "cpu"]),
    ("stages: [sft]\ndevice: cpu\ndtype: float16\n", [], ["float16"]),
    ("stages: [sft]\n", ["sft.lr=abc"], ["--set sft.lr", "sft.lr"]),
    ("stages: [sft]\n", ["sft.nope=1"], ["sft.nope", "unknown key"]),
    ("stages: [sft]\n", ["noequals"], ["--set", "KEY=VALUE"]),
    ("stages: [sft\n", [], ["invalid YAML", "line"]),
    ("- just\n- a list\n", [], ["mapping"]),
    ("stages: [sft]\neval: {temperature: -1}\n", [], ["eval.temperature"]),
]


@pytest.mark.parametrize("text,overrides,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_config_names_file_and_field(tmp_path, text, overrides, words):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message or "--set" in message
    for word in words:
        assert word in message, (word, message)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_cli_exit_code_2_without_traceback(tmp_path):
    path = write(tmp_path, "stages: [sft]\nsft: {lr: abc}\n")
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "validate", str(path)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sft.lr" in lines[0] and str(path) in lines[0]


def test_cli_validate_ok():
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "validate", str(QUICKSTART)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


@pytest.mark.parametrize("path", sorted((QUICKSTART.parent).glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    load_config(path)


def test_gpu_share_is_automatic_on_cuda_only():
    from rto.ppo.groups import default_gpu_share

    cfg = load_config(QUICKSTART)
    groups = {"policy", "critic", "ref", "dpo", "rm", "rollout"}
    assert default_gpu_share(cfg, groups, "cpu") == 0.0
    assert default_gpu_share(cfg, groups, "cuda") == pytest.approx(1 / 6)
    cfg = load_config(QUICKSTART, ["resources.policy.gpus=1"])
    assert default_gpu_share(cfg, groups, "cuda") == 0.0  # explicit placement wins


def test_gradient_checkpointing_is_off_unless_asked(tmp_path):
    """TRL's trainer configs turn it on by default; ours pass the job file's choice through."""
    from trl import DPOConfig, RewardConfig, SFTConfig

    from pipelines.training import trainer_kwargs

    default = load_config(QUICKSTART)
    asked = load_config(QUICKSTART, ["sft.gradient_checkpointing=true", "dpo.gradient_checkpointing=true"])
    for args_class, section in ((SFTConfig, "sft"), (DPOConfig, "dpo"), (RewardConfig, "rm")):
        args = args_class(**trainer_kwargs(default, getattr(default, section), tmp_path, "cpu"))
        assert args.activation_checkpointing is False and args.gradient_checkpointing is False
    on = SFTConfig(**trainer_kwargs(asked, asked.sft, tmp_path, "cpu"))
    assert on.activation_checkpointing is True and asked.rm.gradient_checkpointing is False


# Each stage's inputs from earlier stages, walked through `rto validate`: a job that would fail at
# the start of a stage after earlier stages trained is refused before anything runs.
MISSING_INPUTS = [
    # (stages, overrides, field the message names, the stage it asks for)
    ("[sft, dpo, ppo]", ["ppo.critic_init=rm", "reward.mode=dpo"], "ppo.critic_init", "rm"),
    ("[sft, rm, ppo]", ["reward.mode=rto"], "reward.mode", "dpo"),
    ("[sft, dpo, ppo]", ["reward.mode=ppo", "ppo.critic_init=policy"], "reward.sentence_reward", "rm"),
    ("[sft, dpo, rm, ppo]", ["ppo.rollout_pruner=ftp"], "ppo.rollout_pruner", "ftp"),
]


@pytest.mark.parametrize("stages,overrides,field,needed", MISSING_INPUTS, ids=lambda v: str(v))
def test_validate_refuses_a_stage_whose_input_no_stage_makes(tmp_path, stages, overrides, field, needed):
    path = write(tmp_path, f"stages: {stages}\n")
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "validate", str(path), *[f"--set={o}" for o in overrides]],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(path) in lines[0] and field in lines[0] and f"'{needed}'" in lines[0], lines[0]


def test_stage_inputs_may_come_from_the_run_directory(tmp_path):
    """A job that lists only `ppo` is fine where the run directory holds finished dpo and rm
    stages (`rto validate --run-dir`, and `rto run` on that directory)."""
    from rto.config import check_stage_inputs
    from rto.rundir import RunDir

    cfg = load_config(write(tmp_path, "stages: [ppo]\n"))
    with pytest.raises(UserError, match="'dpo'"):
        check_stage_inputs(cfg, RunDir(tmp_path / "run").finished_stages(), str(tmp_path / "job.yaml"))
    run = RunDir(tmp_path / "run").create()
    for name in ("dpo", "rm"):
        tmp = run.temp_stage_dir(name)
        tmp.mkdir(parents=True, exist_ok=True)
        run.finish_stage(name, tmp, "hash", {})
    check_stage_inputs(cfg, run.finished_stages(), str(tmp_path / "job.yaml"))
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "validate", str(tmp_path / "job.yaml"), "--run-dir", str(run.root)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_ppo_seed_runs_ppo_again_and_keeps_the_stages_before_it(tmp_path):
    """`ppo.seed`: PPO with another seed from the same SFT/DPO/RM stages. The job's `seed` is in
    every stage's cache key, so `--set seed=1` trains everything again; `ppo.seed=1` changes only the
    ppo stage's key and the seed the PPO core and the runner use for it. Set to the job's seed it is
    the same run (the same key as unset)."""
    from pipelines.runner import stage_hash
    from pipelines.stages.ppo import ppo_job
    from rto.rundir import RunDir

    run = RunDir(tmp_path / "run").create()
    base = load_config(QUICKSTART)
    other = load_config(QUICKSTART, ["ppo.seed=1"])
    same = load_config(QUICKSTART, ["ppo.seed=0"])
    reseeded = load_config(QUICKSTART, ["seed=1"])

    def key(cfg, stage):
        return stage_hash(cfg, stage, run, "prepared", upstream={"sft": "s", "dpo": "d", "rm": "r"})

    for stage in ("sft", "dpo", "rm", "eval"):
        assert key(other, stage) == key(base, stage) == key(same, stage), stage
        assert key(reseeded, stage) != key(base, stage), stage
    assert key(other, "ppo") != key(base, "ppo") and key(same, "ppo") == key(base, "ppo")
    assert (base.ppo.seed, base.stage_seed("ppo"), other.stage_seed("ppo"), other.stage_seed("sft")) == (
        None,
        0,
        1,
        0,
    )
    job = ppo_job(other)
    assert job.seed == 1 and job.ppo == other.ppo and job.reward == other.reward and other.seed == 0
    assert ppo_job(base) is base


def test_sampler_kl_guard_is_in_the_ppo_key_only_where_it_acts(tmp_path):
    """`ppo.sampler_kl_guard` changes what a pruned-rollout PPO run does, so it is in that run's ppo
    key; unset, or with dense rollouts (where it does nothing), the key is the one without it, so
    cached dense runs stay valid."""
    from pipelines.runner import stage_hash
    from rto.rundir import RunDir

    run = RunDir(tmp_path / "run").create()

    def key(*overrides):
        cfg = load_config(QUICKSTART, list(overrides))
        return stage_hash(cfg, "ppo", run, "prepared", upstream={"sft": "s", "dpo": "d", "rm": "r"})

    pruned = "ppo.rollout_pruner=ftp"
    assert (
        key("ppo.sampler_kl_guard=0.25")
        == key()
        == key("ppo.rollout_pruner=none", "ppo.sampler_kl_guard=0.5")
    )
    assert key(pruned, "ppo.sampler_kl_guard=0.25") not in (
        key(pruned),
        key(pruned, "ppo.sampler_kl_guard=0.5"),
    )
    with pytest.raises(UserError, match="sampler_kl_guard"):
        load_config(QUICKSTART, ["ppo.sampler_kl_guard=-1"])


def test_generation_cache_is_not_in_the_ppo_key_and_a_bad_name_is_a_config_error(tmp_path):
    """`ppo.generation_cache` changes how fast the sampler decodes, not what it samples (the same
    tokens, tests/test_sampling.py), so a cached ppo stage stays valid when it changes."""
    from pipelines.runner import stage_hash
    from rto.rundir import RunDir

    run = RunDir(tmp_path / "run").create()

    def key(*overrides):
        cfg = load_config(QUICKSTART, list(overrides))
        return stage_hash(cfg, "ppo", run, "prepared", upstream={"sft": "s", "dpo": "d", "rm": "r"})

    assert key() == key("ppo.generation_cache=static") == key("ppo.generation_cache=dynamic")
    assert load_config(QUICKSTART).ppo.generation_cache == "auto"
    with pytest.raises(UserError, match="generation_cache"):
        load_config(QUICKSTART, ["ppo.generation_cache=paged"])


def test_a_stage_revision_makes_cached_outputs_again(tmp_path):
    """A fix that changes what a stage computes from the same settings raises its `revision`: the
    ppo and eval stages sampled from HF's default top-k 50 before revision 1, so their outputs
    cached before it are not reused; stages without a revision keep their keys."""
    import dataclasses

    from pipelines.runner import stage_hash
    from pipelines.stages import STAGES, stages
    from rto.rundir import RunDir

    run = RunDir(tmp_path / "run").create()
    cfg = load_config(QUICKSTART)
    upstream = {"sft": "s", "dpo": "d", "rm": "r", "ppo": "p"}
    assert stages()["ppo"].revision >= 1 and stages()["eval"].revision >= 1 and stages()["sft"].revision == 0
    keys = {name: stage_hash(cfg, name, run, "prepared", upstream) for name in ("ppo", "sft")}
    original = STAGES["ppo"]
    try:
        STAGES["ppo"] = dataclasses.replace(original, revision=original.revision + 1)
        assert stage_hash(cfg, "ppo", run, "prepared", upstream) != keys["ppo"]
        STAGES["ppo"] = dataclasses.replace(original, revision=0)
        unrevised = stage_hash(cfg, "ppo", run, "prepared", upstream)
    finally:
        STAGES["ppo"] = original
    assert unrevised != keys["ppo"] and stage_hash(cfg, "ppo", run, "prepared", upstream) == keys["ppo"]
    assert stage_hash(cfg, "sft", run, "prepared", upstream) == keys["sft"]
