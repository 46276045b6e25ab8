import re

import bench
from conftest import cli


def test_bench_times_every_path_and_ends_with_the_ratio(toy):
    r = cli(bench, "--data-root", toy, "--img-size", "32", "--batch-size", "4", "--steps", "2", "--warmup", "1",
            "--eval-images", "16")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    for path in ("model-only", "end-to-end", "evaluation"):
        assert any(line.startswith(path) for line in lines), path
    assert re.fullmatch(r"ratio \d+\.\d\d", lines[-1])
    r = cli(bench, "--data-root", toy, "--align", "template", "--img-size", "32", "--steps", "1")
    assert r.returncode == 2 and "no Data/Fiducials" in r.stderr
