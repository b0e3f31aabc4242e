#!/usr/bin/env bash
# The SER loop: Loop 0 trains RM_0 on the human-labelled seed; every further loop self-labels the pool
# with the current RM, decides the learning status, selects, and retrains, until Stop or MAX_LOOPS.
#
#   DATA=data/generated/synthetic SFT=runs/demo/sft RUN=runs/demo/ser bash scripts/ser_loop.sh
#
# Each loop writes RUN/loop_<t>/ (rm/, scored.jsonl, selected.jsonl, remaining.jsonl, stats.json).
# Re-running the same command skips what finished and redoes what a crash interrupted.
# Settings are environment variables; edit or override them:
set -euo pipefail

: "${DATA:?DATA: a prepared data folder holding data/reward, data/unlabeled and data/evaluation}"
: "${SFT:?SFT: the SFT model folder (RM_0 starts from it)}"
: "${RUN:?RUN: the folder for this run}"
MAX_LOOPS=${MAX_LOOPS:-3}     # self-evolution loops after Loop 0 (the paper runs 3)
KEEP_SEED=${KEEP_SEED:-1}     # 1: the human seed stays in every retraining mix; 0: self-labels only
UNION=${UNION:-1}             # 1: retrain on every loop's self-labels so far (the paper); 0: on the newest loop's only
CONTINUE=${CONTINUE:-1}       # 1: RM_t+1 continues from RM_t (the paper's curves); 0: restarts from SFT
MAX_LENGTH=${MAX_LENGTH:-512} # tokens per sequence in training, self-labelling and evaluation alike (the paper: 512)
SEED_EPOCHS=${SEED_EPOCHS:-2} # epochs of RM_0 on the human seed (the release: 2)
LOOP_EPOCHS=${LOOP_EPOCHS:-5} # epochs of each retraining on the self-labels (the release: 5)
LAUNCH=${LAUNCH:-python}      # e.g. "accelerate launch --multi_gpu --num_processes 8"
PY=${PY:-python}              # for the report
RM_ARGS=${RM_ARGS:-}          # extra rm_training.py flags: learning rate, --use_lora False, --bf16 True, ...
FILTER_ARGS=${FILTER_ARGS:-}  # extra rm_loop_filter_by_self.py flags: thresholds, counts, modes
FORCE=${FORCE:-0}             # 1: continue a RUN made with other settings (see RUN/config.json)
POOL_FROM=${POOL_FROM:-data}  # data: DATA/data/unlabeled; generate: two answers sampled by SFT per question
POOL_PROMPTS=${POOL_PROMPTS:-data/unlabeled} # with POOL_FROM=generate: the split of DATA whose questions are used
GENERATE_ARGS=${GENERATE_ARGS:-} # extra data/generate_pairs.py flags: --model_b, --max_tokens, --temperature, ...
ASK_HUMANS=${ASK_HUMANS:-0}   # N > 0: after each loop's filter, export the N pairs most worth a human label and stop
HUMAN_LABELS=${HUMAN_LABELS:-} # on resume: the labels of the export the driver stopped at (data/import_labels.py)
IMPORT_ARGS=${IMPORT_ARGS:-}  # extra data/import_labels.py flags: --unlabelled skip
ASK_ARGS=${ASK_ARGS:-}        # extra data/ask_humans.py flags: --rule d-optimal --feature_cache DIR, ...

# Numeric settings are checked before any stage: a value that is not a whole number stops the driver, naming
# it (inside `((...))` bash would evaluate it as an expression, or an error there would read as false).
for name in MAX_LOOPS KEEP_SEED UNION CONTINUE MAX_LENGTH SEED_EPOCHS LOOP_EPOCHS FORCE ASK_HUMANS; do
  if [[ ! ${!name} =~ ^[0-9]+$ ]]; then
    echo "ser: $name=${!name}: expected a whole number (0 or more)" >&2; exit 2
  fi
  printf -v "$name" '%d' "$((10#${!name}))"  # 010 is ten, not octal eight
done
for name in KEEP_SEED UNION CONTINUE FORCE; do
  if ((${!name} > 1)); then echo "ser: $name=${!name}: expected 0 or 1" >&2; exit 2; fi
done

# Paths are the caller's: resolve them before moving to the repository.
abspath() { [[ $1 == /* ]] && printf '%s' "$1" || printf '%s/%s' "$PWD" "$1"; }
DATA=$(abspath "$DATA"); SFT=$(abspath "$SFT"); RUN=$(abspath "$RUN")
if [[ -n $HUMAN_LABELS ]]; then HUMAN_LABELS=$(abspath "$HUMAN_LABELS"); fi
cd "$(dirname "$0")/.."
mkdir -p "$RUN"

# One driver per RUN. The lock is held by this shell and inherited by the stages it starts, so a
# trainer orphaned by a killed driver keeps it until it ends too. Where the filesystem has no flock
# (Lustre mounted without -o flock), a lock file created exclusively holds this driver's host and pid
# instead; it is removed when the driver exits, and a stale one (its driver gone from this host) is replaced.
exec 9>"$RUN/.lock"
lock_rc=0; flock -n -E 75 9 2>/dev/null || lock_rc=$?
if ((lock_rc == 75)); then echo "ser: another driver (or a stage it started) is still running on $RUN" >&2; exit 4; fi
if ((lock_rc != 0)); then
  pidfile="$RUN/.lock.pid" me="$(hostname) $$"
  if ! (set -o noclobber; echo "$me" > "$pidfile") 2>/dev/null; then
    read -r host pid < "$pidfile" || true
    if [[ ${host:-} == "$(hostname)" ]] && ! kill -0 "${pid:-0}" 2>/dev/null && rm -f "$pidfile" \
        && (set -o noclobber; echo "$me" > "$pidfile") 2>/dev/null; then
      echo "ser: replaced the stale lock $pidfile of driver ${pid:-?}, which has ended" >&2
    else
      echo "ser: another driver (${host:-?} pid ${pid:-?}) is still running on $RUN; this filesystem has no flock," \
        "so if none is, remove $pidfile" >&2
      exit 4
    fi
  fi
  trap 'rm -f "$pidfile"' EXIT
  echo "ser: $RUN's filesystem has no flock; this driver holds $pidfile instead" >&2
fi

# The extra flags, split as a shell would split them (quotes kept, no globbing); a value that cannot be
# split (an unclosed quote) stops the driver before any stage, naming the variable.
split_flags() {  # VARIABLE ARRAY
  local -n into=$2
  local tmp; tmp=$(mktemp)
  into=()
  if ! $PY -c 'import shlex, sys; sys.stdout.write("\0".join(shlex.split(sys.argv[1])))' "${!1}" >"$tmp" 2>"$tmp.err"; then
    echo "ser: $1 cannot be split into flags ($(tail -n 1 "$tmp.err")): $1=${!1}" >&2
    rm -f "$tmp" "$tmp.err"; exit 2
  fi
  if [[ -s $tmp ]]; then mapfile -d '' -t into <"$tmp"; fi
  rm -f "$tmp" "$tmp.err"
}
split_flags RM_ARGS RM_EXTRA; split_flags FILTER_ARGS FILTER_EXTRA; split_flags GENERATE_ARGS GENERATE_EXTRA
split_flags IMPORT_ARGS IMPORT_EXTRA; split_flags ASK_ARGS ASK_EXTRA

# RUN/config.json: a re-run with other settings must not skip stages made with the old ones.
# (UNION is recorded when it is not the default, so runs made before it existed still match.)
union_setting=(); if [[ $UNION != 1 ]]; then union_setting=(UNION="$UNION"); fi
force=(); if [[ $FORCE == 1 ]]; then force=(--force); fi
# the pool's settings are recorded only when generating, so runs made before they existed still match
pool_settings=(); if [[ $POOL_FROM != data ]]; then
  pool_settings=(POOL_FROM="$POOL_FROM" POOL_PROMPTS="$POOL_PROMPTS" GENERATE_ARGS="$GENERATE_ARGS"); fi
if ((ASK_HUMANS > 0)); then pool_settings+=(ASK_HUMANS="$ASK_HUMANS"); fi
if [[ -n $ASK_ARGS ]]; then pool_settings+=(ASK_ARGS="$ASK_ARGS"); fi
$PY -m ser.run_config --run "$RUN" "${force[@]}" DATA="$DATA" SFT="$SFT" MAX_LOOPS="$MAX_LOOPS" \
  KEEP_SEED="$KEEP_SEED" "${union_setting[@]}" CONTINUE="$CONTINUE" MAX_LENGTH="$MAX_LENGTH" SEED_EPOCHS="$SEED_EPOCHS" \
  LOOP_EPOCHS="$LOOP_EPOCHS" RM_ARGS="$RM_ARGS" FILTER_ARGS="$FILTER_ARGS" "${pool_settings[@]}"

# A stage's wall time runs from its start (recorded before launch) to its done file's mtime, so a kill
# between the two still leaves a wall time: the next run records it from the same files.
# A file in RUN is data, never code: the start time is read as text and used only if it is a plain number.
record_wall() {
  local name=$1 done_file=$2 start_file="$RUN/.wall.$1.start" start="" tmp
  [[ -f $start_file && ! -f "$RUN/.wall.$name.json" ]] || return 0
  read -r start < "$start_file" || true
  if [[ ! $start =~ ^[0-9]+$ ]]; then
    echo "ser: $start_file does not hold a start time (nanoseconds); $name's wall time is not recorded" >&2
    return 0
  fi
  local ms=$(((10#$(date -r "$done_file" +%s%N) - 10#$start) / 1000000))
  tmp=$(mktemp "$RUN/.wall.$name.json.XXXXXX.tmp")
  echo "{\"stage\": \"$name\", \"ms\": $ms}" > "$tmp"
  mv "$tmp" "$RUN/.wall.$name.json"
}

# stage NAME DONE_FILE COMMAND...: run COMMAND unless DONE_FILE exists (each stage writes it last)
stage() {
  local name=$1 done_file=$2; shift 2
  if [[ -f $done_file ]]; then record_wall "$name" "$done_file"; echo "ser: $name already done"; return; fi
  echo "ser: $name"
  rm -f "$RUN/.wall.$name.json"
  date +%s%N > "$RUN/.wall.$name.start"
  $LAUNCH "$@"
  record_wall "$name" "$done_file"
}

stage loop_0.train "$RUN/loop_0/rm/eval_results.json" \
  rm_training.py --model_name "$SFT" --dataset_name "$DATA" --train_subset data/reward \
  --eval_subset data/evaluation --output_dir "$RUN/loop_0/rm" --max_length "$MAX_LENGTH" \
  --num_train_epochs "$SEED_EPOCHS" "${RM_EXTRA[@]}"

# The unlabelled pool: the prepared one, or answers sampled from the SFT model (no labels either way).
case $POOL_FROM in
  data) first_pool=(--dataset_name "$DATA" --subset data/unlabeled) ;;
  generate)
    stage pool.generate "$RUN/pool/train.stats.json" \
      data/generate_pairs.py --prompts "$DATA" --subset "$POOL_PROMPTS" --model "$SFT" \
      --out "$RUN/pool/train.jsonl" --max_prompt_length "$MAX_LENGTH" "${GENERATE_EXTRA[@]}"
    first_pool=(--dataset_name "$RUN/pool/train.jsonl") ;;
  *) echo "ser: POOL_FROM=$POOL_FROM: expected data or generate" >&2; exit 2 ;;
esac

# ask_humans T: with ASK_HUMANS, loop T's least certain pairs go to annotators (data/ask_humans.py). The driver
# stops (exit 5) until their labels come back: HUMAN_LABELS is imported into the first loop that waits for
# them in this invocation, recorded in RUN/config.json, and its pairs join the seed in every later retraining.
human=(); labels_used=0
ask_humans() {
  local t=$1 ask="$RUN/loop_$1/ask"
  if [[ ! -f $ask/ask.json ]]; then
    $PY data/ask_humans.py --pool "$RUN/loop_$t/remaining.jsonl" --n "$ASK_HUMANS" --out "$ask" --seed "$t" \
      --reward_model_name "$RUN/loop_$((t - 1))/rm" "${ASK_EXTRA[@]}"
  fi
  if [[ ! -f $ask/import.json ]]; then
    local earlier=""  # HUMAN_LABELS already imported by an earlier loop (a rerun of the command that resumed it)
    if [[ -n $HUMAN_LABELS && $labels_used == 0 ]]; then
      earlier=$($PY -c 'import json, sys; from pathlib import Path
labels, run, t = str(Path(sys.argv[1]).resolve()), Path(sys.argv[2]), int(sys.argv[3])
done = [s for s in range(1, t) if (run / f"loop_{s}/ask/import.json").is_file()
        and json.loads((run / f"loop_{s}/ask/import.json").read_text()).get("labels") == labels]
print(done[-1] if done else "")' "$HUMAN_LABELS" "$RUN" "$t")
    fi
    if [[ -z $HUMAN_LABELS || $labels_used == 1 || -n $earlier ]]; then
      local n; n=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['asked'])" "$ask/ask.json")
      if [[ -n $earlier ]]; then
        echo "ser: HUMAN_LABELS=$HUMAN_LABELS holds the labels loop $earlier imported already" >&2
      fi
      echo "ser: loop $t awaits labels: $n pairs in $ask/label_studio.json (a Label Studio project with" \
        "the config $ask/label_studio.xml) or $ask/pairs.jsonl (fill its choice column). Then run the same" \
        "command with HUMAN_LABELS=<the export or the filled pairs.jsonl>." >&2
      exit 5
    fi
    $PY data/import_labels.py --asked "$ask" --labels "$HUMAN_LABELS" "${IMPORT_EXTRA[@]}"
    labels_used=1
    $PY -m ser.run_config --run "$RUN" --note "human_labels.loop_$t=$HUMAN_LABELS"
  fi
  if [[ -s $ask/human.jsonl ]]; then human+=("$ask/human.jsonl"); fi
}

# What each loop decides (its status, its training mix, where RM_t starts) is ser/loop.py's; this script runs
# the stages and keeps their folders.
selected=(); statuses=()
for ((t = 1; t <= MAX_LOOPS; t++)); do
  prev="$RUN/loop_$((t - 1))"
  loop="$RUN/loop_$t"
  if ((t == 1)); then pool=("${first_pool[@]}")
  elif [[ -f $prev/ask/import.json ]]; then pool=(--dataset_name "$prev/ask/remaining.jsonl")  # less the human pairs
  else pool=(--dataset_name "$prev/remaining.jsonl"); fi
  history=()  # the furthest status of the earlier loops (--monotone), and the RM before RM_{t-1} (agreement)
  reached=$($PY -m ser.loop reached "${statuses[@]}")
  if [[ -n $reached ]]; then history+=(--reached_status "$reached"); fi
  if ((t >= 2)); then history+=(--previous_model "$RUN/loop_$((t - 2))/rm"); fi

  stage "loop_$t.filter" "$loop/stats.json" \
    rm_loop_filter_by_self.py "${pool[@]}" --reward_model_name "$prev/rm" \
    --rm_next_loop_save_path "$loop/selected.jsonl" --remaining_data_save_path "$loop/remaining.jsonl" \
    --max_length "$MAX_LENGTH" "${history[@]}" "${FILTER_EXTRA[@]}"

  stopped=$($PY -m ser.loop stopped "$loop/stats.json")
  if [[ $stopped == True ]]; then echo "ser: loop $t: Stop (the RM has converged)"; break; fi
  statuses+=("$loop/stats.json")

  if ((ASK_HUMANS > 0)); then ask_humans "$t"; fi

  selected+=("$loop/selected.jsonl")
  mix=$($PY -m ser.loop mix "$DATA" "$KEEP_SEED" "$UNION" human "${human[@]}" selected "${selected[@]}")
  mapfile -t sources <<< "$mix"
  init=$($PY -m ser.loop start "$prev/rm" "$SFT" "$CONTINUE")
  stage "loop_$t.train" "$loop/rm/eval_results.json" \
    rm_training.py --model_name "$init" --tokenizer_name "$SFT" --dataset_name "${sources[@]}" \
    --train_subset data/reward --eval_subset "$DATA/data/evaluation" --output_dir "$loop/rm" \
    --max_length "$MAX_LENGTH" --num_train_epochs "$LOOP_EPOCHS" "${RM_EXTRA[@]}"
done

$PY scripts/ser_report.py --run "$RUN"
