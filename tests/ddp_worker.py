"""Run by test_train.py under torchrun: a few steps of 2-process gloo training. Each rank saves its weights,
and every distributed feature extraction is checked against the same images embedded in one process. The
images are a memory-mapped bank (a memory budget of 0) that the two ranks decode half each."""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import images  # noqa: E402
import verify  # noqa: E402
import train  # noqa: E402

toy, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
train_one_epoch, extract = train.train_one_epoch, verify.extract


def state(objective):
    return {k: v.detach().clone() for k, v in objective.module.state_dict().items()}


def save_weights(run, epoch):
    if rank == 0:
        torch.save(state(run.objective), os.path.join(out, "init.pt"))
    stats = train_one_epoch(run, epoch)
    torch.save(state(run.objective), os.path.join(out, f"rank{rank}.pt"))
    return stats


def checked_extract(model, bank, indices, *args, **kwargs):
    feats = extract(model, bank, indices, *args, **kwargs)  # each rank embeds a share; gathered in order
    with torch.no_grad():
        single = model.eval()(images.preprocess(bank[np.asarray(indices)]))
    one = extract(model, bank, np.asarray(indices)[:1], *args, **kwargs)  # rank 1 has nothing to embed
    with open(os.path.join(out, f"extract_rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps({"diff": float((feats - single).abs().max()), "shape": list(feats.shape),
                            "single": list(single.shape), "one": list(one.shape)}) + "\n")
    return feats


train.train_one_epoch = save_weights
verify.extract = checked_extract
images.memory_budget = lambda: 0
train.main(train.get_args_parser().parse_args([
    "--data-root", toy, "--out", os.path.join(out, "run"), "--arch", "1", "--backbone", "resnet18",
    "--no-pretrained", "--img-size", "32", "--batch-size", "4", "--epochs", "1",
    "--lr", "1e-3",
    # a bank over its memory budget: a memory-mapped file that each rank decodes its share of
    "--cache-dir", os.path.join(out, "cache")]))
