"""ppo/ppo.py: the GAE kernel, EOS truncation, adaptive KL, failure on NaN rewards, exact resume,
the seed's command under accelerate (2 CPU processes) and under DeepSpeed ZeRO-2."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import rm_training
from conftest import CPU, ROOT
from ppo import ppo
from ser import tiny
from ser.cli import parse
from ser.data import read_records
from ser.rollout import truncate_after_eos

ENV = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false"}


def test_mfu_peak_is_the_devices_own_without_a_flag(monkeypatch):
    from types import SimpleNamespace

    cpu = SimpleNamespace(device=torch.device("cpu"), mixed_precision="bf16")
    assert ppo.device_peak_tflops(cpu) is None  # no listed peak: MFU is not logged, and the log says why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    h100 = SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="bf16")
    assert ppo.device_peak_tflops(h100) == pytest.approx(989.4)  # H100 SXM datasheet, dense bf16
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA A100-SXM4-80GB")
    assert ppo.device_peak_tflops(SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="bf16")) == \
        pytest.approx(312.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H200")  # as an H200 SXM names itself
    assert ppo.device_peak_tflops(SimpleNamespace(device=torch.device("cuda", 0), mixed_precision="bf16")) == \
        pytest.approx(989.4)  # dense, as for the H100 (Lightning's 2000 is the sparse rate)


def test_gae_matches_the_textbook_recursion():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] + [0] * 5]).float()
    gamma, lam = 0.9, 0.8
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    for b in range(3):
        n = int(mask[b].sum())
        expect, running = [0.0] * n, 0.0
        for t in reversed(range(n)):
            next_v = values[b, t + 1].item() if t + 1 < n else 0.0  # nothing after the last response token
            running = rewards[b, t].item() + gamma * next_v - values[b, t].item() + gamma * lam * running
            expect[t] = running
        assert adv[b, :n].tolist() == pytest.approx(expect, abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
        assert ret[b, :n].tolist() == pytest.approx([e + v for e, v in zip(expect, values[b, :n].tolist())], abs=1e-5)


def test_responses_are_cut_after_the_first_eos():
    eos, pad = 2, 0
    out = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    resp, mask, has_eos = truncate_after_eos(out, eos, pad)
    assert resp.tolist() == [[5, 6, 2, 0, 0], [5, 5, 5, 5, 5], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True]


def test_adaptive_kl_moves_the_coefficient_toward_the_target():
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000, adaptive=True)
    ctl.update(current_kl=12.0, n_samples=100)  # KL above target: penalise more
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 100 / 10000))
    high = ctl.value
    ctl.update(current_kl=3.0, n_samples=100)  # below target: penalise less
    assert ctl.value < high
    fixed = ppo.AdaptiveKLController(0.2, 6.0, 10000, adaptive=False)
    fixed.update(50.0, 100)
    assert fixed.value == 0.2


@pytest.fixture(scope="module")
def rm(sft_model, synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_rm")
    rm_training.main(*parse(rm_training.ARGUMENTS, [
        "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
        "--use_lora", "False", "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--learning_rate", "2e-3", *CPU,
        "--train_sampling_strategy", "random"]))  # the RM the KL and reward bounds below were set with
    return out


def ppo_args(sft_model, rm, synthetic, out, *extra):
    return parse(ppo.ARGUMENTS, [
        "--model_name", str(sft_model), "--reward_model_name", str(rm), "--dataset_name", str(synthetic),
        "--output_dir", str(out), "--batch_size", "8", "--mini_batch_size", "4", "--gradient_accumulation_steps", "1",
        "--ppo_epochs", "2", "--learning_rate", "3e-3", "--output_max_length", "12", *extra])


@pytest.mark.slow
def test_adaptive_kl_in_a_run(sft_model, rm, synthetic, tmp_path):
    ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path, "--steps", "3", "--kl_target", "0.0001",
                       "--kl_horizon", "10", "--save_freq", "1", "--save_total_limit", "1", "--normalize_reward", "none"))
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-3"]  # older ones removed once it was whole
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["kl_coef"] > 0.2  # the policy moved more than the tiny target: the penalty grew
    rows = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # one line per step, without a tracker
    for r in rows:  # the phases account for the step's wall time
        phases = [r[f"perf/seconds_{p}"] for p in ("generation", "scoring", "policy_reference_value", "update")]
        assert min(phases) > 0 and sum(phases) == pytest.approx(r["perf/step_seconds"], rel=1e-6)
        assert r["perf/generation_share"] == pytest.approx(phases[0] / r["perf/step_seconds"])


def test_a_nan_reward_stops_the_run_naming_the_step(sft_model, rm, synthetic, tmp_path):
    from ser.modeling import load_reward_model, load_tokenizer

    tok = load_tokenizer(str(rm))
    broken = load_reward_model(str(rm), tok)
    with torch.no_grad():
        broken.score.weight.fill_(float("nan"))
    broken.save_pretrained(tmp_path / "nan_rm")
    tok.save_pretrained(tmp_path / "nan_rm")
    with pytest.raises(FloatingPointError, match=r"step 0: the reward model returned non-finite scores"):
        ppo.main(*ppo_args(sft_model, tmp_path / "nan_rm", synthetic, tmp_path / "out", "--steps", "2",
                          "--batched_gen", "False"))


@pytest.mark.slow
def test_separate_critic_full_policy_adafactor_and_early_stopping(sft_model, rm, synthetic, tmp_path, capsys):
    log = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path, "--steps", "2", "--critic", "separate",
                      "--use_lora", "False", "--adafactor", "True", "--early_stopping", "True", "--target_kl", "1e-9",
                      "--missing_eos_penalty", "1.0", "--reward_transform", "sigmoid", "--save_freq", "2"))
    assert log["ppo/early_stopped"] == 1.0  # the KL of the first update already exceeds 1.5 x target_kl
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    critic = {k: v for k, v in weights.items() if k.startswith("critic.")}
    assert "critic.score.weight" in critic and not any(k.startswith("value_head") for k in weights)
    initial = load_file(rm / "model.safetensors")["score.weight"]
    assert not torch.equal(critic["critic.score.weight"], initial)  # the critic, initialised from the RM, trained
    assert (tmp_path / "policy" / "model.safetensors").is_file()


def test_minibatches_not_a_multiple_of_accumulation_are_refused(sft_model, rm, synthetic, tmp_path):
    """batch 8, mini-batch 1, accumulation 3: the third step of an epoch would carry gradients over."""
    args, model_args = ppo_args(sft_model, rm, synthetic, tmp_path, "--steps", "1")
    args.batch_size, args.mini_batch_size, args.gradient_accumulation_steps = 8, 1, 3
    with pytest.raises(ValueError, match="8 minibatches per PPO epoch is not a multiple of --gradient_accumulation"):
        ppo.main(args, model_args)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_logged_reward_is_the_raw_rm_reward_under_reward_norm(sft_model, rm, synthetic, tmp_path):
    plain = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "a", "--steps", "1", "--seed", "5"))
    normed = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "b", "--steps", "1", "--seed", "5",
                               "--reward_norm", "True"))
    # the same first rollout: the same raw rewards, whatever the normalisation fed to PPO
    assert normed["env/reward_mean"] == pytest.approx(plain["env/reward_mean"], abs=1e-5)
    assert abs(normed["env/score_mean"]) < 1e-4 < abs(plain["env/reward_mean"])


@pytest.mark.slow
def test_update_statistics_are_averaged_over_processes(sft_model, rm, synthetic, tmp_path, monkeypatch):
    """With a second process whose every figure is this one's + 1, each logged PPO statistic is the
    mean of the two (+0.5), not this process's own."""
    # (the SFT statistics are gathered too; early stopping would read the paired run's gathered KL and stop sooner)
    flags = ["--steps", "1", "--seed", "7", "--normalize_reward", "none", "--early_stopping", "False"]
    alone = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "a", *flags))
    monkeypatch.setattr(ppo, "gather", lambda t: torch.cat([t.reshape(-1), t.reshape(-1) + 1]))
    paired = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "b", *flags))
    for key in ("ppo/pg_loss", "ppo/vf_loss", "ppo/clipfrac", "ppo/approxkl", "ppo/entropy"):
        assert paired[key] == pytest.approx(alone[key] + 0.5, abs=1e-5), key


def test_value_head_of_another_shape_is_an_error(sft_model, synthetic, tmp_path):
    """An RM on a backbone of another width cannot initialise the value head: say so, do not zero it."""
    from transformers import AutoModelForSequenceClassification

    from ser.modeling import load_tokenizer

    wide = tiny.build(tiny.Args(out=str(tmp_path / "wide"), hidden_size=96))
    tok = load_tokenizer(str(sft_model))
    AutoModelForSequenceClassification.from_pretrained(wide, num_labels=1).save_pretrained(tmp_path / "wide_rm")
    tok.save_pretrained(tmp_path / "wide_rm")
    with pytest.raises(ValueError, match=r"score head has shape \(1, 96\).*needs \(1, 64\)"):
        ppo.main(*ppo_args(sft_model, tmp_path / "wide_rm", synthetic, tmp_path / "out", "--steps", "1"))


def checkpoint(path):
    """A PPO checkpoint's contents, read without unpickling anything but tensors and plain data."""
    assert not list(path.glob("custom_checkpoint_*"))  # no pickled custom state
    weights = load_file(path / "model.safetensors")
    optim = torch.load(path / "optimizer.bin", weights_only=True)
    sched = torch.load(path / "scheduler.bin", weights_only=True)
    state = json.loads((path / "trainer_state.json").read_text())
    return weights, optim, sched, {k: v for k, v in state.items() if k != "args"}


class Crash(Exception):
    pass


class Planted:
    """Unpickling it creates a file: the proof that something unpickled it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_resume_is_exact(sft_model, rm, synthetic, tmp_path, monkeypatch):
    flags = ["--steps", "4", "--save_freq", "2", "--lr_scheduler_type", "linear", "--reward_norm", "True",
             "--seed", "3"]
    ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "straight", *flags))

    save = ppo.save_checkpoint

    def save_then_crash(accelerator, args, state, **kw):
        save(accelerator, args, state, **kw)
        raise Crash(f"killed after step {state.step}")

    monkeypatch.setattr(ppo, "save_checkpoint", save_then_crash)
    with pytest.raises(Crash, match="after step 2"):
        ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "halves", *flags))
    monkeypatch.setattr(ppo, "save_checkpoint", save)
    # a planted pickle in the checkpoint is refused, never unpickled: the resumable state is JSON
    planted, bait = tmp_path / "planted", tmp_path / "halves" / "checkpoint-2" / "custom_checkpoint_0.pkl"
    torch.save(Planted(str(planted)), bait)
    with pytest.raises(RuntimeError, match="custom checkpoints"):
        ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "halves", *flags,
                           "--resume_from_checkpoint", str(tmp_path / "halves" / "checkpoint-2")))
    assert not planted.exists()
    bait.unlink()
    ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path / "halves", *flags,
                      "--resume_from_checkpoint", str(tmp_path / "halves" / "checkpoint-2")))
    assert not planted.exists()
    a, b = checkpoint(tmp_path / "straight" / "checkpoint-4"), checkpoint(tmp_path / "halves" / "checkpoint-4")
    assert a[0].keys() == b[0].keys()
    for name in a[0]:
        assert torch.allclose(a[0][name], b[0][name], atol=1e-6), name
    changed = load_file(tmp_path / "halves" / "checkpoint-2" / "model.safetensors")
    assert any(not torch.equal(changed[n], b[0][n]) for n in b[0]), "the second half trained nothing"
    for (ka, sa), sb in zip(a[1]["state"].items(), b[1]["state"].values()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(sa[key], sb[key], atol=1e-7), (ka, key)
    assert a[2] == b[2]  # scheduler
    assert a[3] == b[3]  # step, data position, KL coefficient, reward moments
    assert a[3]["step"] == 4 and a[3]["data_position"] == 32


def seed_ppo_command():
    from conftest import shared_path

    readme = shared_path("seed", "ser-readme.md").read_text()
    (block,) = [b for b in re.findall(r"```shell\n(.*?)```", readme, flags=re.S) if " ppo/ppo.py " in b]
    return block


@pytest.mark.slow
@pytest.mark.two_process
def test_seed_ppo_command_under_accelerate_with_two_processes(sft_model, rm, synthetic, tmp_path):
    command = seed_ppo_command()
    for key, value in {"YOUR_MODEL_PATH": sft_model, "YOUR_TOKENIZER_PATH": sft_model,
                       "YOUR_REWARD_MODEL_PATH": rm, "YOUR_DATASET_PATH": synthetic,
                       "PPO_MODEL_SAVE_PATH": tmp_path / "out"}.items():
        command = command.replace("{" + key + "}", str(value))
    command = re.sub(r"--num_processes \d+", "--num_processes 2", command)
    # As written it runs 20,000 steps; a later --steps wins, so the run stops after 2.
    command = command.rstrip().rstrip("\\") + " --steps 2 --output_max_length 16"
    env = {**ENV, "WANDB_DIR": str(tmp_path), "NETRC": str(tmp_path / "none")}
    env.pop("WANDB_MODE")
    proc = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "ppo: 2 process(es)" in proc.stdout
    assert proc.stdout.count("ppo step 2:") == 1  # printed by the main process only
    assert (tmp_path / "out" / "policy" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoint-2").glob("random_states_*")) == \
        ["random_states_0.pkl", "random_states_1.pkl"]
    assert list((tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.slow
@pytest.mark.two_process
def test_ppo_under_deepspeed_zero2(sft_model, rm, synthetic, tmp_path):
    cmd = ["accelerate", "launch", "--use_deepspeed", "--zero_stage", "2", "--num_processes", "2",
           "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--gradient_accumulation_steps", "2", "ppo/ppo.py", "--model_name", str(sft_model),
           "--reward_model_name", str(rm), "--dataset_name", str(synthetic), "--output_dir", str(tmp_path),
           "--steps", "2", "--batch_size", "4", "--mini_batch_size", "2", "--gradient_accumulation_steps", "2",
           "--output_max_length", "12", "--save_freq", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "ppo: 2 process(es), DistributedType.DEEPSPEED" in proc.stdout
    assert (tmp_path / "checkpoint-2" / "pytorch_model").is_dir()  # a DeepSpeed (ZeRO) checkpoint


def test_evaluation_names_its_circular_judge_and_adds_independent_ones(sft_model, rm, synthetic, tmp_path, monkeypatch):
    from conftest import Server
    from ppo import evaluate

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    server = Server()
    args = parse([evaluate.Args], [
        "--base_model", str(sft_model), "--policy", str(sft_model), "--reward_model_name", str(rm),
        "--judge_reward_model", str(rm), "--dataset_name", str(synthetic), "--gold", "synthetic",
        "--n_prompts", "12", "--max_new_tokens", "8", "--output", str(tmp_path / "eval.json"),
        "--llm_judge_model", "judge-model", "--llm_judge_base_url", server.url])[0]
    try:
        summary = evaluate.main(args)
    finally:
        server.close()
    assert set(summary["judged_by"]) == {"policy_rm", "judge_rm", "gold", "llm"}
    assert 0 < server.requests <= 12  # identical answers are asked about once
    assert summary["judged_by"]["llm"]["compared"] == 12 and summary["judged_by"]["llm"]["counts"]["policy"]["failed"] == 0
    answers = read_records(tmp_path / "eval.policy.jsonl")  # for ppo/judge.py against any other system later
    assert [r["response"] for r in answers] == [r["response"] for r in read_records(tmp_path / "eval.base.jsonl")]
    assert "circular" in summary["judged_by"]["policy_rm"]["note"]
    assert summary["prompts"] == 12
    # the same model sampled with the same seed: identical answers, so every judge sees ties only
    for judge in summary["judged_by"].values():
        assert judge["tie_rate"] == 1.0 and judge["win_rate"] == 0.0
    assert summary["kl_to_base"] == pytest.approx(0.0, abs=1e-5)
    assert json.loads((tmp_path / "eval.json").read_text())["judged_by"]["judge_rm"]["tie_rate"] == 1.0


# ----------------------------------------------------------------------------- robustness to a self-trained RM


def test_the_default_kl_horizon_lets_the_controller_act_within_a_short_run(caplog):
    """The demo's run (80 steps of 32 samples): Ziegler et al.'s horizon of 10000 samples lets the coefficient
    move by at most 5 % over the whole run, and is warned about with the numbers; the default (a tenth of the
    run's samples) lets a KL far above target raise it sevenfold."""
    from accelerate import PartialState

    PartialState()  # the logger's
    args, _ = parse(ppo.ARGUMENTS, ["--model_name", "m", "--reward_model_name", "r", "--dataset_name", "d",
                                    "--steps", "80", "--batch_size", "32", "--init_kl_coef", "0.1"])

    def after_run(horizon):
        ctl = ppo.AdaptiveKLController(0.1, 6.0, horizon, True)
        for _ in range(80):
            ctl.update(18.0, 32)  # the KL sat at 18 against a target of 6
        return ctl.value

    with caplog.at_level("WARNING"):
        default = ppo.kl_horizon(args, 1)
    assert default == 256 and "kl_horizon" not in caplog.text
    assert after_run(default) > 0.7  # 0.1 x 1.025^80
    args.kl_horizon = 10000
    with caplog.at_level("WARNING"):
        assert ppo.kl_horizon(args, 1) == 10000
    assert after_run(10000) < 0.1053 and "can change by at most 5.25 % over the whole run (at most 0.064 % a step)" in caplog.text
    args.steps = 3  # a 3-step run: one step's samples at least, so at most 20 % a step
    args.kl_horizon = None
    assert ppo.kl_horizon(args, 2) == 64


def test_an_ensemble_s_min_is_the_elementwise_minimum_of_its_members():
    members = [[0.5, -1.0, 2.0], [0.1, 3.0, 2.5], [0.7, 0.0, -4.0]]
    assert ppo.ensemble_scores(members, "min").tolist() == pytest.approx([0.1, -1.0, -4.0])
    assert ppo.ensemble_scores(members, "mean").tolist() == pytest.approx([1.3 / 3, 2.0 / 3, 0.5 / 3])
    spread = torch.tensor(members).std(0)
    assert ppo.ensemble_scores(members, "mean_minus_std", 2.0).tolist() == pytest.approx(
        (torch.tensor(members).mean(0) - 2 * spread).tolist())
    assert ppo.ensemble_scores(members[:1], "mean_minus_std").tolist() == pytest.approx(members[0])


def test_normalised_rewards_have_mean_0_and_std_1_on_the_sft_samples(sft_model, rm, synthetic):
    """The statistics are the RM's on samples of the SFT policy (no update yet) for the run's prompts."""
    from accelerate import PartialState

    from ser.data import load_records
    from ser.modeling import THIS_PROCESS_ONLY, load_causal_lm, load_reward_model, load_tokenizer
    from ser.rollout import reward_inputs, sample
    from ser.scoring import score_ids

    args, _ = ppo_args(sft_model, rm, synthetic, "unused", "--normalize_samples", "40")
    tok = load_tokenizer(str(sft_model))
    policy, scorer = load_causal_lm(str(sft_model), tok).eval(), load_reward_model(str(rm), tok).eval()
    prompts = [r["question"] for r in load_records(str(synthetic), "data/rl", fields=("question",))]

    def rollout_of(questions):
        return sample(policy, tok, questions, args.max_prompt_length, args.output_max_length, 1.0, True, "cpu")

    def rm_scores(rollout, n):
        return torch.tensor(score_ids(scorer, tok, reward_inputs(tok, rollout, 96), n, THIS_PROCESS_ONLY)[0]), None, None

    class OneProcess:
        num_processes, process_index, device = 1, 0, "cpu"
        autocast = staticmethod(lambda: torch.autocast("cpu", enabled=False))

    PartialState()  # gather() on one process
    mean, std, scores = ppo.sft_reward_statistics(prompts, args, OneProcess(), rollout_of, rm_scores)
    assert len(scores) == min(40, len(prompts)) and std > 0
    normalised = (scores - mean) / std
    assert normalised.mean().item() == pytest.approx(0, abs=1e-5) and normalised.std().item() == pytest.approx(1, abs=1e-5)


def test_max_length_is_the_rm_s_and_a_conflicting_one_is_refused(rm):
    trained = json.loads((rm / "eval_results.json").read_text())["max_length"]
    args, _ = parse(ppo.ARGUMENTS, ["--model_name", "m", "--reward_model_name", str(rm), "--dataset_name", "d"])
    assert ppo.resolve_max_length(args) == trained
    args.max_length = trained + 8
    with pytest.raises(ValueError, match=rf"--max_length {trained + 8}: .* was trained at {trained} tokens"):
        ppo.resolve_max_length(args)


@pytest.mark.slow
def test_keep_best_saves_the_checkpoint_the_summary_names(sft_model, rm, synthetic, tmp_path):
    """Three checkpoints, gold logged at each, the policy kept is the best one's; an ensemble of two RMs and the
    new defaults (SFT-normalised rewards, the run's KL horizon) run alongside."""
    from safetensors.torch import load_file

    log = ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path, "--reward_model_name", str(rm), str(rm),
                             "--reward_ensemble", "min", "--steps", "3", "--save_freq", "1", "--save_total_limit", "1",
                             "--gold", "synthetic", "--eval_reward_model", str(rm), "--keep", "best",
                             "--normalize_samples", "16"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["checkpoints"]) == 3 and all("gold/reward_mean" in c for c in summary["checkpoints"])
    best = max(summary["checkpoints"], key=lambda c: c["gold/reward_mean"])["step"]
    assert summary["best_checkpoint"] == summary["kept_checkpoint"] == best
    assert (tmp_path / f"checkpoint-{best}").is_dir()  # kept from --save_total_limit's pruning
    assert log["env/ensemble_spread"] == pytest.approx(0, abs=1e-6) and "eval/reward_mean" in log
    norm = json.loads((tmp_path / "run_args.json").read_text())["reward_normalisation"]
    assert norm["how"] == "sft" and norm["std"] > 0 and summary["reward_normalisation"] == {
        k: norm[k] for k in ("how", "mean", "std")}
    # the saved policy is the best checkpoint's: its weights equal that checkpoint's merged LoRA policy
    saved = load_file(tmp_path / "policy" / "model.safetensors")
    again = tmp_path / "again"
    ppo.main(*ppo_args(sft_model, rm, synthetic, again, "--reward_model_name", str(rm), str(rm),
                       "--reward_ensemble", "min", "--steps", str(best), "--save_freq", "1", "--gold", "synthetic",
                       "--normalize_samples", "16"))
    if best < 3:  # the same seed replays the run up to the best step
        replay = load_file(again / "policy" / "model.safetensors")
        assert all(torch.allclose(saved[k], replay[k], atol=1e-5) for k in saved)


def test_past_the_kl_budget_the_last_checkpoint_within_it_is_kept():
    from types import SimpleNamespace

    state = ppo.TrainState(step=3, checkpoints=[{"step": 1, "gold/reward_mean": 0.4}, {"step": 2, "gold/reward_mean": 0.1}],
                           stopped="step 3: KL 9 > --kl_budget 5")
    assert ppo.choose_checkpoint(state, SimpleNamespace(keep="last"))["step"] == 2
    assert ppo.choose_checkpoint(state, SimpleNamespace(keep="best"))["step"] == 1


@pytest.mark.slow
def test_a_kl_budget_ends_the_run_and_keeps_the_last_checkpoint_within_it(sft_model, rm, synthetic, tmp_path):
    ppo.main(*ppo_args(sft_model, rm, synthetic, tmp_path, "--steps", "6", "--save_freq", "1", "--save_total_limit", "9",
                       "--kl_budget", "-1000.0", "--learning_rate", "3e-2"))  # any KL is past it: the run ends at step 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps_run"] == 1 and "> --kl_budget" in summary["stopped"] and summary["kept_checkpoint"] is None
    assert (tmp_path / "policy" / "model.safetensors").is_file()
