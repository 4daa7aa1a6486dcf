#!/usr/bin/env bash
# The whole loop on a GPU node (issue #14): the 7B policy in the Hugging Face layout, trained with GRPO on
# real LIBERO with the simulators on the node's cores, checkpointed, resumed and evaluated; then the
# LIBERO env-step cost of the node and the pipelined rollout with the 7B. Run from the repository root.
#
#   E2E_OUT=/tmp/e2e WHEELHOUSE=/tmp/wheelhouse OSMESA_LIBS=/tmp/osmesa/lib bash benchmarks/e2e_gpu_node.sh
#
# WHEELHOUSE: scripts/wheelhouse.sh's folder (installed into /tmp/site unless vlajax's imports already
# work); OSMESA_LIBS: a folder with libOSMesa and its libraries for the CPU-rendering rows (optional);
# VLAJAX_LIBERO_ASSETS: LIBERO's assets. STEPS selects parts: install,ckpt,train,resume,node,rollout
# (default), and modes (sync vs async rollout, MODE_STEPS steps each; MODE_EXTRA more overrides, e.g.
# actor_rollout_ref.rollout.decode_devices=1 on a two-GPU node).
# FAMILY=pi0 runs the same loop with the full-size π0 (issue #26: `preset:pi0`, random weights built on
# the device, Flow-SDE, 5 of 50 actions per chunk; the ckpt and rollout parts are OFT's and are skipped),
# and its eval part evaluates the resumed run's latest checkpoint with `vlajax eval`.
# Everything is logged under E2E_OUT; a failing part does not stop the later ones.
set -u
OUT=${E2E_OUT:-/tmp/e2e}
FAMILY=${FAMILY:-oft}
if [ "$FAMILY" = pi0 ]; then STEPS=${STEPS:-install,train,resume,eval}; else STEPS=${STEPS:-install,ckpt,train,resume,node,rollout}; fi
CKPT=${CKPT:-/tmp/oft7b}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
TIMEV=$(command -v /usr/bin/time >/dev/null && echo "/usr/bin/time -v")  # peak RSS of the run, when installed
log() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$OUT/progress.log"; }
has() { [[ ",$STEPS," == *",$1,"* ]]; }

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if has install; then
  log "install"
  if [ -n "${WHEELHOUSE:-}" ]; then
    ls "$WHEELHOUSE"/*.whl | grep -v -e '/vlajax-' -e '/imageio_ffmpeg-' > "$OUT/wheels.txt"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $(cat "$OUT/wheels.txt") \
      > "$OUT/install.log" 2>&1 || log "pip install failed (install.log)"
    if ! ldconfig -p | grep -q 'libEGL.so.1'; then
      for f in "$WHEELHOUSE"/debs/*.deb; do dpkg -x "$f" /; done
      ldconfig
    fi
  fi
fi
export PYTHONPATH="$PYTHONPATH:/tmp/site"
NV_EGL=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
[ -f "$NV_EGL" ] && export __EGL_VENDOR_LIBRARY_FILENAMES=$NV_EGL
export MUJOCO_GL=egl
# Compiled programs shared by the processes below (the resumed run compiles nothing new).
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
# Leave GPU memory to the simulators' EGL contexts (the LoRA run needs ~40 GB).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.80}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$OUT/gpu.txt" 2>&1
# Which EGL device is CUDA device 0 (what a simulator worker given a GPU by Ray renders on)?
$PY -c "from vlajax.envs import gl; print(gl.setup('egl', ['0'], what='e2e check'))" \
  >> "$OUT/gpu.txt" 2>&1

if has ckpt; then
  log "random 7B checkpoint -> $CKPT"
  [ -f "$CKPT/config.json" ] || $PY benchmarks/make_random_checkpoint.py "$CKPT" > "$OUT/ckpt.log" 2>&1 \
    || log "checkpoint failed (ckpt.log)"
fi

# The recipe, shrunk to 2 states x 8 rollouts per step (one rollout round: 2 stages x 8 envs = 16 LIBERO
# processes in one Ray simulator actor), LoRA rank 32; a random policy never succeeds, so dynamic
# sampling is off.
SIZES=(data.train_batch_size=2 data.filter_accuracy=false env.train.num_envs=8 env.rollout.pipeline_stage_num=2
     "env.train.max_episode_steps=${MAX_STEPS:-256}" trainer.n_env_gpus_per_node=0 trainer.n_rollout_gpus_per_node=1
     actor_rollout_ref.actor.ppo_mini_batch_size=16 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
     trainer.save_freq=2 trainer.test_freq=-1 trainer.val_before_train=false data.val_num_trials_per_task=1
     env.train.video_cfg.save_video=false trainer.default_local_dir=runs/e2e "trainer.logger=[console,jsonl]")
LORA=(actor_rollout_ref.model.param_dtype=bfloat16 actor_rollout_ref.model.lora_rank=32 actor_rollout_ref.model.lora_alpha=32)
# π0: the same sizes and LoRA (r32 on both experts, bf16 frozen weights), from the preset's random weights.
if [ "$FAMILY" = pi0 ]; then MODEL=(pi0_libero_grpo actor_rollout_ref.model.path=preset:pi0)
else MODEL=(libero_grpo "actor_rollout_ref.model.path=$CKPT"); fi
RUN=("${MODEL[@]}" "${LORA[@]}" "${SIZES[@]}" ${EXTRA:-})
if has train; then
  log "vlajax train (2 steps)"
  $TIMEV $PY -m vlajax.cli train "${RUN[@]}" trainer.total_training_steps=2 > "$OUT/train.log" 2>&1 \
    || log "train failed (train.log)"
fi
if has resume; then
  log "vlajax train, resumed (step 3)"
  $TIMEV $PY -m vlajax.cli train "${RUN[@]}" trainer.total_training_steps=3 > "$OUT/resume.log" 2>&1 \
    || log "resume failed (resume.log)"
  cp runs/e2e/metrics.jsonl runs/e2e/eval/final.md "$OUT/" 2>/dev/null
fi
if has eval; then
  log "vlajax eval of the resumed run's latest checkpoint (1 state per task)"
  $TIMEV $PY -m vlajax.cli eval runs/e2e --trials 1 --out runs/e2e/eval_cli > "$OUT/eval.log" 2>&1 \
    || log "eval failed (eval.log)"
  cp runs/e2e/eval_cli/*.md "$OUT/" 2>/dev/null
fi
if has modes; then  # issue #24: steady-state s/step, sync vs async (not in the default STEPS)
  for mode in sync async; do
    log "vlajax train, rollout.mode=$mode (${MODE_STEPS:-8} steps)"
    rm -rf "runs/e2e_$mode"
    $TIMEV $PY -m vlajax.cli train "${RUN[@]}" actor_rollout_ref.rollout.mode=$mode trainer.save_freq=-1 \
      "trainer.total_training_steps=${MODE_STEPS:-8}" "trainer.default_local_dir=runs/e2e_$mode" \
      ${MODE_EXTRA:-} > "$OUT/mode_$mode.log" 2>&1 || log "$mode run failed (mode_$mode.log)"
    cp "runs/e2e_$mode/metrics.jsonl" "$OUT/metrics_$mode.jsonl" 2>/dev/null
  done
  $PY - "$OUT" <<'PYEOF' > "$OUT/modes.md" 2>&1
import json, statistics, sys
out = sys.argv[1]
print("| mode | steps | median s/step (steps 4+) | median update s | median rollout wait s | compiles after step 1 |")
print("|---|---:|---:|---:|---:|---:|")
for mode in ("sync", "async"):
    try:
        recs = [json.loads(x) for x in open(f"{out}/metrics_{mode}.jsonl") if '"train/' in x]
    except OSError:
        continue
    late = recs[3:] or recs
    med = lambda k: statistics.median(r.get(k, 0.0) for r in late)
    print(f"| {mode} | {len(recs)} | {med('timing/step_s'):.1f} | {med('timing/update_s'):.1f} | "
          f"{med('timing/rollout_wait_s'):.1f} | {sum(r.get('perf/compiles', 0) for r in recs[1:]):.0f} |")
PYEOF
fi
if has node; then
  log "LIBERO env-step cost on the node"
  $PY benchmarks/bench_libero_node.py --workers 1,14 --backends egl --json "$OUT/node_egl.json" \
    > "$OUT/node.log" 2>&1 || log "node bench (egl) failed"
  if [ -n "${OSMESA_LIBS:-}" ]; then
    LD_LIBRARY_PATH="$OSMESA_LIBS" $PY benchmarks/bench_libero_node.py --workers 1,14 --backends osmesa \
      --json "$OUT/node_osmesa.json" >> "$OUT/node.log" 2>&1 || log "node bench (osmesa) failed"
  fi
fi
if has rollout; then
  log "pipelined rollout with the 7B: 1 and 2 stages, serial"
  $PY benchmarks/bench_rollout.py --env libero --suite libero_10 --policy "$CKPT" --image-size 256 \
    --stages "${ROLLOUT_STAGES:-2,1}" --envs "${ROLLOUT_ENVS:-8,16}" --max-steps "${ROLLOUT_STEPS:-128}" --rounds 1 --mujoco-gl egl \
    --json "$OUT/rollout.json" > "$OUT/rollout.log" 2>&1 || log "rollout bench failed"
fi
$PY benchmarks/e2e_report.py runs/e2e ${OUT:+--decode-times "$OUT/rollout.json"} > "$OUT/report.md" 2>&1 \
  || $PY benchmarks/e2e_report.py runs/e2e > "$OUT/report.md" 2>&1
log "done"
