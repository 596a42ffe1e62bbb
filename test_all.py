"""Every stage's built-in checks, collected by pytest: `python -m pytest -v test_all.py`.

Each stage file owns its checks, named functions test_* (real models and data where behaviour
matters; `python stageN.py --test` runs them all); this file runs each as its own test, plus the
command-line contract: good runs write their logs, bad input ends with one line and exit code 2.
"""

import contextlib
import dataclasses
import inspect
import io
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest

import assets
import bench
import common
import runs
import sandbox
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

SETTINGS = [
    stage2_stream.StreamSettings,
    stage3_backbone.ModelSettings,
    stage4_pool.PoolSettings,
    stage5_train.RunSettings,
    stage5_train.FLHSettings,
    stage6_baselines.BaselineSettings,
    stage7_metrics.MetricSettings,
    stage8_run.ExperimentSettings,
    stage9_ablate.AblationSettings,
    stage10_vision.VisionSettings,
]


def test_each_setting_declared_once():
    """A setting's default lives in its declaration alone: every flag of stages 2-10 that names a
    setting is made from it (its parser and help), no two declarations share a name unless one
    extends the other, and no constructor gives a setting a default of its own."""
    declared = {}  # name -> its declarations (a vision backbone is not a text backbone)
    for cls in SETTINGS:
        for name in cls.__annotations__:
            f = cls.__dataclass_fields__[name]
            twice = [g for g in declared.get(name, []) if g.default is not None and f.default is not None]
            assert not twice, f"{name}'s default is declared twice ({cls.__name__})"
            declared.setdefault(name, []).append(f)
    stages = [stage2_stream, stage3_backbone, stage4_pool, stage5_train, stage6_baselines, stage7_metrics]
    for stage in [*stages, stage8_run, stage9_ablate, stage10_vision]:
        for action in stage.build_parser()._actions:
            assert (
                any(
                    action.type is f.metadata["type"]
                    and action.help.startswith(re.sub(r"\s*\(default[^)]*\)$", "", f.metadata["help"]))
                    for f in declared.get(action.dest, [])
                )
                or action.dest not in declared
            ), f"{stage.__name__}: --{action.dest} is not its declaration's"
    field = {f.name: f for cls in SETTINGS for f in dataclasses.fields(cls)}
    learners = [
        stage4_pool.FLHPromptPool,
        stage5_train.FLHLearner,
        stage9_ablate.AblationLearner,
        *[
            c
            for c in vars(stage6_baselines).values()
            if inspect.isclass(c) and c.__name__.endswith("Learner")
        ],
    ]
    for cls in learners:
        for p in inspect.signature(cls).parameters.values():
            assert p.default is p.empty or p.name not in field, f"{cls.__name__}({p.name}={p.default})"


def test_imports_are_a_staircase():
    """Stage N imports only earlier stages and the helper modules beside common.py; the helpers
    import no stage (assets.py, runs.py and sandbox.py only common). No import runs back up, no circle."""
    import ast
    import glob

    helpers = {"common": set(), "assets": {"common"}, "runs": {"common"}, "sandbox": {"common"}}
    for path in sorted(glob.glob("*.py")):
        name = path[:-3]
        tree = ast.parse(open(path).read())
        imported = {
            a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        imported |= {
            n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
        }
        local = {m for m in imported if os.path.exists(f"{m}.py")}
        if name in helpers:
            assert local <= helpers[name], (name, local)
        elif name.startswith("stage"):
            level = int(re.match(r"stage(\d+)", name).group(1))
            earlier = {
                m for m in local if m.startswith("stage") and int(re.match(r"stage(\d+)", m).group(1)) < level
            }
            assert local <= earlier | set(helpers), (name, local - earlier - set(helpers))


# The stages' checks, each a named function of its stage (test_*): one pytest test per check.
NAMED = [
    stage2_stream,
    stage3_backbone,
    stage4_pool,
    stage5_train,
    stage6_baselines,
    stage7_metrics,
    stage8_run,
    stage9_ablate,
    stage10_vision,
    stage11_codegen,
    sandbox,
    runs,
]


@pytest.mark.parametrize(
    "check", [c for m in NAMED for c in common.checks(m)], ids=lambda c: f"{c.__module__}.{c.__name__}"
)
def test_check(check):
    common.run_check(check)


def test_bench():
    """The benchmark's alternation, and its table on a tiny model (with and without native bf16)
    where peft is installed."""
    bench.run_tests()


def test_sandbox_installed_in_ci():
    """The hostile-program checks of stage 11 need bubblewrap; in CI they must not be skipped."""
    if os.environ.get("CI"):
        assert shutil.which("bwrap"), "bubblewrap is missing: the README's test command installs it"


def test_concurrent_first_fetch(tmp_path):
    """Three processes fetch the same package at once into an empty cache: all succeed, and nothing
    half-done is left (each downloads into a folder of its own and renames it into place)."""
    code = "import assets; print(assets.fetch_package('vaderSentiment'))"
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
    """`python *args` in a process of its own: exit code, stdout, stderr."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)


def here(script, *words):
    """`python script *words` run in this process (no interpreter and torch to start: seconds saved
    per case): the same exit code, stdout and stderr, for the many cases of the command-line contract.
    test_contract_in_a_process_of_its_own checks that a real process says no more."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, code = [script, *words], 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess([script, *words], code, out.getvalue(), err.getvalue())


def test_stage5_cli_writes_log(tmp_path):
    flags = "--backbone random:tiny-bert --steps 30 --flip-interval 10 --birth-interval 5 --batch-size 4"
    r = cli("stage5_train.py", *flags.split(), "--out", str(tmp_path), "--run-name", "smoke")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (tmp_path / "smoke" / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == list(range(30))
    assert [row["regime"] for row in rows] == [s // 10 for s in range(30)]
    assert rows[-1]["num_prompts"] == 6 and abs(sum(rows[-1]["weights"]) - 1) < 1e-4
    assert {"loss", "acc", "acc_mixture", "entropy"} <= set(rows[0])
    assert json.loads((tmp_path / "smoke" / "config.json").read_text())["steps"] == 30


def test_same_seed_same_log(tmp_path):
    """Two runs of the same seed write the same log, byte for byte."""
    logs = []
    for name in ("a", "b"):
        flags = "--backbone random:tiny-bert --steps 12 --birth-interval 4 --batch-size 4"
        r = cli("stage5_train.py", *flags.split(), "--out", str(tmp_path), "--run-name", name)
        assert r.returncode == 0, r.stderr
        logs.append((tmp_path / name / "log.jsonl").read_text())
    assert logs[0] == logs[1]


@pytest.mark.parametrize(
    "words",
    [
        "stage8_run.py --alpha -1 --steps 1",
        "stage9_ablate.py --grid nosuch",
        "stage10_vision.py --rotate-interval 0",
        "stage11_codegen.py evaluate --timeout 0",
    ],
)
def test_contract_in_a_process_of_its_own(words, tmp_path):
    """A real process says what the same command line run in this process says (`here`): no
    warning of a library's logger, no line written below Python, is left out of the contract."""
    real, inside = cli(*words.split(), "--out", str(tmp_path)), here(*words.split(), "--out", str(tmp_path))
    assert (real.returncode, real.stdout, real.stderr) == (inside.returncode, inside.stdout, inside.stderr)


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
        ["--flip", "3"],  # an abbreviation of --flip-interval: refused, never guessed
    ],
)
@pytest.mark.parametrize("script", ["stage5_train.py", "stage8_run.py"])
def test_bad_input_is_one_clear_line(script, args, tmp_path):
    r = here(script, *args, "--steps", "1", "--out", str(tmp_path))
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
    r = here(script, *args, "--steps", "1", "--out", str(tmp_path))
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
    r = here(
        "stage11_codegen.py",
        *args,
        *(["--out", str(tmp_path)] if args[:1] in (["train"], ["generate"], ["evaluate"]) else []),
    )
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in r.stderr, r.stderr


# ----------------------------------------------------------------------------------------------
# Careless and hostile use: every case ends with exit code 2 and one line, no traceback, nothing
# written outside --out, and the files a run already had unchanged.
# ----------------------------------------------------------------------------------------------
TINY = "--backbone random:tiny-bert --batch-size 4 --flip-interval 3 --birth-interval 2 --precision fp32"


def files_under(root):
    """{relative path: bytes, or 'link -> target', or 'dir'} of everything under root (links not
    followed; a run folder's .lock, which names the process that last held it, left out)."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + [f for f in files if f != ".lock"]:
            path = os.path.join(parent, name)
            key = os.path.relpath(path, root)
            if os.path.islink(path):
                found[key] = "link -> " + os.readlink(path)
            elif os.path.isdir(path):
                found[key] = "dir"
            else:
                with open(path, "rb") as f:
                    found[key] = f.read()
    return found


def tiny8(out, *words):
    """A 6-step stage 8 run on tiny-bert into `out`, with more flags."""
    return here("stage8_run.py", *TINY.split(), "--steps", "6", "--out", str(out), *words)


def one_line_error(r, says=""):
    lines = [line for line in r.stderr.splitlines() if line.strip() and not line.startswith("[flh] ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and "error:" in lines[0] and says in lines[0], r.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished 6-step stage 8 run of flh and single on tiny-bert: what the hostile cases start from."""
    out = tmp_path_factory.mktemp("tiny")
    r = tiny8(out, "--method", "flh", "--run-name", "run")
    assert r.returncode == 0, r.stderr
    r = tiny8(out, "--method", "single", "--run-name", "run")
    assert r.returncode == 0, r.stderr
    return out / "run"


@pytest.fixture
def sandboxed(tmp_path, tiny_run):
    """tmp/out holds a copy of the tiny run (tmp/out/run), tmp/beside is a folder a run must never
    touch; returns (out, everything outside out as it was)."""
    out, beside = tmp_path / "out", tmp_path / "beside"
    shutil.copytree(tiny_run, out / "run", symlinks=True)
    beside.mkdir()
    (beside / "keep.txt").write_text("mine")
    return out, files_under(tmp_path)


def unchanged_outside(tmp_path, before, out):
    now = files_under(tmp_path)
    inside = str(out.relative_to(tmp_path))
    strip = lambda d: {k: v for k, v in d.items() if k != inside and not k.startswith(inside + os.sep)}  # noqa: E731
    assert strip(now) == strip(before), set(strip(now).items()) ^ set(strip(before).items())


@pytest.mark.parametrize(
    "script,name",
    [
        ("stage8_run.py", "../escape"),
        ("stage8_run.py", "../beside"),
        ("stage8_run.py", "/"),
        ("stage8_run.py", "."),
        ("stage8_run.py", ".."),
        ("stage8_run.py", "ABSOLUTE"),
        ("stage8_run.py", "x" * 256),
        ("stage8_run.py", "bad\x01name"),
        ("stage5_train.py", ""),
        ("stage10_vision.py", "ABSOLUTE"),
        ("stage11_codegen.py evaluate", "ABSOLUTE"),
        ("stage8_run.py", "LINKED"),
        ("stage8_run.py --resume", "CHECKPOINTS_LINKED"),
    ],
)
def test_paths(script, name, sandboxed, tmp_path):
    """A run name is one folder inside --out; a run folder with a symbolic link in it is refused
    before anything is written (a link would send writes and deletes elsewhere)."""
    out, before = sandboxed
    if name == "ABSOLUTE":
        name = str(out / "run")
    elif name == "LINKED":
        os.symlink(tmp_path / "beside", out / "linked")
        name = "linked"
    elif name == "CHECKPOINTS_LINKED":
        shutil.rmtree(out / "run" / "flh" / "checkpoints")
        os.symlink(tmp_path / "beside", out / "run" / "flh" / "checkpoints")
        name = "run"
    before = files_under(tmp_path)
    inside = files_under(out)
    words = [*script.split(), "--out", str(out), "--run-name", name]
    if script.startswith("stage8"):
        words += [*TINY.split(), "--steps", "6", "--method", "flh"]
    one_line_error(here(*words))
    unchanged_outside(tmp_path, before, out)
    assert files_under(out) == inside


def test_run_name_not_utf8(sandboxed, tmp_path):
    out, before = sandboxed
    r = subprocess.run(
        [sys.executable, "stage8_run.py", "--out", str(out), "--run-name", b"caf\xe9", *TINY.split()],
        capture_output=True,
        timeout=600,
    )
    r.stderr = r.stderr.decode("utf-8", "replace")
    one_line_error(r, "not valid UTF-8")
    unchanged_outside(tmp_path, before, out)


BIG = "x" * (1 << 24)
DATA = {
    "latin1.csv": (b"text,label\ncaf\xe9 au lait,1\nok,0\n", {}, "not UTF-8 text: byte 14"),
    "binary.csv": (b"text,label\n\x00\x01\x02,1\n", {}, "NUL byte"),
    "twice.csv": (b"text,label,label\na,1,0\nb,0,1\n", {}, "'label' more than once"),
    "texts.csv": (b"text,text,label\na,b,1\n", {}, "'text' more than once"),
    "object.jsonl": (b'{"text": {"a": 1}, "label": 1}\n', {}, "the text is a dict"),
    "same.csv": (
        b"text,label\na,1\nb,0\n",
        {"--text-column": "label", "--label-column": "label"},
        "must differ",
    ),
    "empty.csv": (b"text,label\n,1\n  ,0\n", {}, "no rows with a text"),
    "big.csv": (b"text,label\n" + BIG.encode() + b"x,1\n", {}, "field larger than field limit"),
    "big.jsonl": (json.dumps({"text": BIG + "x", "label": 1}).encode() + b"\n", {}, "at most"),
    "folder.csv": (None, {}, "not a dataset saved with save_to_disk"),
}


@pytest.mark.parametrize("name", list(DATA))
def test_data_files(name, sandboxed, tmp_path):
    """A user's data file that cannot be read as meant ends in one line naming the file and what is
    wrong with it, before anything is trained."""
    out, before = sandboxed
    data, flags, says = DATA[name]
    path = tmp_path / "beside" / name
    path.mkdir() if data is None else path.write_bytes(data)
    before = files_under(tmp_path)
    extra = [w for k, v in flags.items() for w in (k, v)]
    r = tiny8(out, "--dataset", str(path), *extra)
    one_line_error(r, says)
    unchanged_outside(tmp_path, before, out)


def test_data_file_kinds_read(tmp_path):
    """What a careful reader accepts: a byte-order mark in CSV and JSONL, empty texts dropped (and said)."""

    (tmp_path / "bom.jsonl").write_bytes(
        b'\xef\xbb\xbf{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n'
    )
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbftext,label\na,1\nb,0\n")
    (tmp_path / "gaps.csv").write_bytes(b"text,label\na,1\n,0\n b ,0\n")
    assert assets.load_text_data(str(tmp_path / "bom.jsonl")) == {"bom": (["a", "b"], [1, 0])}
    assert assets.load_text_data(str(tmp_path / "bom.csv")) == {"bom": (["a", "b"], [1, 0])}
    assert assets.load_text_data(str(tmp_path / "gaps.csv")) == {"gaps": (["a", " b "], [1, 0])}


def edit_pool(pool, case, beside):
    """Damage a saved pool (learner.json / learner.safetensors) the way `case` says."""
    import common

    about_path, state_path = pool / "learner.json", pool / "learner.safetensors"
    about, state = json.loads(about_path.read_text()), common.load_state(state_path)
    if case == "truncated":
        return about_path.write_text(about_path.read_text()[:200])
    if case == "a list":
        return about_path.write_text("[]")
    if case == "no config":
        about.pop("config")
    elif case == "a string for a number":
        about["config"]["max_length"] = "long"
    elif case == "another backbone":
        about["config"]["backbone"] = str(beside)
    elif case == "another prompt length":
        about["config"]["prompt_length"] += 1
    elif case in ("nan log-weight", "infinite log-weight"):
        state["pool"]["log_w"][0] = float("nan") if case.startswith("nan") else float("inf")
    elif case == "nan prompt":
        state["pool"]["prompts"][0, 0, 0] = float("nan")
    elif case == "prompts one longer":
        p = state["pool"]["prompts"]
        state["pool"]["prompts"] = torch_cat(p, p[:, :1])
    about_path.write_text(json.dumps(about))
    common.save_state(state_path, state)


def torch_cat(a, b):
    import torch

    return torch.cat([a, b], 1)


POOL_CASES = {
    "truncated": "is not readable JSON",
    "a list": "holds a JSON list, not an object",
    "no config": "must hold a known 'method'",
    "a string for a number": "do not make a flh learner",
    "another backbone": "",
    "another prompt length": "this run's prompts are",
    "nan log-weight": "NaN or infinite",
    "infinite log-weight": "NaN or infinite",
    "nan prompt": "NaN or infinite",
    "prompts one longer": "this run's prompts are",
    "another method": "it holds flh, single",
    "file not utf-8": "line 2: byte 4 is not UTF-8",
}


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_saved_pools(case, sandboxed, tmp_path):
    """--predict on an edited or damaged saved pool, or a file it cannot read: one line, no guess."""
    out, _ = sandboxed
    pool, words = out / "run" / "flh" / "pool", ["--text", "a fine film"]
    if case == "another method":
        words += ["--method", "leader"]
    elif case == "file not utf-8":
        (tmp_path / "beside" / "texts.txt").write_bytes(b"good\nbad \xff text\n")
        words = ["--file", str(tmp_path / "beside" / "texts.txt")]
    else:
        edit_pool(pool, case, tmp_path / "beside")
    before = files_under(tmp_path)
    r = here("stage8_run.py", "--predict", str(out / "run"), *words)
    one_line_error(r, POOL_CASES[case])
    assert files_under(tmp_path) == before


def test_predict_streams_a_file(sandboxed, tmp_path):
    """--predict --file goes through in batches (a progress bar, bounded memory): every line answered."""
    out, _ = sandboxed
    texts = tmp_path / "beside" / "texts.txt"
    texts.write_text("".join(f"film number {i}\n" for i in range(150)) + "\n")
    r = here("stage8_run.py", "--predict", str(out / "run"), "--file", str(texts))
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("label ") for line in r.stdout.splitlines()) == 150


COMPLETIONS = {
    "a task twice": (
        b'{"task_id": "HumanEval/0", "completion": "    return 1\\n"}\n'
        b'{"task_id": "HumanEval/0", "completion": "    return 2\\n"}\n',
        "and again on line 2",
    ),
    "a byte that is not UTF-8": (
        b'{"task_id": "HumanEval/0", "completion": "    return \xff\\n"}\n',
        "byte 53",
    ),
    "a lone surrogate": (
        b'{"task_id": "HumanEval/0", "completion": "    return \\"\\ud800\\"\\n"}\n',
        "surrogate",
    ),
}


@pytest.mark.parametrize("case", list(COMPLETIONS))
def test_completions(case, sandboxed, tmp_path):
    """pass@1 scores one completion per task, exactly as written: anything else is refused before a
    program runs, and the run's last results stay."""
    out, _ = sandboxed
    data, says = COMPLETIONS[case]
    (out / "run" / "completions.jsonl").write_bytes(data)
    (out / "run" / "results.json").write_text("{}\n")
    before = files_under(tmp_path)
    r = here("stage11_codegen.py", "evaluate", "--no-sandbox", "--out", str(out), "--run-name", "run")
    one_line_error(r, says)
    assert files_under(tmp_path) == before


def in_tmpfs(folder, script):
    """Run a shell script with a small tmpfs at `folder`, in a user and mount namespace of its own
    (no root needed); None where this machine does not allow it."""
    folder.mkdir(exist_ok=True)
    probe = (
        subprocess.run(["unshare", "-rm", "true"], capture_output=True) if shutil.which("unshare") else None
    )
    if probe is None or probe.returncode:
        return None
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600)


def test_fault_disk_full_then_resume(tmp_path):
    """The disk fills mid-run (a 192 KiB tmpfs): one line naming the path; the log's rows stay whole;
    with room again, --resume finishes the run with the log of an uninterrupted run."""
    import common

    run = f"{sys.executable} stage8_run.py {TINY} --steps 40 --checkpoint-every 5 --method flh --run-name r"
    ref = cli(*run.split()[1:], "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    full, keep = tmp_path / "full", tmp_path / "kept"
    r = in_tmpfs(
        full,
        f"mount -t tmpfs -o size=192k none {full} && {run} --out {full} 2> {tmp_path}/err; "
        f"echo $? > {tmp_path}/rc; cp -r {full}/r {keep}; mount -o remount,size=64m {full} && "
        f"{run} --out {full} --resume > /dev/null 2>&1 && cp {full}/r/flh/log.jsonl {tmp_path}/resumed.jsonl",
    )
    if r is None:
        pytest.skip("no user namespaces here (unshare -rm), so no tmpfs of our own")
    err, rc = (tmp_path / "err").read_text(), int((tmp_path / "rc").read_text())
    err = "".join(
        line for line in err.splitlines(True) if not line.startswith("flh on rt")
    )  # the run's header
    one_line_error(subprocess.CompletedProcess([], rc, "", err), "no space left on the device")
    kept = common.read_jsonl(keep / "flh" / "log.jsonl")  # complete rows, a torn last one dropped
    assert 0 < len(kept) < 40 and [row["step"] for row in kept] == list(range(len(kept)))
    assert (tmp_path / "resumed.jsonl").read_text() == (
        tmp_path / "ref" / "r" / "flh" / "log.jsonl"
    ).read_text()


def test_fault_read_only_file_system(tmp_path):
    folder = tmp_path / "ro"
    r = in_tmpfs(
        folder,
        f"mount -t tmpfs none {folder} && mount -o remount,ro {folder} && "
        f"{sys.executable} stage8_run.py {TINY} --steps 6 --out {folder} --run-name r",
    )
    if r is None:
        pytest.skip("no user namespaces here (unshare -rm), so no file system of our own")
    one_line_error(r, "read-only file system")


def test_fault_name_too_long(tmp_path):
    r = tiny8(tmp_path / ("o" * 300))
    one_line_error(r, "file name too long")


def test_fault_unwritable_run_folder(sandboxed, tmp_path):
    """A run folder nobody may write to (as root: immutable): adding a method to it ends in one line."""
    out, before = sandboxed
    folder = out / "run"
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
            pytest.skip("root, and chattr +i is not allowed here: no folder root cannot write to")
    else:
        folder.chmod(0o555)
    inside = files_under(out)
    try:
        r = tiny8(out, "--method", "leader")
        r2 = tiny8(out, "--method", "leader", "--run-name", "run")
    finally:
        subprocess.run(
            ["chattr", "-i", str(folder)], capture_output=True
        ) if os.geteuid() == 0 else folder.chmod(0o755)
    assert r.returncode == 0, r.stderr  # another run name: unaffected
    one_line_error(r2, "run")
    assert files_under(out / "run") == {
        k[len("run/") :]: v for k, v in inside.items() if k.startswith("run/")
    }


def test_fault_corrupt_config(sandboxed, tmp_path):
    out, _ = sandboxed
    (out / "run" / "config.json").write_text("[1, 2]\n")
    inside = files_under(out)
    r = tiny8(out, "--method", "flh", "--run-name", "run", "--resume")
    one_line_error(r, "config.json")
    assert files_under(out) == inside


def test_resume_makes_a_cut_final_save(sandboxed):
    """Killed after the last step but before the pool and run.json were written: --resume writes them."""
    out, _ = sandboxed
    method = out / "run" / "flh"
    log = (method / "log.jsonl").read_text()
    shutil.rmtree(method / "pool")
    (method / "run.json").unlink()
    r = tiny8(out, "--method", "flh", "--run-name", "run", "--resume")
    assert r.returncode == 0, r.stderr
    assert (method / "pool" / "learner.safetensors").exists() and (method / "run.json").exists()
    assert (method / "log.jsonl").read_text() == log
