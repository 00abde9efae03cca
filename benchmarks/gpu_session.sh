#!/usr/bin/env bash
# Every pending GPU measurement, by stage, each under its own time cap, logs and JSON under $OUT.
# The device tool gives 30 minutes a session and 10 minutes a command, so a session runs a few stages a call:
#
#   bash benchmarks/gpu_session.sh train                      # one H200, ~4.5 min
#   bash benchmarks/gpu_session.sh decode                     # one H200, <= 7.5 min (batch 1 and 64, long generation)
#   bash benchmarks/gpu_session.sh tests tests-gpu            # one H200, <= 9 min (tests-gpu packs 1M tokens)
#   bash benchmarks/gpu_session.sh tests-ops                  # one H200, ~5.5 min
#   bash benchmarks/gpu_session.sh ops host                   # one H200, ~4 min
#   bash benchmarks/gpu_session.sh mqar-step state-pass      # one H200, ~8 min
#   bash benchmarks/gpu_session.sh tune-launch train-ours     # one H200, ~8 min
#   bash benchmarks/gpu_session.sh tests train-graph          # one H200, ~4 min
#   bash benchmarks/gpu_session.sh train-profile              # one H200, ~5 min
#   bash benchmarks/gpu_session.sh tests tune-rows            # one H200, ~5 min
#   bash benchmarks/gpu_session.sh tune-gemm                  # one H200, ~1 min
#   bash benchmarks/gpu_session.sh tune-decode                # one H200, ~4 min
#   bash benchmarks/gpu_session.sh tune-factors               # one H200, ~2.5 min
#   bash benchmarks/gpu_session.sh tests tune-gemv            # one H200, ~8 min
#   bash benchmarks/gpu_session.sh fla                        # one H200, carry .whl (+ .cache/triton), <= 9 min
#   bash benchmarks/gpu_session.sh segment                    # one H200, carry .whl .cache/triton, ~5.5 min
#   bash benchmarks/gpu_session.sh fla-model                  # carry .whl .cache/triton, <= 9 min (capped at 500 s)
#   AB_SRC=$PWD/.cache/ab-base/src bash benchmarks/gpu_session.sh train-ab   # carry .cache/ab-base, ~6 min
#   bash benchmarks/gpu_session.sh fla-decode                 # carry .whl .cache/triton, <= 7 min
#   bash benchmarks/gpu_session.sh mqar                       # one H200, ~7-9 min
#   bash benchmarks/gpu_session.sh mqar-long                  # one H200, ~9.5 min
#   bash benchmarks/gpu_session.sh harness mqar-gsa           # one H200, carry .whl-eval .cache/gpu-data, ~9 min
#   bash benchmarks/gpu_session.sh compare                    # one H200, ~5 min
#   bash benchmarks/gpu_session.sh trainer-1gpu               # one H200, carry .cache/gpu-data, ~5 min
#   bash benchmarks/gpu_session.sh compare-pair               # nvidia-h200-x2, carry .cache/gpu-data, 2 calls
#   bash benchmarks/gpu_session.sh mqar-sittings              # nvidia-h200-x2, ~9.5 min a call, again until done
#   GPUS="0 1" OUT=... bash benchmarks/gpu_session.sh compare-pair & GPUS="2 3" OUT=... bash ... mqar-sittings &
#                                                             # both at once on nvidia-h200-x4, each OUT its own
#   bash benchmarks/gpu_session.sh mqar-spread                # nvidia-h200-x2, ~9 min: one MQAR run per GPU
#   bash benchmarks/gpu_pair.sh "fla-decode" "decode"         # nvidia-h200-x2: stages side by side, one list a GPU
#   OUT=/tmp/o bash benchmarks/gpu_session.sh mqar-runs; tar -czf $OUT/o.tgz -C /tmp/o .   # nvidia-h200-x4, ~9 min
#                                                             # (one run per GPU in MQAR_RUNS; 9 files: one archive)
#   bash benchmarks/gpu_session.sh fsdp                       # nvidia-h200-x2, ~6 min
#   true                                                      # carry runs/t2r_smollm2/pack1 (56 MiB) first
#   bash benchmarks/gpu_session.sh t2r                        # same warm machine, carry runs/t2r_smollm2/pack2, ~9 min
#   bash benchmarks/gpu_session.sh t2r-more                   # same warm machine, ~6 min
#
# Corpora and the Mistral tokenizer travel in .cache/gpu-data (carry it: the GPU machine has no network).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
DATA="$PWD/.cache/gpu-data"
export OUT

stage() {  # stage NAME SECONDS COMMAND...: run with a cap, keep the log, never stop the session on a failure
    local name=$1 cap=$2
    shift 2
    echo "=== $name (cap ${cap}s) $(date +%T)"
    timeout --signal=INT --kill-after=20 "$cap" "$@" > "$OUT/$name.log" 2>&1
    echo "=== $name exit $? $(date +%T)"
    tail -n 25 "$OUT/$name.log"
}

keep_reports() {  # a run folder's small reports (not its weights) as one archive under $OUT: the device tool brings
    # back only a few files a call, and none from deep folders
    local dir
    for dir in "$@"; do
        (cd "$(dirname "$dir")" && find "$(basename "$dir")" -maxdepth 3 -type f \( -name '*.json' -o -name '*.jsonl' \
            -o -name '*.png' -o -name '*.md' \) -size -5M -not -path '*/checkpoints/*' -print0 |
            tar -czf "$OUT/$(basename "$dir").reports.tar.gz" --null -T -)
    done
}

PAPER_MQAR=(--profile gpu --seq-len 512 --num-pairs 64 --vocab-size 8192)  # the paper's hardest MQAR setting

mqar_run() {  # mqar_run GPU NAME CAP OUTPUT_DIR ARGS...: one GSA run of the paper's MQAR task alone in its process, in
    # the background (the caller waits)
    local gpu=$1 name=$2 cap=$3 dir=$4
    shift 4
    CUDA_VISIBLE_DEVICES=$gpu stage "$name" "$cap" python3 benchmarks/mqar_sweep.py "${PAPER_MQAR[@]}" --models gsa \
        --workers 1 --device cuda --output-dir "$dir" "$@" &
    sleep 1
}

mqar_table() {  # mqar_table NAME OUTPUT_DIR MQAR_JSON...: one table, mqar.json and plot of the runs in those files
    local name=$1 dir=$2
    shift 2
    stage "$name" 60 python3 -m gsa eval mqar "${PAPER_MQAR[@]}" --merge "$@" --output-dir "$dir"
}

fla_setup() {  # flash-linear-attention from the carried wheels; Triton's autotune results kept across calls
    python3 -c "import fla" 2>/dev/null || python3 -m pip install -q --no-deps --no-index .whl/*.whl
    export TRITON_CACHE_DIR="$PWD/.cache/triton" FLA_CACHE_RESULTS=1
    if [ ! -d "$TRITON_CACHE_DIR" ] && [ -f benchmarks/results/fla_autotune_h200.tar.gz ]; then
        # a fresh checkout: start from the autotune results kept in the repository (H200, triton 3.6) rather than
        # paying FLA's autotune again (~9-14 minutes); unpack a newer triton-autotune.tar.gz over it to update
        mkdir -p "$TRITON_CACHE_DIR" && tar -xzf benchmarks/results/fla_autotune_h200.tar.gz -C "$TRITON_CACHE_DIR" ||
            rm -rf "$TRITON_CACHE_DIR"  # a failed unpack leaves no empty folder that would stop the next try
    fi
}

keep_autotune() {  # bring FLA's (and our) autotune results back as one archive (unpack it into .cache/triton)
    (cd "$TRITON_CACHE_DIR" && find . -name '*.autotune.json' -print0 |
        tar -czf "$OUT/triton-autotune.tar.gz" --null -T -)
}

python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
    torch.cuda.get_device_name())"
for what in "$@"; do
    case "$what" in
        tests)  # layer, model and decoder tests natively on the GPU (Triton kernels compiled, GPU-only tests run)
            stage tests "${TESTS_CAP:-200}" python3 -m pytest -q -p no:cacheprovider tests/layers \
                tests/test_graph_decoder.py \
                tests/models/test_model.py ;;
        tests-ops)  # the operator's Triton tests natively but the real-shape ones: each kernel variant compiled
            # (~5 min)
            stage tests-ops 330 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton.py -k "not gpu_" ;;
        tests-gpu)  # the operator's GPU-only tests: real shapes in bf16 / fp16 / fp32, long varlen, decode in CUDA
            # graphs
            stage tests-gpu "${TESTS_CAP:-330}" python3 -m pytest -v -p no:cacheprovider tests/ops/test_triton.py \
                -k "${TESTS_K:-gpu_}" ;;
        state-pass)  # issue 3: state passes (walk / split) at every shape, then num_warps/num_stages per kernel
            stage tests-walk 200 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton.py \
                -k "chunk_kernels or steep or varlen or gpu_real or gpu_long"
            stage tune 200 python3 benchmarks/tune_ops.py --skip-tune --out "$OUT/tune_ops_h200.json" ;;
        tune-launch)  # num_warps / num_stages per kernel at paper-2k in GPU time (sets LAUNCH in
            # gsa/ops/triton/chunk.py; benchmarks/kernel_registers.py shows which configs spill, without a GPU)
            stage tune-launch 370 python3 benchmarks/tune_ops.py --passes walk64 --shapes paper-2k --graph \
                --out "$OUT/tune_launch_h200.json" ;;
        host)  # issue 3: the host's time per operator call (what eager loops pay) and kernels per call, walk vs segment
            stage host 120 python3 benchmarks/host_overhead.py --shapes paper-2k paper-8k paper-16k \
                --passes walk64 segment --out "$OUT/host_overhead_h200.json" ;;
        mqar-step)  # issue 7: an MQAR training step per model and width, alone on the GPU, eager and graphed (what the
            # sweep's runs pay for sharing a GPU: session 10's d=512 ran 15 steps/s with two runs on one GPU), and the
            # kernels of the widest GSA model's graphed steps
            stage mqar-profile 240 python3 benchmarks/profile_mqar_step.py --widths 64 128 256 512 ;;
        train-ours)  # issue 8: ours only, saved bytes and where a step's GPU time goes
            stage train-ours 150 python3 benchmarks/bench_train.py --contexts 2048 16384 --steps 4 --warmup 2 \
                --models ours --count-saved --profile --out "$OUT/train_h200_ours.json" ;;
        train-graph)  # issue 8: ours eager and as one CUDA graph per step at every context (how much of a step is the
            # host's), and where the eager step's GPU time goes, by kernel group and by the elementwise ops' shapes
            stage train-graph 330 python3 benchmarks/bench_train.py --contexts 2048 4096 8192 16384 --steps 4 \
                --warmup 2 \
                --models ours ours-graph --profile --out "$OUT/train_h200_graph.json" ;;
        train-profile)  # issue 8: where the 8K step's GPU time goes (the 1.25x target is ~20 ms a step short there,
            # ~1 ms at 2K): ours at 8K profiled by kernel group, next to 2K in the same call; and ours-kept (the GSA
            # features kept for backward instead of recomputed: ~3 ms a step fewer, ~4.8 GB more, predicted)
            stage train-profile 330 python3 benchmarks/bench_train.py --contexts 8192 2048 --steps 4 --warmup 2 \
                --models ours ours-kept --count-saved --profile --out "$OUT/train_h200_profile_8k.json" ;;
        train-ab)  # issue 8: this tree's training step against another checkout's (AB_SRC: its src folder, e.g. a
            # `git archive` of the last commit carried in .cache/ab-base), alternating processes, then this tree's
            # 8K step profiled (CONTEXTS, AB_REPS narrow it)
            for rep in $(seq "${AB_REPS:-2}"); do
                for side in base new; do
                    src="$PWD/src"
                    [ "$side" = base ] && src="${AB_SRC:?set AB_SRC to the src folder to compare with}"
                    PYTHONPATH="$src:$PWD:$PWD/benchmarks" stage "train-ab-$side-$rep" 150 python3 \
                        benchmarks/bench_train.py --models ours ours-kept --contexts ${CONTEXTS:-2048 16384} \
                        --steps 10 --warmup 3 --out "$OUT/train_ab_${side}_$rep.json"
                done
            done
            stage train-ab-profile 150 python3 benchmarks/bench_train.py --contexts 8192 --steps 4 --warmup 2 \
                --models ours-kept --profile --out "$OUT/train_h200_profile_8k_v2.json" ;;
        train-modes)  # issue 8 / 5: what `gsa train` on one GPU (44.6K tok/s) does that the benchmark (63.4K) does not:
            # float32 weights under bf16 autocast, documents packed with cu_seqlens; each profiled by kernel group
            stage train-modes 300 python3 benchmarks/bench_train.py --contexts 2048 --steps 4 --warmup 2 \
                --models ours ours-autocast ours-packed --profile --out "$OUT/train_h200_modes.json" ;;
        tune-factors)  # issue 3: the forward's gate factors kept for the backward (KEEP_GATE_FACTORS) against formed
            # again, alternating, GPU time and memory at the three paper contexts
            stage tune-factors 200 python3 benchmarks/tune_ops.py --skip-tune --graph --shapes paper-2k paper-8k \
                paper-16k --passes auto+formed auto+factors auto+formed auto+factors \
                --out "$OUT/tune_factors_h200.json" ;;
        tune-decode)  # issues 3 / 8: the decoding step's launch settings (STEP_LAUNCH in gsa/ops/triton/recurrent.py),
            # GPU time at batch 1 and 64, then the 1.3B model's decoding with the settings in the code and the best
            stage tune-decode 300 python3 benchmarks/tune_decode.py --out "$OUT/tune_decode_h200.json" ;;
        tune-gemv)  # issue 8: the few-row linear kernel's launch settings (GEMV_LAUNCH in gsa/layers/fused_gemv.py),
            # GPU time of a 1.3B layer's four product groups against the unfused path, then the model's decoding
            # unfused, fused as in the code and fused with the sweep's best
            stage tune-gemv "${GEMV_CAP:-360}" python3 benchmarks/tune_gemv.py --out "$OUT/tune_gemv_h200.json" ;;
        tune-rows)  # issue 8: the RMSNorm kernels' launch settings (NORM_LAUNCH in gsa/layers/fused_triton.py), GPU
            # time
            stage tune-rows 240 python3 benchmarks/tune_rows.py --out "$OUT/tune_rows_h200.json" ;;
        tune-gemm)  # issue 8: the step's products separate / merged / by block, the operator beside a product on a
            # second stream, the SM clock under a short and a long product (~1 min)
            stage tune-gemm 150 python3 benchmarks/tune_gemm.py --out "$OUT/tune_gemm_h200.json" ;;
        ops)
            stage ops 130 python3 benchmarks/bench_ops.py --skip-fla --profile --out "$OUT/ops_h200.json" ;;
        decode)
            stage decode 450 python3 benchmarks/bench_decode.py --prompts 2048 4096 8192 16384 --new-tokens 128 \
                --batch64 --long-tokens 1024 --models ${DECODE_MODELS:-ours llama} --out "$OUT/decode_h200.json" ;;
        train)
            stage train 260 python3 benchmarks/bench_train.py --contexts 2048 4096 8192 16384 --steps 4 --warmup 2 \
                --models ours llama ours-plain --count-saved --profile \
                --out "$OUT/train_h200.json" ;;
        activation)
            stage activation 60 python3 benchmarks/activation_memory.py ;;
        mqar)  # issue 7: 16 runs in 2 waves of 150 s (warm-up and compilation outside each run's budget)
            stage mqar 560 python3 benchmarks/mqar_sweep.py --profile gpu --models gsa attention \
                --widths 64 128 256 512 \
                --seq-len 512 --num-pairs 64 --vocab-size 8192 --lrs 3e-3 1e-2 --seeds 0 --time-budget 300 \
                --workers 8 --device cuda --output-dir "$OUT/mqar" ;;
        mqar-gsa)  # issue 7: GSA alone, one wave of 8 runs (4 widths x 2 learning rates), 240 s of training each
            stage mqar-gsa 370 python3 benchmarks/mqar_sweep.py --profile gpu --models gsa --widths 64 128 256 512 \
                --seq-len 512 --num-pairs 64 --vocab-size 8192 --lrs 1e-3 3e-3 --seeds 0 --time-budget 240 \
                --workers 8 --device cuda --output-dir "$OUT/mqar-gsa" ;;
        mqar-long)  # issue 7: GSA at the widths still on the plateau after 240 s (mixture), 3 runs side by side,
            # 480 s each
            stage mqar-long 570 python3 benchmarks/mqar_sweep.py --profile gpu --models gsa --widths 64 128 512 \
                --seq-len 512 --num-pairs 64 --vocab-size 8192 --lrs 3e-3 --seeds 0 --time-budget 480 \
                --workers 3 --device cuda --output-dir "$OUT/mqar-long" ;;
        mqar-graph)  # issue 7: GSA at the four widths with CUDA-graph steps (the default now; launch-bound before: d=64
            # ran 27 ms a step from Python), 4 runs side by side, 480 s each, up to 50K steps (Zoology's budget)
            stage mqar-graph 570 python3 benchmarks/mqar_sweep.py --profile gpu --models gsa --widths 64 128 256 512 \
                --seq-len 512 --num-pairs 64 --vocab-size 8192 --lrs 3e-3 --seeds 0 --time-budget 480 \
                --workers 4 --device cuda --output-dir "$OUT/mqar-graph" ;;
        mqar-sittings)  # issue 7 on two GPUs (GPUS, default "0 1"): GSA at d=512 alone on the first, d=256 and d=128
            # sharing the second, lr 3e-3, each width its own fixed schedule (STEPS_512 / STEPS_256 / STEPS_128; session
            # 10's 440-s runs made 6,951 / 11,460 / 19,154 steps) in sittings of SITTING whole seconds: run the stage
            # again on the warm machine (the state stays in its /tmp, ~130 MB at d=512: too big to carry) until every
            # run has finished; each call prints the merged table so far
            read -r gpu_a gpu_b <<< "${GPUS:-0 1}"
            for run in "512 $gpu_a ${STEPS_512:-20000}" "256 $gpu_b ${STEPS_256:-20000}" \
                "128 $gpu_b ${STEPS_128:-30000}"; do
                read -r width gpu steps <<< "$run"
                mqar_run "$gpu" "mqar-sittings-d$width" $(( ${SITTING:-420} + 90 )) "/tmp/mqar-sittings-d$width" \
                    --widths "$width" --lrs 3e-3 --seeds 0 --steps "$steps" --sitting-seconds "${SITTING:-420}"
            done
            wait
            mqar_table mqar-sittings-table "$OUT/mqar-sittings" /tmp/mqar-sittings-d{512,256,128}/mqar.json ;;
        mqar-runs)  # issue 7: one MQAR run per GPU (GPU FIRST_GPU + i takes the i-th of MQAR_RUNS; FIRST_GPU=1 leaves
            # GPU 0 to another stage run beside it with its own OUT), each "width:seed:lr" trained
            # for BUDGET seconds (its schedule planned to fit), or "width:seed:lr:steps" a fixed schedule in sittings
            # of BUDGET seconds (the same stage again on the warm machine continues it; d=512 needs ~20,000 steps,
            # ~640 s alone: the other entries then train anew, so give the same stage the unfinished ones only);
            # a spec may end in "@" and more sweep options, commas for spaces ("128:0:2e-3:36000@--models,fla-gsa":
            # FLA's GSA, which autotunes first, so it gets FLA_WARMUP more seconds of cap; carry .whl for it);
            # early stop at validation accuracy STOP; then one merged table, and every run's own output in one archive
            specs=() dirs=()
            read -r -a specs <<< "${MQAR_RUNS:-128:0:2e-3 128:1:2e-3 256:2:3e-3 512:1:3e-3:24000}"
            for i in "${!specs[@]}"; do
                spec=${specs[$i]%%@*} options=()
                [[ ${specs[$i]} == *@* ]] && IFS=, read -r -a options <<< "${specs[$i]#*@}"
                IFS=: read -r width seed lr steps <<< "$spec"
                if [ -n "$steps" ]; then
                    schedule=(--steps "$steps" --sitting-seconds "${BUDGET:-400}")
                else
                    schedule=(--time-budget "${BUDGET:-400}")
                fi
                cap=$(( ${BUDGET:-400} + 120 ))
                if [[ " ${options[*]} " == *fla-* ]]; then
                    fla_setup
                    cap=$(( cap + ${FLA_WARMUP:-150} ))
                fi
                label=$(IFS=_; echo "${options[*]}" | tr -c 'A-Za-z0-9.\n' '_' | sed 's/^_*//')
                name="mqar-d$width-s$seed-lr$lr${label:+-$label}"
                dirs+=("/tmp/mqar-runs/${name#mqar-}")
                mqar_run "$(( i + ${FIRST_GPU:-0} ))" "$name" "$cap" "${dirs[-1]}" --widths "$width" --lrs "$lr" \
                    --seeds "$seed" \
                    "${schedule[@]}" --stop-accuracy "${STOP:-0.995}" "${options[@]}"
            done
            wait
            mqar_table mqar-runs-table "$OUT/mqar-runs" "${dirs[@]/%//mqar.json}"
            (cd /tmp && tar -czf "$OUT/mqar-runs-parts.tar.gz" --exclude=checkpoints mqar-runs) ;;
        mqar-spread)  # issue 7 on every visible GPU through the sweep's own spreading (one worker process a GPU):
            # MQAR_MODELS (default gsa) with MQAR_SPREAD's sweep (default d=256 at lr 1e-2, seeds 0 and 1); the
            # attention baseline at every width: MQAR_MODELS=attention MQAR_SPREAD="--widths 64 128 256 512 --lrs 1e-3
            # 3e-3 --seeds 0" (8 runs on nvidia-h200-x2: BUDGET x 2 / 8 seconds each)
            gpu_count=$(python3 -c "import torch; print(torch.cuda.device_count())")
            stage mqar-spread $(( ${BUDGET:-400} + 150 )) python3 benchmarks/mqar_sweep.py "${PAPER_MQAR[@]}" \
                --models ${MQAR_MODELS:-gsa} ${MQAR_SPREAD:---widths 256 --lrs 1e-2 --seeds 0 1} \
                --time-budget "${BUDGET:-400}" \
                --stop-accuracy "${STOP:-0.995}" --workers "$gpu_count" --device cuda --output-dir "$OUT/mqar-spread"
            ;;
        harness)  # issue 7: lm-eval offline tasks end to end on a GSA model trained here (carry .whl-eval,
            # .cache/gpu-data)
            # The image has no lm-eval: its wheels and the missing dependencies travel in .whl-eval. The model trains on
            # the King James Bible only, so the Shakespeare tasks (data prebuilt in $DATA/eval) are text it never saw.
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-eval \
                .whl-eval/*.whl
            export PYTHONPATH="$PYTHONPATH:/tmp/site-eval"
            stage harness-train 150 python3 -m gsa train --recipe gsa-100m --data "$DATA/bible-kjv" \
                --tokenizer "$DATA/tokenizer.model" --steps 300 --warmup-steps 30 --eval-every 100 --save-every 300 \
                --no-progress --run-dir /tmp/harness-gsa
            stage harness 300 python3 -m gsa eval harness --model /tmp/harness-gsa/model --data-dir "$DATA/eval" \
                --tasks gsa_offline,ruler_vt --ruler-lengths 1024 --limit 200 --batch-size 16 \
                --output "$OUT/harness_h200.json"
            keep_reports /tmp/harness-gsa ;;
        compare)  # issue 5: ~100M GSA vs Transformer++ at equal tokens on the bundled corpora
            stage compare 280 python3 benchmarks/train_compare.py --budget-s 100 --data "$DATA/shakespeare" \
                "$DATA/bible-kjv" --tokenizer "$DATA/tokenizer.model" --out-dir /tmp/compare
            keep_reports /tmp/compare ;;
        compare-long)  # issue 5: one model (MODEL) of the 10-minute comparison at STEPS steps (10 minutes of GSA at the
            # trainer's measured 6.9 steps/s: ~4100), with GCIDE (carry .cache/gpu-data, 50 MB); the cap's SIGINT makes
            # the trainer checkpoint the step it is on, and the same stage again on the warm machine resumes it
            stage compare-long "${COMPARE_CAP:-560}" python3 benchmarks/train_compare.py --models "${MODEL:-gsa-100m}" \
                --steps "${STEPS:-4100}" \
                --save-every 1000 --resume --data "$DATA/shakespeare" "$DATA/bible-kjv" "$DATA/gcide" \
                --tokenizer "$DATA/tokenizer.model" --out-dir /tmp/compare-long
            stage compare-long-table 60 python3 benchmarks/train_compare.py --models gsa-100m transformer-100m \
                --steps "${STEPS:-4100}" --out-dir /tmp/compare-long --report-only
            keep_reports /tmp/compare-long ;;
        compare-pair)  # issue 5 on two GPUs (GPUS, default "0 1"): both models of compare-long at once, one per GPU
            # (STEPS ~6,500 is 10 minutes of GSA at session 10's 381K tok/s: two calls on a warm machine, the second
            # resuming; the checkpoints stay in /tmp there, so the machine must not be given back between the calls)
            read -r gpu_a gpu_b <<< "${GPUS:-0 1}"
            for gpu in "$gpu_a" "$gpu_b"; do
                model=$([ "$gpu" = "$gpu_a" ] && echo gsa-100m || echo transformer-100m)
                CUDA_VISIBLE_DEVICES=$gpu stage "compare-$model" "${COMPARE_CAP:-520}" python3 \
                    benchmarks/train_compare.py --models "$model" --steps "${STEPS:-6500}" --save-every 1000 --resume \
                    --data "$DATA/shakespeare" "$DATA/bible-kjv" "$DATA/gcide" --tokenizer "$DATA/tokenizer.model" \
                    --out-dir /tmp/compare-pair &
                sleep 2
            done
            wait
            stage compare-pair-table 60 python3 benchmarks/train_compare.py --models gsa-100m transformer-100m \
                --steps "${STEPS:-6500}" --out-dir /tmp/compare-pair --report-only
            keep_reports /tmp/compare-pair ;;
        trainer-1gpu)  # issue 5 / 8: `gsa train` on one GPU, autocast over float32 weights (--parallel none) against
            # FSDP2 on a group of one (bf16 compute over float32 masters; the default since session 10), paper-1.3b
            # recipe, 24 steps each
            for mode in none fsdp; do
                stage "trainer-1gpu-$mode" 170 python3 -m gsa train --recipe paper-1.3b --data "$DATA/shakespeare" \
                    "$DATA/bible-kjv" --tokenizer "$DATA/tokenizer.model" --steps 24 --global-batch-size 32 \
                    --log-every 2 --eval-every 1000 --save-every 1000 --sample-tokens 0 --no-progress \
                    --parallel "$mode" --run-dir "/tmp/trainer-1gpu-$mode"
            done
            stage trainer-1gpu-table 30 python3 benchmarks/train_throughput.py /tmp/trainer-1gpu-none \
                /tmp/trainer-1gpu-fsdp
            keep_reports /tmp/trainer-1gpu-none /tmp/trainer-1gpu-fsdp ;;
        fsdp)  # issue 5: the 1.3B preset with FSDP2 on two GPUs against one GPU (FSDP2 on a group of one there since
            # session 10's default; session 9's one-GPU figure was autocast over float32 weights)
            stage fsdp-2gpu 170 torchrun --standalone --nproc-per-node 2 -m gsa train --recipe paper-1.3b \
                --data "$DATA/shakespeare" "$DATA/bible-kjv" --tokenizer "$DATA/tokenizer.model" --steps 24 \
                --global-batch-size 32 --log-every 2 \
                --eval-every 1000 --save-every 1000 --sample-tokens 0 --no-progress --run-dir /tmp/fsdp-1.3b-2gpu
            stage fsdp-1gpu 150 python3 -m gsa train --recipe paper-1.3b --data "$DATA/shakespeare" \
                "$DATA/bible-kjv" --tokenizer "$DATA/tokenizer.model" --steps 24 --global-batch-size 32 --log-every 2 \
                --eval-every 1000 --save-every 1000 --sample-tokens 0 --no-progress --run-dir /tmp/fsdp-1.3b-1gpu
            stage fsdp-table 30 python3 benchmarks/train_throughput.py /tmp/fsdp-1.3b-2gpu /tmp/fsdp-1.3b-1gpu
            keep_reports /tmp/fsdp-1.3b-2gpu /tmp/fsdp-1.3b-1gpu ;;
        t2r)  # issue 6: (a) original, (b) plain conversion, (t) calibrated + attention transfer, (c) (t) finetuned
            stage t2r-abt 330 python3 benchmarks/t2r_smollm2.py --parts abt --json "$OUT/abt.json"
            stage t2r-c1 210 python3 benchmarks/t2r_smollm2.py --parts c --budget-minutes 2 --lr 1e-4 \
                --json "$OUT/c1.json" ;;
        t2r-more)  # (d) from scratch on the same tokens, and (c) at a second learning rate
            stage t2r-d 190 python3 benchmarks/t2r_smollm2.py --parts d --budget-minutes 2 --json "$OUT/d.json"
            stage t2r-c3 190 python3 benchmarks/t2r_smollm2.py --parts c --budget-minutes 2 --lr 3e-4 \
                --json "$OUT/c3.json" ;;
        fla)  # FLA side by side, same run (carry .whl, and .cache/triton when an earlier session left autotune
            # results).
            # FLA autotunes every kernel on first use (~9 minutes on a fresh machine); Triton caches the winners as
            # *.autotune.json under TRITON_CACHE_DIR, which come back under $OUT/triton-autotune: copy them to
            # .cache/triton here and carry that folder next time, and FLA starts in seconds.
            fla_setup
            # SHAPES / FLA_CAP narrow it (e.g. the shapes whose autotune results are already in .cache/triton)
            stage fla-ops "${FLA_CAP:-540}" python3 benchmarks/bench_ops.py \
                --shapes ${SHAPES:-paper-2k paper-8k paper-16k h16-d128 h32-d64} \
                --graph --fla-budget-s 420 --out "$OUT/ops_h200_fla.json"
            keep_autotune ;;
        fla-heads)  # issue 3: H32/K64 against FLA (carry .whl, .cache/triton). FLA's autotune there took > 430 s in
            # session 6 (H16/K128 done then: results/ops_h200_fla_heads.json); the cap leaves time to return the cache
            fla_setup
            stage fla-ops-heads 500 python3 benchmarks/bench_ops.py --shapes h32-d64 --graph --profile \
                --fla-budget-s 470 --out "$OUT/ops_h200_fla_h32.json"
            keep_autotune ;;
        segment)  # issue 3: segmented state walk at the long shapes, same run as FLA (carry .whl, .cache/triton)
            fla_setup
            stage fla-ops-long 150 python3 benchmarks/bench_ops.py --shapes paper-2k paper-8k paper-16k --profile \
                --graph --out "$OUT/ops_h200_fla.json"
            stage tune-segment 80 python3 benchmarks/tune_ops.py --skip-tune --passes split segment --graph \
                --shapes paper-8k paper-16k --out "$OUT/tune_segment_h200.json"
            stage tests-segment 60 python3 -m pytest -q -p no:cacheprovider tests/ops/test_triton.py \
                -k "segment_lengths or gpu_long" ;;
        fla-model)  # FLA's 1.3B model against ours and Transformer++ in the same run (issue 8's training table,
            # results/train_h200_fla.json); the JSON is written after every run, so a cap keeps what was measured
            # (carry .whl and .cache/triton; CONTEXTS, TRAIN_MODELS and FLA_TRAIN_CAP narrow it)
            fla_setup
            stage fla-train "${FLA_TRAIN_CAP:-500}" python3 benchmarks/bench_train.py \
                --models ${TRAIN_MODELS:-ours ours-kept llama} --with-fla --contexts ${CONTEXTS:-2048 4096 8192 16384} \
                --steps 4 --warmup 2 \
                --out "$OUT/train_h200_fla.json"
            keep_autotune ;;
        fla-decode)  # generate() latency of FLA's 1.3B model next to ours (carry .whl and .cache/triton)
            fla_setup
            stage fla-decode 420 python3 benchmarks/bench_decode.py --models ours fla --prompts 2048 16384 \
                --new-tokens 64 --batch64 --long-tokens 1024 --out "$OUT/decode_h200_fla.json"
            keep_autotune ;;
        *)
            echo "unknown stage $what (tests tests-ops tests-gpu host state-pass tune-launch mqar-step train-ours" \
                "train-graph train-ab train-modes tune-rows tune-gemm tune-gemv tune-decode tune-factors ops fla" \
                "fla-heads segment fla-model" \
                "fla-decode decode train" \
                "activation mqar mqar-gsa mqar-long mqar-graph mqar-sittings mqar-runs mqar-spread harness compare" \
                "compare-long compare-pair trainer-1gpu fsdp t2r t2r-more train-profile)"; exit 2 ;;
    esac
done
