"""The results page and run tables: every figure read from the run folders' own files.

    python evaluate.py --summarize runs/                        a table of every run; 10-fold runs grouped
    python evaluate.py --summarize results --out results/README.md   the results page, regenerated

This is the only module that knows how results/README.md is laid out.
"""
import csv
import glob
import json
import os
import re

import numpy as np

from data import KINDS, dataset_label
from metrics import roc, tar_at_far
from utils import UserError, atomic_write, write_json


def read_scores(path):
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return (np.array([float(r["score"]) for r in rows]), np.array([int(r["same"]) for r in rows]),
            np.array([r["kind"] for r in rows]))


def _fmt(x, digits=3):
    return "" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{digits}f}"


SUMMARY_COLUMNS = ["run", "data", "protocol", "arch", "loss", "backbone", "px", "view", "s", "dropout", "lr",
                   "optimizer", "epochs", "steps", "pretrained", "val acc", "test acc", "FF acc", "FP acc", "FF AUC",
                   "FP AUC", "best epoch"]


def find_runs(root):
    """Every folder under root with a config.json or metrics.json; symbolic links are not followed (no loops)."""
    return sorted(d for d, _, files in os.walk(root) if {"config.json", "metrics.json"} & set(files))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def view_of(a):
    """How the run put faces into its square: aligned (template/box, margin) or the whole image (resize mode)."""
    align = a.get("align") or "none"
    return a.get("resize", "squash") if align == "none" else f"{align} {a.get('align_margin', 1.25):g}"


def run_row(run, root):
    """One table row for a run folder -> (row, args, metrics or None)."""
    name = os.path.relpath(run, root) if os.path.relpath(run, root) != "." else os.path.basename(run)
    config = read_json(os.path.join(run, "config.json"))
    a = config["args"]
    layout = (config.get("data") or {}).get("layout", "cfp")
    protocol = a["protocol"] + (f" {a['test_fold']}" if a.get("test_fold") else "")
    row = [name, (config.get("dataset") or dataset_label(a["data_root"])) + (" folders" if layout != "cfp" else ""),
           protocol if layout == "cfp" or a.get("eval_root") else "held-out",
           f"{a['arch']}{' var' if a.get('variation') else ''}", a["loss"], a["backbone"], str(a["img_size"]),
           view_of(a), _fmt((config.get("built") or {}).get("scale") or a.get("scale"), 0),
           _fmt(a.get("dropout") or 0.0, 1) if a["loss"] in ("arcface", "cosface") else "",
           f"{a['lr']:g}", a["optimizer"], str(a["epochs"])]
    pretrained = "yes" if a["pretrained"] else "no"
    if not os.path.isfile(os.path.join(run, "metrics.json")):
        done = 0
        if os.path.isfile(os.path.join(run, "history.csv")):
            with open(os.path.join(run, "history.csv")) as f:
                done = max(0, sum(1 for _ in f) - 1)
        return row + ["", pretrained, f"running or stopped: epoch {done}/{a['epochs']}"] + [""] * 6, a, None
    m = read_json(os.path.join(run, "metrics.json"))
    t = m["test"]
    kind = lambda k, key: t.get(k, {}).get(key, float("nan"))  # held-out identity-folder pairs have no FF, FP
    cells = [float(x) for x in (m["val_acc"], m["test_acc"], kind("FF", "acc"), kind("FP", "acc"), kind("FF", "auc"),
                                kind("FP", "auc"))]
    return row + [str(m.get("steps", "")), pretrained, *map(_fmt, cells), str(m["best_epoch"])], a, m


def configuration_key(run, root):
    """10-fold runs of one configuration: the same parent folder and the same name up to _foldK."""
    parent = os.path.relpath(os.path.dirname(run), root)
    base = re.sub(r"_?fold\d+$", "", os.path.basename(run)) or os.path.basename(run)
    return base if parent == "." else os.path.join(parent, base)


def summarize(root):
    """Markdown table, one row per run under root (10-fold runs of one configuration also grouped)
    -> (text, raw 10-fold values)."""
    runs = find_runs(root)
    if not runs:
        raise UserError(f"--summarize: no run folders (with config.json) under {root}")
    rows, folds, warnings = [], {}, []
    for run in runs:
        try:
            row, a, m = run_row(run, root)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError, RecursionError) as e:
            rows.append([os.path.relpath(run, root), f"unreadable: {type(e).__name__}: {str(e)[:80]}"]
                        + [""] * (len(SUMMARY_COLUMNS) - 2))
            continue
        rows.append(row)
        if m is not None and a["protocol"] == "10fold":
            key = configuration_key(run, root)
            if a["test_fold"] in folds.get(key, {}):
                warnings.append(f"warning: {key}: two runs test fold {a['test_fold']} "
                                f"({folds[key][a['test_fold']][1]}, {run}); the first is used")
                continue
            folds.setdefault(key, {})[a["test_fold"]] = (m, run)
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    raw = [tenfold_values(key, by_fold) for key, by_fold in sorted(folds.items())]
    if raw:
        lines += ["", "10-fold protocol: test fold accuracy, each kind at its own validation-fold threshold; mean +- "
                  "sample standard deviation (ddof 1) over folds; TAR@FAR pooled over the folds' test scores (the "
                  "folds' models are not calibrated to each other)", "",
                  "| configuration | folds | FF acc | FP acc | FF AUC | FP AUC | FF EER | FP EER | FF TAR@FAR=1% "
                  "| FP TAR@FAR=1% | made by |", "|" + "---|" * 11]
        lines += [tenfold_row(r) for r in raw]
        for r in raw:
            lines += ["", f"{r['configuration']}, folds {r['folds']}:"]
            lines += [f"  {k}: " + " ".join(f"{v:.4f}" for v in r[k]) for k in r if k.endswith(("acc", "auc", "eer"))]
        for old, new in zip(raw, raw[1:]):
            lines += paired(old, new)
    return "\n".join(warnings + lines) + "\n", raw


def paired(old, new):
    """Two 10-fold configurations fold by fold, on the folds both have: test FF and FP accuracy of each, the
    difference (new - old), its mean and standard error (sample sd / sqrt(folds))."""
    common = sorted(set(old["folds"]) & set(new["folds"]))
    if len(common) < 2:
        return []
    at = {r["configuration"]: {k: dict(zip(r["folds"], r[f"{k} acc"])) for k in KINDS} for r in (old, new)}
    a, b = at[old["configuration"]], at[new["configuration"]]
    lines = ["", f"Paired, fold by fold: {new['configuration']} (new) against {old['configuration']} (old)", "",
             "| fold | FF old | FF new | FF new - old | FP old | FP new | FP new - old |", "|" + "---|" * 7]
    diffs = {k: [b[k][f] - a[k][f] for f in common] for k in KINDS}
    for i, f in enumerate(common):
        lines.append(f"| {f} | " + " | ".join(f"{a[k][f]:.4f} | {b[k][f]:.4f} | {diffs[k][i]:+.4f}" for k in KINDS)
                     + " |")
    se = {k: float(np.std(diffs[k], ddof=1) / np.sqrt(len(common))) for k in KINDS}
    lines.append(f"| mean ({len(common)} folds) | " + " | ".join(
        f"{np.mean([a[k][f] for f in common]):.4f} | {np.mean([b[k][f] for f in common]):.4f} | "
        f"{np.mean(diffs[k]):+.4f} +- {se[k]:.4f}" for k in KINDS) + " |")
    return lines


def tenfold_values(key, by_fold):
    """The per-fold metrics of one 10-fold configuration, and TAR@FAR over its pooled test scores."""
    ks = sorted(by_fold)
    vals = {f"{kind} {m}": [float(by_fold[k][0]["test"][kind][m]) for k in ks]
            for kind in KINDS for m in ("acc", "auc", "eer")}
    pooled = {}
    files = [os.path.join(by_fold[k][1], "test_scores.csv") for k in ks]
    if all(os.path.isfile(f) for f in files):
        s, y, kinds = (np.concatenate(x) for x in zip(*map(read_scores, files)))
        for kind in KINDS:
            sel = kinds == kind
            fpr, tpr, _ = roc(s[sel], y[sel])
            pooled[kind] = tar_at_far(fpr, tpr, int((y[sel] == 0).sum()))
    made = [read_json(os.path.join(by_fold[k][1], "config.json")) for k in ks]
    return {"configuration": key, "folds": ks, **vals, **{f"{kind} pooled": pooled.get(kind, {}) for kind in KINDS},
            "commits": sorted({str(c.get("git")) for c in made}),
            "precisions": sorted({(c.get("built") or {}).get("precision", "?") for c in made})}


def made_by(r):
    """One commit without uncommitted changes and one precision, or what the folds mix: a row is one recipe's
    only when its folds all ran the same code the same way."""
    commits, precisions = r["commits"], r["precisions"]
    code = commits[0][:7] if len(commits) == 1 and not commits[0].endswith("-dirty") and commits[0] != "None" else \
        f"MIXED: {len(commits)} commits" + (", uncommitted changes" if any(c.endswith("-dirty") for c in commits)
                                            else "")
    return f"{code}; {' and '.join(precisions)}" + (" MIXED" if len(precisions) > 1 else "")


def tenfold_row(r):
    spread = lambda v: f" +- {np.std(v, ddof=1):.4f}" if len(v) > 1 else ""  # noqa: E731  (one fold: no spread)
    cells = [r["configuration"], str(len(r["folds"]))]
    cells += [f"{np.mean(r[f'{kind} acc']):.4f}{spread(r[f'{kind} acc'])}" for kind in KINDS]
    cells += [f"{np.mean(r[f'{kind} {m}']):.4f}" for m in ("auc", "eer") for kind in KINDS]
    cells += [_fmt(r[f"{kind} pooled"].get("tar@far=0.01"), 4) for kind in KINDS] + [made_by(r)]
    return "| " + " | ".join(cells) + " |"


def results_page(root):
    """A Markdown page of a results folder: ROOT/about.md, then for each subfolder with runs its about.md and
    the table of its runs (summarize). Every figure comes from the runs' files -> (text, raw 10-fold values)."""
    def about(folder):
        path = os.path.join(folder, "about.md")
        return open(path).read().strip() + "\n\n" if os.path.isfile(path) else ""
    text, raw = about(root), []
    for sub in sorted(d.name for d in os.scandir(root) if d.is_dir(follow_symlinks=False)):
        if not find_runs(os.path.join(root, sub)):
            continue
        if is_landmark_folder(os.path.join(root, sub)):
            text += f"## {sub}\n\n{about(os.path.join(root, sub))}{landmark_tables(os.path.join(root, sub))}"
            text += f"{held_out_table(os.path.join(root, sub))}\n"
            continue
        table, values = summarize(os.path.join(root, sub))
        text += f"## {sub}\n\n{about(os.path.join(root, sub))}{table}\n"
        raw += values
    return text.rstrip() + "\n", raw


def is_landmark_folder(folder):
    def task(run):
        try:
            c = read_json(os.path.join(run, "config.json"))
            made_by = str(c.get("command", ""))
            return c.get("task") or ("landmarks" if made_by.startswith("python landmarks.py") else None)
        except (OSError, ValueError, AttributeError):
            return None
    return all(task(run) == "landmarks" for run in find_runs(folder))


def landmark_tables(folder):
    """The landmark networks of a folder (landmarks.py runs), and the verification runs evaluated with their
    landmarks (the evaluate.py --json files beside them, verify_*.json)."""
    lines = ["| network | protocol | head | profile share | px | epochs | minutes | test NME frontal | NME profile | "
             "pose acc | found, pasted at 1/2 | at 1/4 | a face where none is | ms a photo |", "|" + "---|" * 14]
    checks = []
    for run in find_runs(folder):
        try:
            c, m = read_json(os.path.join(run, "config.json")), read_json(os.path.join(run, "metrics.json"))
            a, t = c["args"], m["test"]
            # since --refine-jitter, no head or profile share is named: the heatmap head, 0.5 (PROFILE_SHARE)
            later = "refine_jitter" in a
            head = a.get("head") or ("heatmap" if later else "flatten")
            share = a["profile_share"] if "profile_share" in a else (0.5 if later else None)
            alone = m.get("background_alone", {}).get("found")
            lines.append(f"| {os.path.relpath(run, folder)} | {a['protocol']} | {head} | "
                         f"{'each photo once' if share is None else share} | {a['img_size']} | {a['epochs']} | "
                         f"{m['train_minutes']:.1f} | {t['nme_frontal']:.4f} | {t['nme_profile']:.4f} | "
                         f"{t['pose_acc']:.4f} | {m['pasted_0.5']['found']:.4f} | {m['pasted_0.25']['found']:.4f} | "
                         f"{'' if alone is None else f'{alone:.4f}'} | {t['ms_per_photo']:.1f} |")
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines.append(f"| {os.path.relpath(run, folder)} | unreadable: {type(e).__name__}: {str(e)[:80]} |")
        checks += [(os.path.relpath(run, folder), p) for p in
                   sorted(glob.glob(os.path.join(glob.escape(run), "verify_*.json")))]
    if checks:
        lines += ["", "| verification run, evaluated with | landmarks | found | test acc | FF acc | FP acc |",
                  "|" + "---|" * 6]
    for net, path in checks:
        try:
            e = read_json(path)
            lm, t = e["landmarks"], e["test"]
            how = lm["source"] + (f" by {net}" if lm["source"] == "predicted" else "") + \
                (f", pasted at 1/{1 / lm['paste']:g}" if lm.get("paste") else "")
            found = _fmt(lm.get("found_at_its_place"), 4)
            lines.append(f"| {os.path.basename(e['checkpoint'].rstrip('/'))} ({os.path.basename(path)}) | {how} | "
                         f"{found} | {t['all']['acc']:.4f} | {t['FF']['acc']:.4f} | {t['FP']['acc']:.4f} |")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            lines.append(f"| {os.path.basename(path)} | unreadable: {type(e).__name__} |")
    return "\n".join(lines) + "\n"


def held_out_table(folder):
    """The landmark networks tested on background families they never trained on (backgrounds.py): found at
    its place at 1/2 and 1/4 (frontal / profile), and the share of pictures without a face where one is found."""
    lines = ["| network | trained on | found threshold | held-out family | found at 1/2 (frontal / profile) | "
             "at 1/4 (frontal / profile) | false faces |", "|" + "---|" * 7]
    for run in find_runs(folder):
        try:
            m = read_json(os.path.join(run, "metrics.json"))
            trained = " ".join(m["families"]["train"]) if "held_out" in m else ""
            for family, r in m.get("held_out", {}).items():
                p2, p4 = r["pasted_0.5"], r["pasted_0.25"]
                lines.append(f"| {os.path.relpath(run, folder)} | {trained} | {_fmt(m.get('found_threshold'), 4)} | "
                             f"{family} | {p2['found']:.4f} ({_fmt(p2['found_frontal'], 3)} / "
                             f"{_fmt(p2['found_profile'], 3)}) | {p4['found']:.4f} ({_fmt(p4['found_frontal'], 3)} / "
                             f"{_fmt(p4['found_profile'], 3)}) | {r['background_alone']['found']:.4f} |")
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines.append(f"| {os.path.relpath(run, folder)} | unreadable: {type(e).__name__}: {str(e)[:80]} |")
    return "\n" + "\n".join(lines) + "\n" if len(lines) > 2 else ""


def summarize_runs(folder, out="", json_path=""):
    """--summarize: the table of every run under a folder (a page of sections when the folder has about.md)."""
    page = os.path.isfile(os.path.join(folder, "about.md")) and not any(  # a page of folders of runs
        os.path.isfile(os.path.join(d.path, "config.json")) for d in os.scandir(folder) if d.is_dir())
    table, raw = results_page(folder) if page else summarize(folder)
    print(table, end="")
    if out:
        atomic_write(out, table)
    if json_path:
        write_json(json_path, raw)
