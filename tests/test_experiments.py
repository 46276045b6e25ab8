import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torchvision

import data
import losses
import models
import train
from conftest import ROOT

SEED_IDS = ["01", "02", "03", "04", "05", "06", "07", "08", "11", "13", "15", "17", "21", "23", "33",
            "43", "53", "63", "73"]
LOSS_CLASSES = {"bce": losses.BCEPairLoss, "ce": losses.CEPairLoss, "cosine": losses.CosinePairLoss,
                "arcface": losses.ArcFace, "cosface": losses.CosFace}


def sh(*args, env=None, cwd=ROOT):
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")  # `python` = this one
    return subprocess.run(["bash", "experiments.sh", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PATH": path, **(env or {})})


def dry_run_lines(*ids):
    r = sh("--dry-run", *ids)
    assert r.returncode == 0, r.stderr
    return [line for line in r.stdout.splitlines() if line.strip()]


def all_rows():
    """(ID, command) of every row, a `tenfold` row once per test fold."""
    with open(os.path.join(ROOT, "experiments.sh")) as f:
        found = re.findall(r"^(run|tenfold) (\S+) (python (?:train|landmarks)\.py .*)$", f.read(), re.M)
    return [(i, line.replace("{K}", f"{k:02d}").replace("{k}", str(k))) for kind, i, line in found
            for k in (range(1, 11) if kind == "tenfold" else [0])]


def train_rows():
    return [(i, line) for i, line in all_rows() if line.startswith("python train.py ")]


def test_dry_run_lists_every_seed_row():
    lines = dry_run_lines()
    assert len(lines) == len(all_rows()) >= 30
    assert all(line.startswith(("python train.py ", "python landmarks.py ")) for line in lines)
    assert set(SEED_IDS) <= {i for i, _ in all_rows()}
    outs = [shlex.split(line)[shlex.split(line).index("--out") + 1] for line in lines]
    assert len(outs) == len(set(outs)), "two rows share a run folder"


def test_selection_extra_args_and_refusals():
    assert dry_run_lines("23", "63") == [c for i, c in all_rows() if i in ("23", "63")]
    assert len(dry_run_lines("13")) == 6  # an ID with several rows runs all of them
    r = sh("--dry-run", "01", env={"EXTRA_ARGS": "--img-size 32"})
    assert r.stdout.strip().endswith("--img-size 32")
    for bad in (["99"], ["--bogus"], ["01", "7"]):
        r = sh("--dry-run", *bad)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and r.stdout == "", bad
    assert "unknown experiment ID 99" in sh("99").stderr and "10fold-r18" in sh("99").stderr
    r = sh("--help")
    assert r.returncode == 0 and "bash experiments.sh --dry-run [IDS]" in r.stdout


def test_every_line_builds_what_it_asks_for(toy):
    """Each row's network, loss and optimizer, built as train.py builds them (no training: a smoke run per line
    would check the same things at minutes of cost). Identical configurations are built once."""
    cfp = data.load_cfp(toy)
    built = {}
    for exp_id, line in train_rows():
        argv = shlex.split(line)[2:]
        args = train.get_args_parser().parse_args(argv + ["--data-root", toy])
        train.check_args(args)
        if exp_id.isdigit():  # the seed's rows: its data handling, said explicitly
            assert "--pairs-from protocol" in line and "--resize squash" in line, line
            assert args.pretrained == ("random init" not in line and exp_id not in ("02", "04", "06", "08")), line
        key = (args.arch, args.variation, args.loss, args.backbone, args.freeze, args.optimizer, args.lr)
        if key in built:
            continue
        args.pretrained = False
        folds = data.split_folds(args.protocol, args.test_fold)
        num_classes = len(cfp.identities_of(folds["train"]))
        with torch.device("meta"):  # shapes and types without the cost of drawing initial weights
            model = models.build_model(args)
            criterion = losses.build_loss(args.loss, num_classes, models.EMBED_DIM, args.margin, args.scale)
        optimizer = train.build_optimizer(args, [model, criterion])
        built[key] = line
        # the named torchvision network: same parameter count as torchvision's, less its classifier
        with torch.device("meta"):
            ref = torchvision.models.get_model(models.BACKBONES[args.backbone])
        head = ref.classifier if args.backbone.startswith("vgg") else ref.fc
        assert sum(p.numel() for p in model.backbone.parameters()) == \
            sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in head.parameters()), line
        assert model.arch == args.arch and isinstance(criterion, LOSS_CLASSES[args.loss]), line
        neck = [type(m) for m in model.neck] if isinstance(model.neck, nn.Sequential) else [type(model.neck)]
        expected_neck = {(1, False): [nn.Identity], (1, True): [nn.Linear, nn.ReLU],
                         (2, False): [nn.Linear, nn.BatchNorm1d]}[args.arch, args.variation]
        assert neck == expected_neck, line
        if args.arch == 1:  # the decision network sees both branches' features, one or two logits
            assert model.decision[-1].out_features == (2 if args.loss == "ce" else 1), line
            assert model.decision[0].in_features == 2 * (models.EMBED_DIM if args.variation else
                                                         {"vgg16": 25088}.get(args.backbone, 2048)), line
        assert isinstance(optimizer, {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[args.optimizer]), line
        assert all(g["lr"] == args.lr for g in optimizer.param_groups), line
        if args.optimizer == "sgd":
            assert optimizer.param_groups[0]["momentum"] == 0.9
        assert optimizer.param_groups[0]["weight_decay"] == args.weight_decay == 5e-4
        assert len(model.frozen) == int(args.freeze * model.num_layers), line
        trainable = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        expected = sum(p.numel() for m in (model, criterion) for p in m.parameters() if p.requires_grad)
        assert trainable == expected, line  # every trainable parameter, the loss's class centres included
        assert all(not p.requires_grad for m in model.frozen for p in m.parameters()), line
    assert len(built) >= 10


def test_sweep_skips_finished_resumes_interrupted_and_forces(toy, tmp_path):
    copy_project(tmp_path)
    # the rows' own flags, on the toy data, with a CPU-sized network (the last flag wins)
    env = {"EXTRA_ARGS": f"--data-root {toy} --no-pretrained --backbone resnet18 --img-size 32 --batch-size 16 "
                         f"--epochs 2"}
    r = sh("01", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run01 = tmp_path / "runs" / "exp01_bce_vgg16_7e"
    assert (run01 / "metrics.json").exists()
    (run01 / "metrics.json").unlink()  # as if it had been killed after its last checkpoint
    r = sh("01", "05", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--resume" in r.stdout.splitlines()[0] and "resumed" in r.stdout
    assert "[05] python train.py" in r.stdout and (run01 / "metrics.json").exists()
    r = sh("01", env=env, cwd=tmp_path)
    assert "[01] runs/exp01_bce_vgg16_7e is finished: skipped" in r.stdout
    before = (run01 / "log.txt").read_text()
    r = sh("--force", "01", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--overwrite" in r.stdout.splitlines()[0] and (run01 / "log.txt").read_text() != before
    assert "resumed" not in (run01 / "log.txt").read_text()


def copy_project(tmp_path):
    import shutil
    for f in ["experiments.sh"] + [f for f in os.listdir(ROOT) if f.endswith(".py")]:
        shutil.copy(os.path.join(ROOT, f), tmp_path / f)


def test_a_smoke_run_is_not_taken_for_the_real_one(toy, tmp_path):
    copy_project(tmp_path)
    tiny = f"--data-root {toy} --no-pretrained --backbone resnet18 --img-size 32 --batch-size 16"
    r = sh("01", env={"EXTRA_ARGS": tiny + " --epochs 1"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    run01 = tmp_path / "runs/exp01_bce_vgg16_7e"
    before = (run01 / "best.pt").read_bytes()
    r = sh("01", env={"EXTRA_ARGS": tiny + " --epochs 2"}, cwd=tmp_path)  # another line: neither skipped nor replaced
    assert r.returncode == 2 and "holds a finished run of another command line; kept" in r.stderr
    assert (run01 / "best.pt").read_bytes() == before
    r = sh("--force", "01", env={"EXTRA_ARGS": tiny + " --epochs 2"}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--epochs 2" in json.load(open(run01 / "config.json"))["command"]


def test_an_out_in_extra_args_is_the_folder_checked_and_a_finished_run_there_is_kept(toy, tmp_path):
    copy_project(tmp_path)
    tiny = f"--data-root {toy} --no-pretrained --backbone resnet18 --img-size 32 --batch-size 16 --epochs 1"
    r = sh("01", env={"EXTRA_ARGS": tiny}, cwd=tmp_path)  # a finished run of row 01 in its own folder
    assert r.returncode == 0, r.stderr[-2000:]
    mine = tmp_path / "runs/exp01_bce_vgg16_7e"
    before = {f: (mine / f).read_bytes() for f in ("best.pt", "config.json")}
    r = sh("05", env={"EXTRA_ARGS": f"{tiny} --out {mine}"}, cwd=tmp_path)  # row 05 aimed at 01's folder
    assert r.returncode == 2 and str(mine) in r.stderr and "kept" in r.stderr
    assert {f: (mine / f).read_bytes() for f in before} == before
    other = tmp_path / "runs/mine"
    for _ in range(2):  # into a new folder of its own, then found finished there
        r = sh("05", env={"EXTRA_ARGS": f"{tiny} --out {other}"}, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    assert f"[05] {other} is finished: skipped" in r.stdout


def test_sigterm_stops_the_training_it_started_after_listing_the_plan(toy, tmp_path):
    copy_project(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "EXTRA_ARGS": f"--data-root {toy} --no-pretrained --backbone resnet18 --img-size 32 --batch-size 16 "
                         f"--epochs 50"}
    p = subprocess.Popen(["bash", "experiments.sh"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    plan = []
    for line in p.stdout:  # everything it will do is listed before the first run starts
        if line.startswith("[01] python train.py"):
            break
        plan.append(line)
    assert plan[0].startswith("experiments.sh: every experiment") and len(plan) == 1 + len(all_rows())
    assert all(" run " in line for line in plan[1:])
    deadline = time.time() + 120
    while not (tmp_path / "runs/exp01_bce_vgg16_7e/log.txt").exists() and time.time() < deadline:
        time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 130
    out = subprocess.run(["pgrep", "-f", f"exp01_bce_vgg16_7e.*{toy}"], capture_output=True, text=True).stdout
    assert out.strip() == "", "train.py was left running"
    assert "interrupted" in p.stderr.read()


def test_relative_cfp_root_is_taken_from_where_the_user_stands(toy, tmp_path):
    copy_project(tmp_path)
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
           "CFP_ROOT": os.path.basename(toy),  # relative to the folder the user stands in, not to the script's
           "EXTRA_ARGS": "--no-pretrained --backbone resnet18 --img-size 32 --batch-size 16 --epochs 1"}
    r = subprocess.run(["bash", str(tmp_path / "experiments.sh"), "01"], cwd=os.path.dirname(toy), env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    config = json.load(open(tmp_path / "runs/exp01_bce_vgg16_7e/config.json"))
    assert os.path.realpath(config["args"]["data_root"]) == os.path.realpath(toy)


def test_help_lists_every_id():
    r = sh("--help")
    listed = {line.split()[0] for line in r.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert {i for i, _ in all_rows()} <= listed


def test_the_landmark_lines_parse_and_train_the_network_the_predicted_line_uses(toy, tmp_path):
    import landmarks
    trained = {}  # --out of each landmarks.py row -> its place in the file
    for n, (_, line) in enumerate(all_rows()):
        argv = shlex.split(line)
        if argv[1] == "landmarks.py":
            args = landmarks.get_args_parser().parse_args(argv[2:] + ["--data-root", toy])
            trained[args.out] = n
            args.out = str(tmp_path / "lm")  # a user's finished run there would refuse a second
            landmarks.check_args(args)
        elif "--landmark-net" in argv:  # its landmark network is trained by a row before it
            assert trained.get(argv[argv.index("--landmark-net") + 1], n) < n, line
    assert trained and any("--landmark-net" in line for _, line in all_rows())
    r = sh("--dry-run", "landmarks", env={"LANDMARK_ARGS": "--epochs 1", "EXTRA_ARGS": "--epochs 2"})
    assert r.stdout.strip().endswith("--amp --epochs 1")  # each script gets its own extra flags


def test_list_gives_every_id_its_cost():
    r = sh("--list")
    lines = r.stdout.splitlines()
    ids = [(n, line.split()[0]) for n, line in enumerate(lines) if line.startswith("  ") and not
           line.strip().startswith("cost:")]
    assert {i for _, i in ids} >= {i for i, _ in all_rows()}
    assert all(lines[n + 1].strip().startswith("cost: ") for n, _ in ids)
    assert "estimate" in lines[ids[0][0] + 1] and "results/" in next(lines[n + 1] for n, i in ids if i == "aligned")


def test_an_edit_to_the_script_while_it_runs_runs_nothing_again(toy, tmp_path):
    """bash reads a script as it runs it: the sweep's last line ends it, so that lines written into the file
    meanwhile (a user editing experiments.sh during a long sweep) are never read at a shifted offset."""
    copy_project(tmp_path)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    fake = bin_dir / "python"  # train.py: the file gains a line at its top, as an editor saves it in place
    fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = train.py ]; then
    echo run >> {calls}
    if [ ! -e {calls}.edited ]; then
        touch {calls}.edited
        {{ printf '# %0300d\\n' 0; cat {tmp_path}/experiments.sh; }} > {tmp_path}/edited.sh
        cat {tmp_path}/edited.sh > {tmp_path}/experiments.sh
    fi
    exit 0
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CFP_ROOT": toy}
    r = subprocess.run(["bash", str(tmp_path / "experiments.sh"), "01"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert calls.read_text().split() == ["run"], r.stdout[-2000:] + r.stderr[-2000:]
    assert r.returncode == 0 and "command not found" not in r.stderr, r.stderr[-2000:]
