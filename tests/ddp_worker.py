"""Run by test_train.py under torchrun: a few steps of 2-process gloo training, each rank saving its weights."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402

toy, out = sys.argv[1], sys.argv[2]
rank = int(os.environ["RANK"])
train_one_epoch = train.train_one_epoch


def state(objective):
    return {k: v.detach().clone() for k, v in objective.module.state_dict().items()}


def save_weights(objective, *args, **kwargs):
    if rank == 0:
        torch.save(state(objective), os.path.join(out, "init.pt"))
    stats = train_one_epoch(objective, *args, **kwargs)
    torch.save(state(objective), os.path.join(out, f"rank{rank}.pt"))
    return stats


train.train_one_epoch = save_weights
train.main(train.get_args_parser().parse_args([
    "--data-root", toy, "--out", os.path.join(out, "run"), "--arch", "1", "--backbone", "resnet18",
    "--no-pretrained", "--img-size", "32", "--batch-size", "4", "--epochs", "1", "--max-steps", "4",
    "--lr", "1e-3", "--device", "cpu"]))
