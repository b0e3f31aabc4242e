"""Self-labelling across processes, and the loop driver's skip-and-resume."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import rm_loop_filter_by_self as F
import rm_training
from conftest import CPU, ENV, RM_ARGS, ROOT, filter_flags, free_port
from ser.cli import parse
from ser.data import read_records


@pytest.mark.slow
@pytest.mark.two_process
def test_two_processes_score_the_pool_like_one(synthetic, rm0, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    F.main(*parse([F.ScriptArguments], filter_flags(synthetic, rm0, one)))
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
           "--mixed_precision", "no", "--dynamo_backend", "no", "rm_loop_filter_by_self.py",
           *filter_flags(synthetic, rm0, two), "--chunk_pairs", "128"]  # 4 chunks, each split across the two
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_records(one / "scored.jsonl"), read_records(two / "scored.jsonl")
    assert len(a) == len(b) == 510
    for x, y in zip(a, b):
        assert x["id"] == y["id"]
        assert x["reward_j"] == pytest.approx(y["reward_j"], abs=1e-5)
        assert x["reward_k"] == pytest.approx(y["reward_k"], abs=1e-5)
    assert [r["id"] for r in read_records(one / "selected.jsonl")] == \
        [r["id"] for r in read_records(two / "selected.jsonl")]
    stats = json.loads((two / "stats.json").read_text())
    assert stats["scoring"]["sequences"] == 1020 and stats["scoring"]["processes"] == 2
    assert stats["scoring"]["scored_here"] == 510 and stats["status"] != "stop", stats
    assert stats["scoring"]["tokenised_here"] == 510  # each process tokenised its own half of the pool only
    assert stats["scoring"]["chunks"] == 4 and not (two / "scored.jsonl.parts").exists()


def test_a_killed_self_labelling_resumes_after_the_last_saved_chunk(synthetic, rm0, tmp_path, monkeypatch):
    import ser.scoring

    score_pairs, calls = ser.scoring.score_pairs, []

    def counted(*args, **kwargs):
        calls.append(len(args[2]))
        if kill_at and len(calls) == kill_at:
            raise KeyboardInterrupt  # as a kill would stop it, in the middle of a chunk
        return score_pairs(*args, **kwargs)

    monkeypatch.setattr(ser.scoring, "score_pairs", counted)
    kill_at = 0
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, whole), "--chunk_pairs", "100"]))
    assert calls == [100] * 5 + [10] and not (whole / "scored.jsonl.parts").exists()

    calls.clear()
    kill_at = 3
    with pytest.raises(KeyboardInterrupt):
        F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, resumed), "--chunk_pairs", "100"]))
    assert sorted(p.name for p in (resumed / "scored.jsonl.parts").iterdir()) == ["000000.jsonl", "000001.jsonl", "run.json"]
    assert not (resumed / "scored.jsonl").exists() and not (resumed / "selected.jsonl").exists()

    calls.clear()
    kill_at = 0
    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, resumed), "--chunk_pairs", "100"]))
    assert calls == [100] * 3 + [10]  # the two saved chunks were not scored again
    stats = json.loads((resumed / "stats.json").read_text())["scoring"]
    assert stats["resumed_pairs"] == 200 and stats["chunks"] == 6
    a, b = read_records(whole / "scored.jsonl"), read_records(resumed / "scored.jsonl")
    assert [(x["id"], x["reward_j"], x["reward_k"]) for x in a] == [(y["id"], y["reward_j"], y["reward_k"]) for y in b]
    assert read_records(whole / "selected.jsonl") == read_records(resumed / "selected.jsonl")
    assert not (resumed / "scored.jsonl.parts").exists()


def filter_killed_at_the_second_chunk(monkeypatch, flags):
    """The filter run with `flags`, killed while it scores its second chunk (the first is saved)."""
    import ser.scoring

    score_pairs, calls = ser.scoring.score_pairs, []

    def killed(*args, **kwargs):
        calls.append(len(args[2]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score_pairs(*args, **kwargs)

    monkeypatch.setattr(ser.scoring, "score_pairs", killed)
    with pytest.raises(KeyboardInterrupt):
        F.main(*parse([F.ScriptArguments], flags))
    monkeypatch.setattr(ser.scoring, "score_pairs", score_pairs)


def test_chunks_saved_by_another_run_are_never_reused(synthetic, rm0, tmp_path, monkeypatch):
    filter_killed_at_the_second_chunk(monkeypatch, [*filter_flags(synthetic, rm0, tmp_path), "--chunk_pairs", "100"])
    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, tmp_path), "--chunk_pairs", "100",
                                        "--max_length", "40"]))  # other settings: the saved chunk is not theirs
    assert json.loads((tmp_path / "stats.json").read_text())["scoring"]["resumed_pairs"] == 0


@pytest.mark.parametrize("change", ["rm retrained in place", "dtype"])
def test_chunks_scored_by_another_rm_at_the_same_path_or_in_another_dtype_are_not_reused(synthetic, rm0, tmp_path,
                                                                                         monkeypatch, change):
    import shutil

    from safetensors.torch import load_file, save_file

    rm = tmp_path / "rm"
    shutil.copytree(rm0, rm)
    filter_killed_at_the_second_chunk(monkeypatch, [*filter_flags(synthetic, rm, tmp_path / "out"), "--chunk_pairs", "100"])
    extra = []
    if change == "dtype":
        extra = ["--dtype", "bfloat16"]
    else:  # as `FORCE=1` retraining loop_0/rm would: other weights, same folder
        weights = load_file(rm / "model.safetensors")
        weights["score.weight"] = -weights["score.weight"]
        save_file(weights, rm / "model.safetensors", metadata={"format": "pt"})
    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm, tmp_path / "out"), "--chunk_pairs", "100", *extra]))
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["scoring"]["resumed_pairs"] == 0
    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm, tmp_path / "clean"), "--chunk_pairs", "100", *extra]))
    assert read_records(tmp_path / "out" / "scored.jsonl") == read_records(tmp_path / "clean" / "scored.jsonl")


def test_a_rerun_into_a_done_folder_drops_its_done_marker_before_writing(synthetic, rm0, tmp_path, monkeypatch):
    """A filter re-run killed part-way must not leave a folder that looks done (the old stats.json beside
    outputs being replaced); neither may an RM training re-run (the old eval_results.json)."""
    import ser.scoring

    F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, tmp_path), "--chunk_pairs", "100"]))
    assert (tmp_path / "stats.json").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ser.scoring, "score_pairs", killed)
    with pytest.raises(KeyboardInterrupt):
        F.main(*parse([F.ScriptArguments], [*filter_flags(synthetic, rm0, tmp_path), "--chunk_pairs", "50"]))
    assert not (tmp_path / "stats.json").exists()

    out = tmp_path / "rm"
    out.mkdir()
    (out / "eval_results.json").write_text("{}")
    monkeypatch.setattr(rm_training.PairwiseRewardTrainer, "train", killed)
    with pytest.raises(KeyboardInterrupt):
        rm_training.main(*parse(rm_training.ARGUMENTS, [
            "--model_name", str(rm0), "--dataset_name", str(synthetic), "--output_dir", str(out), *RM_ARGS.split()]))
    assert not (out / "eval_results.json").exists()


def test_a_full_rm_trained_where_a_lora_adapter_was_leaves_no_adapter_behind(sft_model, synthetic, tmp_path):
    from ser.modeling import is_lora_dir, load_reward_model, load_tokenizer

    out = tmp_path / "rm"
    common = ["--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
              "--num_train_epochs", "1", *RM_ARGS.split()]
    rm_training.main(*parse(rm_training.ARGUMENTS, [*common, "--use_lora", "True"]))
    assert is_lora_dir(out)
    rm_training.main(*parse(rm_training.ARGUMENTS, common))  # RM_ARGS says --use_lora False (the later flag)
    assert not is_lora_dir(out) and not (out / "adapter_model.safetensors").exists()
    model = load_reward_model(str(out), load_tokenizer(str(out)))
    assert not hasattr(model, "peft_config")  # every later stage loads the full RM just trained


def driver(run, synthetic, sft_model):
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "2",
           "MAX_LENGTH": "96", "SEED_EPOCHS": "8", "LOOP_EPOCHS": "6",
           "RM_ARGS": RM_ARGS, "FILTER_ARGS": "--status1_min_pairs 20 --status2_min_pairs 20 --probability pairwise",
           "PY": sys.executable}
    return subprocess.Popen(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def figures(run):
    summary = json.loads((run / "loops.json").read_text())
    return [{k: v for k, v in lp.items() if k not in ("wall_time_s", "rm")} for lp in summary["loops"]]


@pytest.mark.slow
def test_killed_driver_resumes_to_the_same_figures(synthetic, sft_model, tmp_path):
    straight = driver(tmp_path / "straight", synthetic, sft_model)
    out, _ = straight.communicate(timeout=900)
    assert straight.returncode == 0, out[-4000:]

    run = tmp_path / "killed"
    victim = driver(run, synthetic, sft_model)
    deadline = time.time() + 600
    while not (run / "loop_1" / "stats.json").exists():  # kill while loop 1 retrains
        assert victim.poll() is None and time.time() < deadline, "driver ended before it could be killed"
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    import fcntl

    with open(run / ".lock", "w") as lock:  # the driver's stages hold the run's lock until they are gone too
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.time() < deadline + 60, "the killed driver's stages did not exit"
                time.sleep(0.1)
    assert not (run / "loops.json").exists()

    resumed = driver(run, synthetic, sft_model)
    out, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, out[-4000:]
    assert "ser: loop_0.train already done" in out and "ser: loop_1.filter already done" in out
    assert figures(run) == figures(tmp_path / "straight")
    # one --max_length reaches every stage; the seed RM and the loops train for their own epochs
    rm0, rm1 = (json.loads((run / f"loop_{t}" / "rm" / "eval_results.json").read_text()) for t in (0, 1))
    assert (rm0["max_length"], rm0["num_train_epochs"], rm1["max_length"], rm1["num_train_epochs"]) == (96, 8, 96, 6)
    assert json.loads((run / "loop_1" / "stats.json").read_text())["max_length"] == 96
    loop1 = figures(run)[1]
    assert loop1["status"] == "status1" and loop1["selected"] > 0 and loop1["accuracy"] is not None


@pytest.mark.slow
def test_driver_records_its_settings_refuses_other_ones_and_runs_alone(synthetic, sft_model, tmp_path):
    import fcntl

    run = tmp_path / "run"
    env = {**ENV, "DATA": str(synthetic), "SFT": str(sft_model), "RUN": str(run), "MAX_LOOPS": "0",
           "RM_ARGS": RM_ARGS + ' --num_train_epochs 1 --run_name "my run" --label_names *.py', "PY": sys.executable}
    first = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["RM_ARGS"] == env["RM_ARGS"] and config["git_revision"] and config["versions"]["torch"]
    # the extra flags reach the stage as a shell would split them: quotes kept, nothing globbed
    resolved = json.loads((run / "loop_0" / "rm" / "run_args.json").read_text())["RMConfig"]
    assert resolved["run_name"] == "my run" and resolved["label_names"] == ["*.py"]

    changed = {**env, "RM_ARGS": RM_ARGS + " --num_train_epochs 2"}
    refused = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=changed, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 3 and "RM_ARGS: was" in refused.stderr
    assert json.loads((run / "config.json").read_text())["settings"]["RM_ARGS"] == env["RM_ARGS"]
    forced = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env={**changed, "FORCE": "1"},
                            capture_output=True, text=True, timeout=600)
    assert forced.returncode == 0 and "settings changed under FORCE" in forced.stdout

    with open(run / ".lock", "w") as lock:  # a driver, or a stage it started, still holds the run
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=changed, capture_output=True, text=True,
                              timeout=600)
    assert busy.returncode == 4 and "still running" in busy.stderr


def test_without_flock_the_driver_holds_an_exclusive_lock_file_and_tells_a_stale_one_apart(tmp_path):
    """Lustre mounted without -o flock: flock fails for another reason than a held lock."""
    import socket

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "flock").write_text("#!/bin/sh\necho 'flock: 9: Function not implemented' >&2\nexit 65\n")
    (bin_dir / "flock").chmod(0o755)
    run = tmp_path / "run"
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "DATA": str(tmp_path), "SFT": str(tmp_path), "RUN": str(run),
           "PY": sys.executable, "LAUNCH": "false"}  # the first stage fails at once: the lock is what is tested

    def drive():
        return subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    first = drive()
    assert first.returncode != 0 and "no flock; this driver holds" in first.stderr, first.stderr[-2000:]
    assert "ser: loop_0.train" in first.stdout and not (run / ".lock.pid").exists()  # released on exit
    (run / ".lock.pid").write_text(f"{socket.gethostname()} {os.getpid()}\n")  # a live driver on this host
    busy = drive()
    assert busy.returncode == 4 and f"pid {os.getpid()}) is still running" in busy.stderr
    assert "loop_0.train" not in busy.stdout
    (run / ".lock.pid").write_text(f"{socket.gethostname()} 4194000\n")  # its driver has ended
    stale = drive()
    assert "replaced the stale lock" in stale.stderr and "ser: loop_0.train" in stale.stdout, stale.stderr[-2000:]
    assert not (run / ".lock.pid").exists()


def test_a_file_in_the_run_folder_is_never_executed(tmp_path):
    """A planted wall-clock start file: bash arithmetic would expand `x[$(touch ...)]` and run it on resume."""
    run = tmp_path / "run"
    (run / "loop_0" / "rm").mkdir(parents=True)
    (run / "loop_0" / "rm" / "eval_results.json").write_text("{}")  # loop 0 looks done: its wall time is recorded
    planted = tmp_path / "pwned"
    (run / ".wall.loop_0.train.start").write_text(f"lock_rc[$(touch {planted})]\n")
    env = {**ENV, "DATA": str(tmp_path), "SFT": str(tmp_path), "RUN": str(run), "PY": sys.executable,
           "LAUNCH": "false"}  # loop 1's filter fails at once
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert not planted.exists(), proc.stderr[-2000:]
    assert "does not hold a start time" in proc.stderr and "ser: loop_0.train already done" in proc.stdout
    assert not (run / ".wall.loop_0.train.json").exists() and not list(run.glob(".wall.*.tmp"))


@pytest.mark.parametrize("setting", ["ASK_HUMANS=2.5", "ASK_HUMANS=abc", "MAX_LOOPS=two", "LOOP_EPOCHS=-1",
                                     "SEED_EPOCHS=1e3", "MAX_LENGTH=0x10", "KEEP_SEED=2", "UNION=yes"])
def test_a_driver_setting_that_is_not_a_whole_number_stops_it_before_any_stage(tmp_path, setting):
    name, value = setting.split("=")
    run = tmp_path / "run"
    env = {**ENV, "DATA": str(tmp_path), "SFT": str(tmp_path), "RUN": str(run), "PY": sys.executable,
           "LAUNCH": "false", name: value}
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"ser: {name}={value}: expected" in proc.stderr, proc.stderr[-2000:]
    assert "unbound variable" not in proc.stderr and "loop_0" not in proc.stdout and not (run / "config.json").exists()


@pytest.mark.parametrize("variable", ["RM_ARGS", "FILTER_ARGS", "GENERATE_ARGS"])
def test_an_unclosed_quote_in_extra_flags_stops_the_driver_before_any_stage(tmp_path, variable):
    run = tmp_path / "run"
    env = {**ENV, "DATA": str(tmp_path), "SFT": str(tmp_path), "RUN": str(run), "PY": sys.executable,
           "LAUNCH": "false", variable: "--use_lora False --learning_rate 1e-3 --run_name 'x"}
    proc = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"ser: {variable} cannot be split into flags (ValueError: No closing quotation)" \
        in proc.stderr, proc.stderr[-2000:]
    assert "loop_0" not in proc.stdout and not (run / "config.json").exists()
    good = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env={**env, variable: "--run_name 'x y'"},
                          capture_output=True, text=True, timeout=120)
    assert "ser: loop_0.train" in good.stdout  # quoted flags split as a shell would (LAUNCH=false then stops it)


STUB_STAGE = """
import os, pathlib, signal, sys, time
argv = sys.argv[1:]
if "--output_dir" not in argv:
    sys.exit("stub: only the training stage is stubbed")
time.sleep(0.3)
done = pathlib.Path(argv[argv.index("--output_dir") + 1]) / "eval_results.json"
done.parent.mkdir(parents=True, exist_ok=True)
done.write_text("{}")
if os.environ.get("KILL_DRIVER"):  # the stage finished; its driver dies before noting the wall time
    os.kill(os.getppid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_driver_killed_after_a_stage_still_gets_its_wall_time(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(STUB_STAGE)
    run = tmp_path / "run"
    env = {**ENV, "DATA": str(tmp_path), "SFT": str(tmp_path), "RUN": str(run), "PY": sys.executable,
           "LAUNCH": f"{sys.executable} {stub}"}
    killed = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env={**env, "KILL_DRIVER": "1"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL and (run / "loop_0" / "rm" / "eval_results.json").is_file()
    assert not (run / ".wall.loop_0.train.json").exists()
    rerun = subprocess.run(["bash", "scripts/ser_loop.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "ser: loop_0.train already done" in rerun.stdout
    wall = json.loads((run / ".wall.loop_0.train.json").read_text())
    assert wall["stage"] == "loop_0.train" and 300 <= wall["ms"] < 60_000, wall


def two_nodes(script_and_flags, tmp_path):
    """Two "machines" of one process each on 127.0.0.1, started by the cluster recipe's per-node launcher
    (scripts/cluster/launch.sh) as srun would start it on each node of a 2-node allocation."""
    env = {**ENV, "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "ACCELERATE_FLAGS": "--multi_gpu --mixed_precision no --dynamo_backend no"}
    procs = [subprocess.Popen(["bash", "scripts/cluster/launch.sh", *script_and_flags], cwd=ROOT,
                              env={**env, "SLURM_NODEID": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.mark.slow
@pytest.mark.two_process
def test_two_nodes_on_loopback_score_the_pool_like_one_process(synthetic, rm0, tmp_path):
    one, nodes = tmp_path / "one", tmp_path / "nodes"
    F.main(*parse([F.ScriptArguments], filter_flags(synthetic, rm0, one)))
    outs = two_nodes(["rm_loop_filter_by_self.py", *filter_flags(synthetic, rm0, nodes)], tmp_path)
    a, b = read_records(one / "scored.jsonl"), read_records(nodes / "scored.jsonl")
    assert [x["id"] for x in a] == [y["id"] for y in b]
    assert [x["reward_j"] for x in a] == pytest.approx([y["reward_j"] for y in b], abs=1e-5)
    assert [r["id"] for r in read_records(one / "selected.jsonl")] == [r["id"] for r in read_records(nodes / "selected.jsonl")]
    stats = json.loads((nodes / "stats.json").read_text())
    assert stats["scoring"]["processes"] == 2 and stats["scoring"]["tokenised_here"] == 510
    assert "filter:" in outs[0] and "filter:" not in outs[1]  # the global main process writes and reports


@pytest.mark.slow
@pytest.mark.two_process
def test_two_nodes_on_loopback_train_the_rm_like_one_node(synthetic, sft_model, tmp_path):
    def flags(out):
        return ["rm_training.py", "--model_name", str(sft_model), "--dataset_name", str(synthetic), "--output_dir",
                str(out), "--num_train_epochs", "2", "--max_length", "96", "--seed", "5", *RM_ARGS.split()]

    node = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                           "--mixed_precision", "no", "--dynamo_backend", "no", *flags(tmp_path / "node")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert node.returncode == 0, node.stderr[-4000:]
    two_nodes(flags(tmp_path / "nodes"), tmp_path)
    a, b = (json.loads((tmp_path / d / "eval_results.json").read_text()) for d in ("node", "nodes"))
    assert a["accuracy"] == b["accuracy"] and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    sa, sb = (read_records(tmp_path / d / "eval_scores.jsonl") for d in ("node", "nodes"))
    assert [s["reward_j"] for s in sa] == pytest.approx([s["reward_j"] for s in sb], abs=1e-4)


@pytest.mark.slow
@pytest.mark.two_process
def test_two_nodes_with_the_deepspeed_launcher_train_sft_like_one_node(tiny_model, synthetic, tmp_path):
    """ZeRO-3 SFT (the seed's DeepSpeed config) started by DeepSpeed's launcher: one node of 2 processes,
    and two "nodes" of one from a hostfile (scripts/cluster/deepspeed_launch.sh, as srun would start it)."""
    from safetensors.torch import load_file

    def flags(out):
        return ["sft.py", "--model_name", str(tiny_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
                "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
                "--deepspeed", "sft/deepspeed_config.json", "--logging_steps", "1", *CPU]

    node = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), *flags(tmp_path / "node")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = {**ENV, "SLURM_NNODES": "2", "GPUS_PER_NODE": "1", "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen(["bash", "scripts/cluster/deepspeed_launch.sh", *flags(tmp_path / "nodes")], cwd=ROOT,
                              env={**env, "SLURM_NODEID": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in (0, 1)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    assert "nnodes=2" in outs[0] and "node_rank=1" in outs[1]

    def losses(text):
        return [float(x) for x in re.findall(r"'loss': '?([0-9.e+-]+)", text)]

    assert losses(node.stdout + node.stderr) and losses(outs[0]) == pytest.approx(losses(node.stdout + node.stderr), rel=1e-4)
    one, two = load_file(tmp_path / "node" / "model.safetensors"), load_file(tmp_path / "nodes" / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["sft", "ppo"])
@pytest.mark.two_process
def test_two_nodes_on_loopback_run_sft_and_ppo_like_one_node(stage, tiny_model, sft_model, rm0, synthetic, tmp_path):
    """The stages not covered above, as two accelerate "machines" of one process against one of two:
    the same logged losses and the same saved weights."""
    from safetensors.torch import load_file

    def flags(out):
        if stage == "sft":
            return ["sft.py", "--model_name", str(tiny_model), "--dataset_name", str(synthetic), "--output_dir", str(out),
                    "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--learning_rate", "3e-3",
                    "--logging_steps", "1", *CPU]
        return ["ppo/ppo.py", "--model_name", str(sft_model), "--reward_model_name", str(rm0), "--dataset_name",
                str(synthetic), "--output_dir", str(out), "--steps", "2", "--batch_size", "4", "--mini_batch_size", "2",
                "--gradient_accumulation_steps", "1", "--ppo_epochs", "1", "--learning_rate", "3e-3",
                "--output_max_length", "8", "--save_freq", "0"]

    node = subprocess.run(["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0",
                           "--mixed_precision", "no", "--dynamo_backend", "no", *flags(tmp_path / "node")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert node.returncode == 0, node.stdout[-3000:] + node.stderr[-3000:]
    outs = two_nodes(flags(tmp_path / "nodes"), tmp_path)
    pattern = r"'loss': '?([0-9.e+-]+)" if stage == "sft" else r"ppo step \d+: reward \S+ kl \S+ kl_coef \S+ len \S+ eos \S+"

    def logged(text):
        return re.findall(pattern, text)

    assert logged(node.stdout) and logged(outs[0]) == logged(node.stdout)
    weights = "model.safetensors" if stage == "sft" else "policy/model.safetensors"
    one, two = load_file(tmp_path / "node" / weights), load_file(tmp_path / "nodes" / weights)
    assert one.keys() == two.keys()
    for name in one:
        assert torch.allclose(one[name], two[name], atol=1e-5), name


@pytest.mark.parametrize("damage", ["edited reward", "string reward", "garbage", "corrupt run.json"])
def test_a_damaged_saved_chunk_is_scored_again(synthetic, rm0, tmp_path, monkeypatch, damage):
    flags = [*filter_flags(synthetic, rm0, tmp_path), "--chunk_pairs", "100"]
    filter_killed_at_the_second_chunk(monkeypatch, flags)
    parts = tmp_path / "scored.jsonl.parts"
    part = parts / "000000.jsonl"
    rows = read_records(part)
    original = rows[3]["reward_j"]
    if damage == "edited reward":
        rows[3]["reward_j"] = original + 1.0
    elif damage == "string reward":
        rows[3]["reward_j"] = str(original)
    if damage in ("edited reward", "string reward"):
        part.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in rows))
    elif damage == "garbage":
        part.write_text("{not json\n")
    else:
        (parts / "run.json").write_text("{")
    F.main(*parse([F.ScriptArguments], flags))
    assert json.loads((tmp_path / "stats.json").read_text())["scoring"]["resumed_pairs"] == 0
    assert read_records(tmp_path / "scored.jsonl")[3]["reward_j"] == original


def test_a_file_where_the_chunks_go_is_named(synthetic, rm0, tmp_path):
    (tmp_path / "scored.jsonl.parts").write_text("not a folder")
    with pytest.raises(ValueError, match=r"scored.jsonl.parts: a file where the filter keeps its scored chunks"):
        F.main(*parse([F.ScriptArguments], filter_flags(synthetic, rm0, tmp_path)))
    assert not (tmp_path / "selected.jsonl").exists()
