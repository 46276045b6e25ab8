#!/usr/bin/env bash
# Every numbered experiment of the seed project (Person Verification on CFP), one train.py line per row
# of its tables, with the accuracies the seed reported (val / test) above each line; then this project's
# own lines (aligned faces from random init, the official 10 folds, photos without landmark files).
#
#   bash experiments.sh                    run everything, in order (first it lists what it will run and skip)
#   bash experiments.sh 23 63              run only these IDs
#   bash experiments.sh --list             every ID with a one-line description
#   bash experiments.sh --dry-run [IDS]    print the commands
#   bash experiments.sh --force [IDS]      rerun finished runs (replacing them)
#   EXTRA_ARGS="--data-root toy --no-pretrained --img-size 32 --epochs 1" bash experiments.sh 01
#                                          append flags to every train.py line (the last flag wins)
#   LANDMARK_ARGS="--epochs 1" bash experiments.sh landmarks     the same for the landmarks.py lines
#
# A run folder is finished when its metrics.json exists and its config.json holds this very command line
# (EXTRA_ARGS included): a smoke run never stands in for the real one. An interrupted run of the same command
# resumes from its last.pt; a folder that holds anything else is replaced. Ctrl-C or SIGTERM stops the
# train.py it started, which saves and says how to continue.
# The seed trained at a constant learning rate on the protocol's fixed pairs, whole images stretched to the
# square: hence --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none on its rows.
# An ID with several rows (13 has six) runs all of them; to run one row, copy its line from --dry-run.
# Data: --data-root defaults to $CFP_ROOT (else ./cfp-dataset); or EXTRA_ARGS="--data-root DIR".
# Results: python evaluate.py --summarize runs/
set -euo pipefail
[ -z "${CFP_ROOT:-}" ] || export CFP_ROOT="$(realpath -m "$CFP_ROOT")"  # relative to where the user stands
cd "$(dirname "$0")"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; echo; list_ids; }
# What an ID costs on a 2-core x86 CPU with AVX-512-BF16 or AMX (bf16): measured where results/ holds the run
cost() {  # the training minutes of the runs in results/ (epochs only, not the final test), or an estimate
    case $1 in
        aligned) echo "22 min (one thread, another run beside it): results/cfp-seed/r18_arcface_64px_template_s8" ;;
        clutter) echo "12 min (one thread, another run beside it): results/cfp-seed/*_clutter05" ;;
        10fold-aligned) echo "12 to 25 min a fold (two threads alone, or one beside another run): results/cfp-10fold" ;;
        recipe) echo "36 to 54 min (one thread, another run beside it): results/cfp-seed/r18_arcface_96px_template_s8_nomaxpool*" ;;
        10fold-recipe) echo "38 min a fold (two threads, alone; about 110 with two folds side by side): results/cfp-10fold/*_nomaxpool_fold*" ;;
        recipe30) echo "90 min (one thread, another run beside it): results/cfp-seed/r18_arcface_96px_template_s8_nomaxpool_30e*" ;;
        10fold-recipe30) echo "57 min a fold on an AVX-512-BF16 CPU, 27 on an AMX one (two threads, alone): results/cfp-10fold/*_30e_fold*" ;;
        10fold-r18) echo "about 10 min a fold (one thread): results/cfp-10fold/r18_arcface_64px_fold*" ;;
        scratch-r18) echo "10 min (one thread): results/cfp-seed/r18_arcface_64px_squash_dropout06" ;;
        landmarks) echo "12.5 min of training and 6 of testing (two threads, alone): results/landmarks/bf16val_default" ;;
        predicted) echo "6.4 min of epochs after 4.5 min of placing landmarks (two threads, alone): results/cfp-seed/*_bf16val" ;;
        *) echo "an estimate, not measured here: a day or more on 2 CPU cores (224 px, ImageNet trunks); for a GPU" ;;
    esac
}
list_ids() {  # each ID once, with the comment line above its first row and what it costs
    echo "IDs, under the heading of their section:"
    awk '/^# ---- /{t=$0; gsub(/^# ---- | ----$/, "", t)} /^# /{c=substr($0, 3); sub(/^[^ ]+:? /, "", c)}
         /^(run|tenfold) /{rows[$2] += ($1 == "tenfold" ? 10 : 1)
             if (!($2 in first)) {order[++n] = $2; first[$2] = c; head[$2] = t}}
         END {for (i = 1; i <= n; i++) {id = order[i]; if (head[id] != shown) {print head[id]; shown = head[id]}
             more = (rows[id] > 1) ? " (" rows[id] " runs)" : ""; printf "  %-14s %s%s\n", id, first[id], more}}' "$0" |
    while IFS= read -r line; do
        echo "$line"
        if [[ $line == "  "* ]]; then read -r id _ <<< "$line"; echo "                 cost: $(cost "$id")"; fi
    done
}
VALID_IDS=$(sed -n 's/^\(run\|tenfold\) \([^ ]*\) python .*/\2/p' "$0" | awk '!seen[$0]++' | tr '\n' ' ')
DRY_RUN=0 FORCE=0 IDS=()
for a in "$@"; do
    case $a in
        --dry-run) DRY_RUN=1 ;;
        --force) FORCE=1 ;;
        --list) list_ids; exit 0 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "experiments.sh: unknown option $a (options: --dry-run --force --list --help)" >&2; exit 2 ;;
        *) if [[ " $VALID_IDS " != *" $a "* ]]; then
               echo "experiments.sh: unknown experiment ID $a (IDs: ${VALID_IDS% })" >&2; exit 2
           fi
           IDS+=("$a") ;;
    esac
done

state() {  # OUT CMD...: finished | resume | new | taken | other -- what OUT holds for exactly this command line
    python - "$@" <<'EOF'
import json, os, shlex, sys
out, argv = sys.argv[1], [a for a in sys.argv[3:] if a not in ("--resume", "--overwrite")]
try:
    with open(os.path.join(out, "config.json")) as f:
        recorded = [a for a in shlex.split(json.load(f)["command"])[1:] if a not in ("--resume", "--overwrite")]
except (OSError, ValueError, KeyError, TypeError):
    recorded = None
if not os.path.exists(out) or not os.listdir(out):
    print("new")
elif recorded != argv:
    print("taken" if os.path.isfile(os.path.join(out, "metrics.json")) else "other")
elif os.path.isfile(os.path.join(out, "metrics.json")):
    print("finished")
else:
    print("resume" if os.path.isfile(os.path.join(out, "last.pt")) else "other")
EOF
}

CHILD=""
stop() {  # Ctrl-C / SIGTERM: stop the training this script started (it saves and explains), then leave
    trap - INT TERM
    # SIGTERM: a job started with & in a script ignores SIGINT; train.py handles both alike
    if [ -n "$CHILD" ]; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
    exit 130
}
trap stop INT TERM

PLAN=0
run() {  # run ID python train.py|landmarks.py ... --out DIR ...
    local id=$1 out="" prev=""
    shift
    [ ${#IDS[@]} -eq 0 ] || [[ " ${IDS[*]} " == *" $id "* ]] || return 0
    local cmd=("$@")
    # shellcheck disable=SC2206
    if [ "$2" = landmarks.py ]; then cmd+=(${LANDMARK_ARGS:-}); else cmd+=(${EXTRA_ARGS:-}); fi
    for a in "${cmd[@]}"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done  # the last --out, as the script takes it
    if [ $DRY_RUN = 1 ]; then echo "${cmd[*]}"; return 0; fi
    local st
    st=$(state "$out" "${cmd[@]}")
    [ $FORCE = 0 ] || [ "$st" = new ] || st=other
    if [ $PLAN = 1 ]; then
        case $st in finished) echo "  [$id] skip (finished)  $out" ;; resume) echo "  [$id] resume  $out" ;;
                    new) echo "  [$id] run     $out" ;; other) echo "  [$id] replace $out" ;;
                    taken) echo "  [$id] STOP: another finished run in $out" ;; esac
        return 0
    fi
    if [ "$st" = taken ]; then
        echo "experiments.sh: [$id] $out holds a finished run of another command line; kept (--force $id replaces it)" >&2
        exit 2
    fi
    if [ "$st" = finished ]; then echo "[$id] $out is finished: skipped"; return 0; fi
    if [ "$st" = resume ]; then cmd+=(--resume); elif [ "$st" = other ]; then cmd+=(--overwrite); fi
    echo "[$id] ${cmd[*]}"
    "${cmd[@]}" &
    CHILD=$!
    wait "$CHILD" || { local rc=$?; CHILD=""; return $rc; }
    CHILD=""
}

tenfold() {  # tenfold ID python train.py ... : the row once per test fold, {K} its two digits and {k} its number
    local id=$1 k
    shift
    for k in 1 2 3 4 5 6 7 8 9 10; do
        local K row=()
        K=$(printf %02d "$k")
        for a in "$@"; do a=${a//\{K\}/$K}; row+=("${a//\{k\}/$k}"); done
        run "$id" "${row[@]}"
    done
}

experiments() {
# ---- Architecture 1: decision network, BCE (one logit), VGG16, Adam 1e-4, 7 epochs ----
# 01 pretrained, no augmentation. Seed: val 0.711, test 0.735
run 01 python train.py --out runs/exp01_bce_vgg16_7e --arch 1 --loss bce --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 02 random init, no augmentation. Seed: 0.506 (one figure reported)
run 02 python train.py --out runs/exp02_bce_vgg16_random_7e --arch 1 --loss bce --backbone vgg16 --no-pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 03 pretrained, augmentation. Seed: 0.709 (one figure reported)
run 03 python train.py --out runs/exp03_bce_vgg16_aug_7e --arch 1 --loss bce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 04 random init, augmentation. Seed: 0.501 (one figure reported)
run 04 python train.py --out runs/exp04_bce_vgg16_random_aug_7e --arch 1 --loss bce --backbone vgg16 --no-pretrained --augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- Architecture 1 variation: one FC layer in the branches, BCE, VGG16, Adam 1e-4, 7 epochs ----
# 05 pretrained, no augmentation. Seed: val 0.714, test 0.718
run 05 python train.py --out runs/exp05_bce_var_vgg16_7e --arch 1 --variation --loss bce --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 06 random init, no augmentation. Seed: val 0.504, test 0.505
run 06 python train.py --out runs/exp06_bce_var_vgg16_random_7e --arch 1 --variation --loss bce --backbone vgg16 --no-pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 07 pretrained, augmentation. Seed: val 0.713, test 0.727
run 07 python train.py --out runs/exp07_bce_var_vgg16_aug_7e --arch 1 --variation --loss bce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 08 random init, augmentation. Seed: val 0.501, test 0.503
run 08 python train.py --out runs/exp08_bce_var_vgg16_random_aug_7e --arch 1 --variation --loss bce --backbone vgg16 --no-pretrained --augment --optimizer adam --lr 1e-4 --epochs 7 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- Architecture 1 with two logits and cross-entropy, VGG16 pretrained, Adam 1e-4 ----
# 11 no augmentation, 20 epochs. Seed: val 0.793, test 0.782
run 11 python train.py --out runs/exp11_ce_vgg16_20e --arch 1 --loss ce --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 20 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 13 augmentation, 14 epochs. Seed: val 0.803, test 0.819
run 13 python train.py --out runs/exp13_ce_vgg16_aug_14e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 15 variation, no augmentation, 20 epochs. Seed: val 0.772, test 0.765
run 15 python train.py --out runs/exp15_ce_var_vgg16_20e --arch 1 --variation --loss ce --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 20 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 17 variation, augmentation, 14 epochs. Seed: val 0.710, test 0.727
run 17 python train.py --out runs/exp17_ce_var_vgg16_aug_14e --arch 1 --variation --loss ce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- Learning-rate study of 13 (20 epochs); Adam did not converge at 5e-4 and 1e-3, so SGD there ----
# 13 Adam 1e-4, 20 epochs. Seed: val 0.718, test 0.730
run 13 python train.py --out runs/exp13_ce_vgg16_aug_lr1e-4_adam_20e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 20 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 13 SGD 5e-4, 20 epochs. Seed: val 0.825, test 0.824
run 13 python train.py --out runs/exp13_ce_vgg16_aug_lr5e-4_sgd_20e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer sgd --lr 5e-4 --epochs 20 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 13 SGD 1e-3, 20 epochs. Seed: val 0.826, test 0.834
run 13 python train.py --out runs/exp13_ce_vgg16_aug_lr1e-3_sgd_20e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer sgd --lr 1e-3 --epochs 20 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 13 Adam 1e-4, 40 epochs. Seed: val 0.827, test 0.832
run 13 python train.py --out runs/exp13_ce_vgg16_aug_lr1e-4_adam_40e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- Architecture 2: embedding + CosineEmbeddingLoss (margin 0.5), VGG16 pretrained, Adam, 14 epochs ----
# 21 no augmentation, 1e-4. Seed: val 0.807, test 0.826
run 21 python train.py --out runs/exp21_cos_vgg16_lr1e-4_14e --arch 2 --loss cosine --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 21 no augmentation, 5e-4. Seed: val 0.708, test 0.714
run 21 python train.py --out runs/exp21_cos_vgg16_lr5e-4_14e --arch 2 --loss cosine --backbone vgg16 --pretrained --no-augment --optimizer adam --lr 5e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 23 augmentation, 1e-4. Seed: val 0.821, test 0.818
run 23 python train.py --out runs/exp23_cos_vgg16_aug_lr1e-4_14e --arch 2 --loss cosine --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 23 augmentation, 5e-4. Seed: val 0.709, test 0.720
run 23 python train.py --out runs/exp23_cos_vgg16_aug_lr5e-4_14e --arch 2 --loss cosine --backbone vgg16 --pretrained --augment --optimizer adam --lr 5e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 23 augmentation, 1e-4, 40 epochs. Seed: not finished (no figures)
run 23 python train.py --out runs/exp23_cos_vgg16_aug_lr1e-4_40e --arch 2 --loss cosine --backbone vgg16 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- 33: 23 with the lower half of VGG16 frozen ----
# 33 freeze 0.5, 1e-4, 14 epochs. Seed: val 0.746, test 0.749
run 33 python train.py --out runs/exp33_cos_vgg16_aug_freeze0.5_14e --arch 2 --loss cosine --backbone vgg16 --pretrained --augment --freeze 0.5 --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- Backbones: architecture 2, cosine, augmentation, Adam 1e-4, 14 epochs ----
# 43 ResNet50. Seed: val 0.822, test 0.825
run 43 python train.py --out runs/exp43_cos_resnet50_aug_14e --arch 2 --loss cosine --backbone resnet50 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 53 ResNet101. Seed: val 0.823, test 0.831
run 53 python train.py --out runs/exp53_cos_resnet101_aug_14e --arch 2 --loss cosine --backbone resnet101 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 63 ResNeXt50. Seed: val 0.826, test 0.834
run 63 python train.py --out runs/exp63_cos_resnext50_aug_14e --arch 2 --loss cosine --backbone resnext50 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 73 ResNeXt101. Seed: not finished (no figures)
run 73 python train.py --out runs/exp73_cos_resnext101_aug_14e --arch 2 --loss cosine --backbone resnext101 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 14 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- The seed's final round: 40 epochs ----
# 13 SGD 1e-3, 40 epochs. Seed: not reported separately
run 13 python train.py --out runs/exp13_ce_vgg16_aug_lr1e-3_sgd_40e --arch 1 --loss ce --backbone vgg16 --pretrained --augment --optimizer sgd --lr 1e-3 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 23 SGD 1e-3, 40 epochs. Seed: not reported separately
run 23 python train.py --out runs/exp23_cos_vgg16_aug_lr1e-3_sgd_40e --arch 2 --loss cosine --backbone vgg16 --pretrained --augment --optimizer sgd --lr 1e-3 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 63 Adam 1e-4, 40 epochs. Seed: not reported separately
run 63 python train.py --out runs/exp63_cos_resnext50_aug_lr1e-4_adam_40e --arch 2 --loss cosine --backbone resnext50 --pretrained --augment --optimizer adam --lr 1e-4 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# 63 SGD 1e-3, 40 epochs: the seed's best. Seed: val 0.845, test 0.859
run 63 python train.py --out runs/exp63_cos_resnext50_aug_lr1e-3_sgd_40e --arch 2 --loss cosine --backbone resnext50 --pretrained --augment --optimizer sgd --lr 1e-3 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none

# ---- CFP's own protocol: 10 folds (test fold K, validation fold K+1, train on the other 8), FF and FP apart ----
# 10fold-63: the seed's best configuration (63, SGD 1e-3, 40 epochs). Seed: not run on this protocol
tenfold 10fold-63 python train.py --out runs/10fold/exp63_cos_resnext50_aug_lr1e-3_sgd_40e_fold{K} --protocol 10fold --test-fold {k} --arch 2 --loss cosine --backbone resnext50 --pretrained --augment --optimizer sgd --lr 1e-3 --epochs 40 --schedule none --warmup-epochs 0 --pairs-from protocol --resize squash --align none
# The runs in results/cfp-10fold/r18_arcface_64px_*: ResNet18 from random init, ArcFace (s 32, m 0.3), 64 px
# whole images padded, bf16 autocast, 10 epochs, no dropout: about 10 minutes a fold on one core of a 2-core x86.
# 10fold-r18: whole images, ResNet18 from random init, ArcFace s 32, 10 epochs (the first 10-fold recipe)
tenfold 10fold-r18 python train.py --out runs/10fold/r18_arcface_64px_fold{K} --protocol 10fold --test-fold {k} --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 10 --dropout 0 --amp --align none

# ---- Learning from CFP alone (README: "On real CFP"), seed split ----
# results/cfp-seed/r18_arcface_64px_squash_dropout06 (val 0.813, test 0.810, FF 0.847, FP 0.789): ResNet18 from
# random init, ArcFace, 64 px stretched, dropout 0.6, bf16 autocast, 20 epochs: about 10 minutes on one core of a
# 2-core x86 CPU with AVX-512-BF16.
# scratch-r18: whole images stretched, ResNet18 from random init, ArcFace s 32, dropout 0.6 (the recipe before alignment)
run scratch-r18 python train.py --out runs/scratch/r18_arcface_64px_squash_dropout06 --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --resize squash --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp --align none

# ---- Faces aligned by CFP's landmarks, learned from CFP alone ----
# ResNet18 from random init, faces aligned onto the landmark template (align.py), ArcFace s 8 (the best validation
# of s 32, 16, 8: results/cfp-seed/r18_arcface_64px_template*), m 0.3, dropout 0.6, 64 px, bf16 autocast, 20
# epochs: about 10 minutes on one core of a 2-core x86 CPU with AMX.
# aligned: the seed split, faces aligned by their landmarks, ResNet18 from random init, ArcFace s 8
run aligned python train.py --out runs/aligned/r18_arcface_64px_template_s8 --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp
# The same recipe (seed 1) with --clutter 0.5, for faces found in larger pictures: in half the training faces, what
# the aligned square shows outside the photo is a mosaic of other faces or, since e7b8719, a drawn picture
# of gradients, noise or shapes (results/cfp-seed/*_s8_clutter05: the mosaic alone)
# clutter: the aligned recipe, half the training faces surrounded by a mosaic where their photo ends
run clutter python train.py --out runs/aligned/r18_arcface_64px_template_s8_clutter05 --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp --seed 1 --clutter 0.5
# 10fold-aligned: CFP's ten folds with the same recipe (results/cfp-10fold/r18_arcface_64px_template_s8_fold*)
tenfold 10fold-aligned python train.py --out runs/10fold/r18_arcface_64px_template_s8_fold{K} --protocol 10fold --test-fold {k} --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp

# The recipe: the aligned recipe at 96 px with the stem's max-pool left out (feature maps twice as fine), chosen on
# validation over two seeds (results/cfp-seed/about.md: val 0.855 against 0.846)
# recipe: faces aligned by their landmarks, ResNet18 from random init at 96 px without the stem's max-pool, ArcFace s 8
run recipe python train.py --out runs/aligned/r18_arcface_96px_template_s8_nomaxpool --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 96 --no-maxpool --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp
# 10fold-recipe: CFP's ten folds with that recipe (results/cfp-10fold/r18_arcface_96px_template_s8_nomaxpool_fold*)
tenfold 10fold-recipe python train.py --out runs/10fold/r18_arcface_96px_template_s8_nomaxpool_fold{K} --protocol 10fold --test-fold {k} --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 96 --no-maxpool --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp

# The recipe since: the same with 30 epochs instead of 20, chosen on validation over two seeds
# (results/cfp-seed/about.md: val 0.868 against 0.855)
# recipe30: the recipe with 30 epochs
run recipe30 python train.py --out runs/aligned/r18_arcface_96px_template_s8_nomaxpool_30e --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 96 --no-maxpool --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 30 --amp
# 10fold-recipe30: CFP's ten folds with it (results/cfp-10fold/r18_arcface_96px_template_s8_nomaxpool_30e_fold*)
tenfold 10fold-recipe30 python train.py --out runs/10fold/r18_arcface_96px_template_s8_nomaxpool_30e_fold{K} --protocol 10fold --test-fold {k} --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 96 --no-maxpool --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 30 --amp

# ---- Photos without landmark files (README: "Your own photos") ----
# The landmark network, learned from the seed split's training identities on five background families
# (results/landmarks/bf16val_default: on the held-out text and texture pictures, found at 1/2 0.980 / 0.988,
# at 1/4 0.972 / 0.980, false faces 4.8% / 0.0%).
# A landmarks.py run has no --resume: an interrupted one starts again.
# landmarks: the landmark network (pose and CFP's 30 landmarks, a heatmap each), ResNet18 from random init
run landmarks python landmarks.py --out runs/landmarks/default --amp
# The clutter recipe trained on that network's landmarks, for photos that come without them
# (results/cfp-seed/*_clutter05_predicted_bf16val: FF / FP 0.863 / 0.790 on crops, pasted at 1/2 0.854 /
# 0.777 on mosaics, 0.871 / 0.785 on held-out text, 0.869 / 0.786 on held-out textures)
# predicted: the clutter recipe, its training faces aligned by the landmark network's landmarks
run predicted python train.py --out runs/aligned/r18_arcface_64px_template_s8_clutter05_predicted --arch 2 --loss arcface --backbone resnet18 --no-pretrained --augment --img-size 64 --align template --scale 8 --dropout 0.6 --batch-size 64 --optimizer adam --lr 1e-3 --epochs 20 --amp --seed 1 --clutter 0.5 --landmark-net runs/landmarks/default --predict-landmarks
}

if [ ${#IDS[@]} -eq 0 ] && [ $DRY_RUN = 0 ]; then
    echo "experiments.sh: every experiment, in this order:"
    PLAN=1 experiments
    PLAN=0
fi
experiments; exit  # ends here: bash reads a script as it runs, and the file may be edited meanwhile
