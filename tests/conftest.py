import contextlib
import io
import os
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from toy import make_toy  # noqa: E402


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """A tiny synthetic CFP: 20 identities (2 per fold), 4 same + 4 diff pairs per fold and kind."""
    root = str(tmp_path_factory.mktemp("toy"))
    make_toy(root, num_ids=20, same_per_kind=4)
    return root


@pytest.fixture
def cfp_root():
    root = os.environ.get("CFP_ROOT")
    if not root:
        pytest.skip("CFP_ROOT is not set: the real CFP dataset is needed")
    if not os.path.isdir(root):
        pytest.fail(f"CFP_ROOT={root} is not a folder")
    return root


def smoke_args(toy, out, *extra):
    """train.py arguments for a seconds-long CPU run on the tiny toy dataset."""
    import train
    argv = ["--data-root", str(toy), "--out", str(out), "--backbone", "resnet18", "--no-pretrained",
            "--img-size", "32", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", *map(str, extra)]
    return train.get_args_parser().parse_args(argv)


def model_args(**kw):
    """A complete set of the arguments models.build_model reads: a random-init ResNet18, arch 2 (ArcFace)."""
    return {"arch": 2, "variation": False, "loss": "arcface", "backbone": "resnet18", "pretrained": False,
            "maxpool": True, "freeze": 0.0, "dropout": 0.0, **kw}


def cli(module, *argv):
    """A script's command line run in this process (no interpreter start-up), as a subprocess would report it:
    exit status, stdout, stderr."""
    import utils
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            utils.run_cli(module.main, module.get_args_parser().parse_args([str(a) for a in argv]))
        except SystemExit as e:
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
