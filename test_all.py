"""Every stage's built-in checks, collected by pytest: `python -m pytest -v test_all.py`.

Each stage file owns its checks in `run_tests()` (real models and data where behaviour matters);
this file only calls them, plus the command-line contract: good runs write their logs, bad input
ends with one line and exit code 2.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

import bench
import stage2_stream
import stage3_backbone
import stage4_pool
import stage5_train
import stage6_baselines
import stage7_metrics
import stage8_run
import stage9_ablate
import stage10_vision
import stage11_codegen


def test_stage2_stream():
    stage2_stream.run_tests()


def test_stage3_backbone():
    stage3_backbone.run_tests()


def test_stage4_pool():
    stage4_pool.run_tests()


def test_stage5_train():
    stage5_train.run_tests()


def test_bench():
    """The benchmark's alternation, and its table on a tiny model (with and without native bf16)
    where peft is installed."""
    bench.run_tests()


def test_stage6_baselines():
    stage6_baselines.run_tests()


def test_stage7_metrics():
    stage7_metrics.run_tests()


def test_stage8_run_and_resume():
    """A tiny run of all four methods, and the resume check (kill after a checkpoint, resume, compare)."""
    stage8_run.run_tests()


def test_stage9_ablate():
    stage9_ablate.run_tests()


def test_stage10_vision():
    """random:tiny-vit and generated images; the real-image check runs when fashion-mnist is installed."""
    stage10_vision.run_tests()


def test_stage11_codegen():
    """random:tiny-qwen2 on HumanEval: label masking, cached generation, the sandbox against hostile
    programs, PEFT export."""
    stage11_codegen.run_tests()


def test_sandbox_installed_in_ci():
    """The hostile-program checks of stage 11 need bubblewrap; in CI they must not be skipped."""
    if os.environ.get("CI"):
        assert shutil.which("bwrap"), "bubblewrap is missing: the README's test command installs it"


def test_concurrent_first_fetch(tmp_path):
    """Three processes fetch the same package at once into an empty cache: all succeed, and nothing
    half-done is left (each downloads into a folder of its own and renames it into place)."""
    code = "import common; print(common.fetch_package('vaderSentiment'))"
    env = {**os.environ, "FLH_CACHE": str(tmp_path)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    target = tmp_path / "vaderSentiment"
    assert {out.strip() for out, _ in outs} == {str(target)}
    assert (target / "vaderSentiment-3.3.2" / "additional_resources" / "hutto_ICWSM_2014.tar.gz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["vaderSentiment"]


def cli(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def test_stage5_cli_writes_log(tmp_path):
    r = cli(
        "stage5_train.py",
        "--backbone",
        "random:tiny-bert",
        "--steps",
        "30",
        "--flip-interval",
        "10",
        "--birth-interval",
        "5",
        "--batch-size",
        "4",
        "--out",
        str(tmp_path),
        "--run-name",
        "smoke",
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(30))
    assert [row["regime"] for row in rows] == [s // 10 for s in range(30)]
    assert rows[-1]["num_prompts"] == 6 and abs(sum(rows[-1]["weights"]) - 1) < 1e-4
    assert {"loss", "acc", "acc_mixture", "entropy"} <= set(rows[0])
    assert json.loads((tmp_path / "smoke" / "config.json").read_text())["steps"] == 30


def test_same_seed_same_log(tmp_path):
    logs = []
    for name in ("a", "b"):
        r = cli(
            "stage5_train.py",
            "--backbone",
            "random:tiny-bert",
            "--steps",
            "12",
            "--birth-interval",
            "4",
            "--batch-size",
            "4",
            "--out",
            str(tmp_path),
            "--run-name",
            name,
        )
        assert r.returncode == 0, r.stderr
        logs.append((tmp_path / name / "log.jsonl").read_text())
    assert logs[0] == logs[1]


@pytest.mark.parametrize(
    "args",
    [
        ["--flip-interval", "0"],
        ["--backbone", "nosuchmodel"],
        ["--dataset", "nosuch"],
        ["--alpha", "-1"],
        ["--lr", "abc"],
        ["--backbone", "random:nosuch"],
        ["--method", "nosuch"],
    ],
)
@pytest.mark.parametrize("script", ["stage5_train.py", "stage8_run.py"])
def test_bad_input_is_one_clear_line(script, args, tmp_path):
    r = cli(script, *args, "--steps", "1", "--out", str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[flh] fetching")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "script,args",
    [
        ("stage9_ablate.py", ["--grid", "nosuch"]),
        ("stage9_ablate.py", ["--shard", "3/2"]),
        ("stage9_ablate.py", ["--shard", "x"]),
        ("stage9_ablate.py", ["--shard", "0/2"]),
        ("stage9_ablate.py", ["--seeds", "0"]),
        ("stage10_vision.py", ["--dataset", "nosuch"]),
        ("stage10_vision.py", ["--backbone", "random:nosuch", "--dataset", "synthetic"]),
        ("stage10_vision.py", ["--rotate-interval", "0"]),
        ("stage10_vision.py", ["--image-size", "-3"]),
    ],
)
def test_bad_input_stages_9_10(script, args, tmp_path):
    r = cli(script, *args, "--steps", "1", "--out", str(tmp_path))
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[flh] ")]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["nosuch"],
        ["train", "--epochs", "0"],
        ["train", "--model", "random:nosuch"],
        ["train", "--lr", "abc"],
        ["generate", "--limit", "-1"],
        ["generate", "--run-name", "nosuch"],
        ["evaluate", "--run-name", "nosuch"],
        ["evaluate", "--timeout", "0"],
        ["evaluate", "--timeout", "1e308"],
        ["evaluate", "--memory-mb", "0"],
    ],
)
def test_bad_input_stage11(args, tmp_path):
    r = cli(
        "stage11_codegen.py",
        *args,
        *(["--out", str(tmp_path)] if args[:1] in (["train"], ["generate"], ["evaluate"]) else []),
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr
