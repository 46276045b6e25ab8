#!/usr/bin/env bash
# The golden comparison: the same toy commands at two commits, on this machine with one thread, and the sha1 of
# what each wrote (test_scores.csv, metrics.json and evaluation JSON with times and paths taken out, history.csv
# without its seconds, --pairs output, --benchmark and --export lines).
#
#   bash tests/golden.sh OLD_COMMIT NEW_COMMIT [WORK_DIR]     a table: output, old sha1, new sha1, same?
#   bash tests/golden.sh --record OUT_DIR                      the commands at the checkout this script is in
#
# Exit status 1 when an output differs. About 4 minutes per commit on one core.
set -euo pipefail
export OMP_NUM_THREADS=1 PYTHONHASHSEED=0

if [ "${1:-}" != "--record" ]; then
    old=$1 new=$2 work=${3:-/tmp/golden}
    here="$(cd "$(dirname "$0")/.." && pwd)"
    rm -rf "$work" && mkdir -p "$work"
    for side in old new; do
        commit=${!side}
        git -C "$here" worktree add --detach --force "$work/$side/src" "$commit" >/dev/null 2>&1
        # this script's own commands, run by each commit's code
        (cd "$work/$side/src" && bash "$here/tests/golden.sh" --record "$work/$side/out" > "$work/$side/log" 2>&1) \
            || { echo "$side ($commit) failed: see $work/$side/log"; tail -5 "$work/$side/log"; exit 2; }
        git -C "$here" worktree remove --force "$work/$side/src"
    done
    printf "| output | %s | %s | |\n|---|---|---|---|\n" "$old" "$new"
    status=0
    while read -r sha name; do
        other=$(grep "  $name\$" "$work/new/out/sha1" | cut -d' ' -f1 || true)
        same=$([ "$sha" = "$other" ] && echo same || echo DIFFERENT)
        [ "$same" = same ] || status=1
        echo "| $name | ${sha:0:12} | ${other:0:12} | $same |"
    done < "$work/old/out/sha1"
    exit $status
fi

out=$(realpath -m "$2")
rm -rf "$out" && mkdir -p "$out/runs"
cd "$out"
src=$OLDPWD
py() { python "$src/$1" "${@:2}"; }

# the toy in CFP's layout, the same with hand-made landmark files, and toy identity folders
maker() { if grep -q "^def main" "$src/toy.py"; then py toy.py "$@"; else py data.py --make-toy "$@"; fi; }
maker toy > /dev/null
cp -r toy toy_lm
python - <<'EOF'
import os, sys
import numpy as np
from PIL import Image
def face(facing):
    jaw = [(20 + 3 * i, 40 + 7 * i) for i in range(9)]
    rest = [(40, 30), (48, 28), (56, 30), (42, 42), (46, 40), (50, 40), (54, 42), (50, 44), (46, 44), (66, 40),
            (68, 50), (70, 60), (72, 68), (68, 72), (64, 72), (62, 70), (56, 86), (62, 84), (68, 84), (68, 88), (62, 90)]
    p = np.array(jaw + rest, dtype=np.float64)
    if facing == "frontal":
        p[:, 0] -= 10
        p[18:25, 0] = p[8, 0] - 0.5
    if facing == "left":
        p[:, 0] = 120 - p[:, 0]
    return p
for kind in ("frontal", "profile"):
    with open(f"toy_lm/Protocol/Pair_list_{kind[0].upper()}.txt") as f:
        paths = [line.split()[1] for line in f]
    for i, rel in enumerate(paths):
        img = os.path.normpath(os.path.join("toy_lm/Protocol", rel))
        w, h = Image.open(img).size
        facing = "frontal" if kind == "frontal" else ("left" if i % 2 else "right")
        txt = img.replace("Data/Images", "Data/Fiducials")[:-4] + ".txt"
        os.makedirs(os.path.dirname(txt), exist_ok=True)
        with open(txt, "w") as f:
            f.writelines(f"{x:.3f},{y:.3f}\n" for x, y in face(facing) * (min(w, h) / 120))
EOF
if grep -q "^def main" "$src/toy.py"; then py toy.py --folders folders --identities 40 --per-identity 6 > /dev/null
else py data.py --make-toy-folders folders --identities 40 --per-identity 6 > /dev/null; fi

small="--backbone resnet18 --no-pretrained --img-size 32 --batch-size 16 --epochs 2 --lr 1e-3 --workers 1"
train() { local name=$1; shift; py train.py $small --out runs/$name "$@" > runs/$name.out 2>&1; }
train a1_ce --data-root toy --arch 1 --loss ce
train a1v_bce --data-root toy --arch 1 --variation --loss bce
train a2_cosine --data-root toy --arch 2 --loss cosine
train arcface --data-root toy --loss arcface
train cosface --data-root toy --loss cosface
train aligned --data-root toy_lm --loss arcface --align template --clutter 0.5 --amp
train folders --data-root folders --loss arcface --align none
train folders_eval_root --data-root folders --loss arcface --align none --eval-root toy
train resumed --data-root toy --loss arcface --epochs 1
train resumed --data-root toy --loss arcface --epochs 3 --resume
py landmarks.py --data-root toy_lm --out runs/landmarks --img-size 32 --epochs 1 --batch-size 16 --val-images 8 \
    --workers 1 > runs/landmarks.out 2>&1
train predicted --data-root toy_lm --loss arcface --landmark-net runs/landmarks --predict-landmarks

# evaluations of the runs
for r in a1_ce a2_cosine aligned folders folders_eval_root; do
    py evaluate.py runs/$r --json runs/$r/eval.json > runs/$r/eval.out 2>&1
done
py evaluate.py runs/aligned --tta flip --json runs/aligned/eval_tta.json > /dev/null 2>&1
for r in a2_cosine aligned; do
    ls toy_lm/Data/Images/00{1,2,3}/*/0{1,2}.jpg | paste - - > runs/$r.pairs.txt
    py evaluate.py runs/$r --pairs runs/$r.pairs.txt > runs/$r/pairs.csv 2> runs/$r/pairs.err || true
done
py evaluate.py runs/predicted --landmark-net runs/landmarks --pair toy/Data/Images/001/frontal/01.jpg \
    toy/Data/Images/001/profile/02.jpg > runs/predicted/pair.out 2>&1 || true
py evaluate.py runs/folders --benchmark cfp --data-root toy --json runs/folders/benchmark.json > /dev/null 2>&1
py evaluate.py runs/arcface --export runs/arcface/embedder.pt2 2>&1 | sed 's/max difference.*//' > runs/arcface/export.out

# what is compared: times and this machine's paths taken out
python - "$out" <<'EOF'
import csv, glob, hashlib, io, json, os, re, sys
out = sys.argv[1]
TIMES = re.compile(r"minutes|seconds|ms_per_photo|^checkpoint$|^network$|^data_root$")
def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items() if not TIMES.search(k)}
    if isinstance(x, list):
        return [clean(v) for v in x]
    return x.replace(out, "OUT") if isinstance(x, str) else x
def text(path):
    if path.endswith(".json"):
        return json.dumps(clean(json.load(open(path))), sort_keys=True)
    if path.endswith("history.csv"):
        rows = list(csv.DictReader(open(path)))
        return "\n".join(",".join(f"{k}={v}" for k, v in r.items() if k not in ("seconds", "minutes")) for r in rows)
    return open(path).read().replace(out, "OUT")
names = sorted(glob.glob("runs/**/*", recursive=True))
keep = re.compile(r"^(metrics\.json|test_scores\.csv|history\.csv|eval.*\.json|benchmark\.json|pairs\.(csv|err)|"
                  r"pair\.out|export\.out)$")
with open(os.path.join(out, "sha1"), "w") as f:
    for name in names:
        if keep.search(os.path.basename(name)):
            f.write(f"{hashlib.sha1(text(name).encode()).hexdigest()}  {name}\n")
EOF
cat sha1
