"""Shared plumbing for every stage: seeding, devices, run folders, atomic logs, state files, the
command line and how a setting is declared.

Nothing here is about FLH itself; it is the part every experiment needs and nobody wants to
read twice. The stage files import it and keep their own pages for the ideas. Where models and
data come from is assets.py's; what makes a run restartable is runs.py's.
"""

import argparse
import contextlib
import dataclasses
import errno
import gzip
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# Where fetched and converted assets live (assets.py), and what --precision auto measured.
CACHE = Path(os.environ.get("FLH_CACHE", "~/.cache/flh-prompts")).expanduser()


class UserError(Exception):
    """A mistake the user can fix (bad name, missing asset). Scripts print it as one line."""


# ----------------------------------------------------------------------------------------------
# Seeding, devices, run folders
# ----------------------------------------------------------------------------------------------
def seed_everything(seed):
    """Seed Python, NumPy and torch. Same seed, same machine -> the same log."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    """'auto' picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return torch.device(name)


def fast_bf16(device):
    """Does this device say it multiplies bf16 natively (GPU: Ampere or later; CPU: AVX512-BF16 or
    AMX)? A claim, not a speed: `resolve_precision` measures before it believes it."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def cpu_name():
    """The CPU's model name and model number (from /proc/cpuinfo; the platform's name elsewhere)."""
    import platform

    try:
        info = Path("/proc/cpuinfo").read_text()
        name = re.search(r"model name\s*:\s*(.*)", info).group(1).strip()
        model = re.search(r"^model\s*:\s*(\d+)", info, re.M)
        return f"{name} (model {model.group(1)})" if model else name
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def code_commit():
    """The commit of the code that runs, as a run's run.json records it: the git hash, with
    "+changes" where tracked files differ from it; None outside a git checkout (or without git)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        git = lambda *a: subprocess.run(  # noqa: E731
            ["git", "-C", str(here), *a], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        return git("rev-parse", "HEAD") + ("+changes" if git("status", "--porcelain", "-uno") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def warm_seconds(step, repeats=3):
    """Seconds of one call of step(), the fastest after a first (warm-up) call: what --precision auto
    compares."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def resolve_precision(name, device, what="", measure=None):
    """--precision: 'fp32', 'bf16' (autocast), or 'auto', the faster of the two *measured* here.

    A CPU that reports native bf16 can still run it 2x slower than fp32 (seen on a 5th-generation
    Xeon), so on a CPU that claims bf16, `measure(precision)` -> seconds of one representative step
    (of the model `what` names) decides, once per CPU kind, torch version and model: the answer is
    kept in $FLH_CACHE/precision.json and said on stderr. Without the claim bf16 is emulated (always
    slower): fp32. A GPU with bf16 takes bf16."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if fast_bf16(device) else "fp32"
    if not fast_bf16(device) or measure is None:
        return "fp32"
    key = f"{cpu_name()} | torch {torch.__version__} | {what}"
    path = CACHE / "precision.json"
    known = read_json(path) if path.exists() else {}
    if key not in known:
        runs = [(p, measure(p)) for p in ("fp32", "bf16") * 3]  # alternating: a slow spell hits both
        known[key] = {p: round(min(t for q, t in runs if q == p), 4) for p in ("fp32", "bf16")}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**(read_json(path) if path.exists() else {}), key: known[key]})
    seconds = known[key]
    choice = min(("fp32", "bf16"), key=seconds.__getitem__)
    print(
        f"--precision auto: {choice} (a step of {what} took {seconds['fp32']:.3f} s in fp32, "
        f"{seconds['bf16']:.3f} s in bf16 on this {cpu_name()}; measured once, kept in {path})",
        file=sys.stderr,
    )
    return choice


def check_run_name(name):
    """A run name is a name: one printable path component of at most 100 characters, in UTF-8,
    never '', '.' or '..'. Returns it, or raises UserError saying what is wrong."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"run name {name!r} is not valid UTF-8") from None
    if name in ("", ".", "..") or "/" in name or (os.altsep and os.altsep in name):
        raise UserError(f"run name {name!r} must be one folder name inside --out (no '/', not '.' or '..')")
    if not name.isprintable() or len(name) > 100:
        raise UserError(f"run name {name[:40]!r} must be printable and at most 100 characters")
    return name


def run_name_arg(text):
    """argparse type for --run-name: see check_run_name."""
    try:
        return check_run_name(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_dir(out, run_name, create=True):
    """runs/<run-name>/, created if needed (with create=False it must exist). Always a folder inside
    --out, and nothing in it is a symbolic link: a run writes, replaces and deletes files only in
    its own folder, never where a link planted there would send it."""
    path = Path(out) / check_run_name(run_name)
    if path.is_symlink():
        raise UserError(f"the run folder {path} is a symbolic link; a run writes only inside --out")
    if not create and not path.is_dir():
        raise UserError(f"no run {path}: run it first (or check --out and --run-name)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(
            f"cannot make the run folder {path}: a file is in the way (check --out and --run-name)"
        ) from None
    except PermissionError:
        raise UserError(f"cannot make the run folder {path}: permission denied") from None
    for parent, dirs, files in os.walk(path):
        link = next((n for n in dirs + files if os.path.islink(os.path.join(parent, n))), None)
        if link is not None:
            raise UserError(
                f"{os.path.join(parent, link)} is a symbolic link; a run folder holds none (remove it)"
            )
    return path


@contextlib.contextmanager
def locked(folder, name=".lock"):
    """Hold an exclusive lock on a run folder while the block runs. A second process that wants the
    same folder (the same --run-name, or a second copy of a sweep shard) gets one clear error
    instead of mixing its rows into the first one's log. flock: the OS drops the lock when the
    process dies, so a killed run never leaves a stale lock behind."""
    import fcntl

    with open(Path(folder) / name, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise UserError(
                f"{folder} is in use by another process (pid {f.read().strip() or '?'}): "
                "wait for it to finish, or choose another --run-name"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def progress(iterable=None, **kw):
    """A tqdm bar that redraws at most twice a second and stays quiet when nobody watches (CI)."""
    from tqdm import tqdm

    return tqdm(iterable, mininterval=0.5, disable=not sys.stderr.isatty(), **kw)


# ----------------------------------------------------------------------------------------------
# Atomic JSON, append-only JSONL
# ----------------------------------------------------------------------------------------------
def write_json(path, obj):
    """Write JSON atomically: a temporary file in the same folder, then os.replace.
    A crash leaves either the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a log should be as readable as any file
    os.replace(tmp, path)


def read_json(path):
    """A JSON object from a file (configs, run records, saved learners: all objects). A file that is
    not one, edited or cut short, is one line naming it, never a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({str(e)[:80]}): edited or damaged") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path} holds a JSON {type(obj).__name__}, not an object: edited or damaged")
    return obj


class JsonlLog:
    """One JSON object per line, appended and flushed row by row.

    Each row is written with a single `write` of a complete line, so a crash can cut at most the
    last line short; `read_jsonl` drops such a torn line. `truncate_to(n)` keeps the first n rows,
    which is how a resumed run continues its log exactly where its checkpoint was taken."""

    def __init__(self, path):
        self.path = Path(path)
        self.f = open(self.path, "a")

    def write(self, row):
        self.f.write(json.dumps(row, separators=(",", ":")) + "\n")
        self.f.flush()

    def truncate_to(self, n_rows):
        """Keep the first n_rows rows, which must be steps 0..n_rows-1 (a resumed run continues
        from its checkpoint's step); rewritten atomically, so a crash here loses nothing."""
        rows = read_jsonl(self.path)
        if len(rows) < n_rows or [r.get("step") for r in rows[:n_rows]] != list(range(n_rows)):
            raise UserError(
                f"{self.path} holds {len(rows)} rows but its checkpoint is at step {n_rows} "
                "(rows were lost): start the run again without --resume"
            )
        self.f.close()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in rows[:n_rows])
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        finally:
            self.f = open(self.path, "a")

    def close(self):
        self.f.close()


def read_jsonl(path, report=None):
    """All complete rows of a JSONL file. A torn last line (a crash mid-write) is dropped, and said
    so when `report` is given (a function taking one message); any other bad line is an error.
    A gzipped file (name ending .gz: the logs committed under results/) is read the same way."""
    rows = []
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.endswith("\n"):
                if report:
                    report(f"{path}: dropped a torn last line (line {n}, cut short by a crash)")
                break
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}: line {n} is not JSON") from None
    return rows


# ----------------------------------------------------------------------------------------------
# State files: what a run learned, with no pickle in it
# ----------------------------------------------------------------------------------------------
STATE_FORMAT = "flh-prompts-state/1"


def save_state(path, obj):
    """Write `obj` (nested dicts, lists and tuples of tensors, numpy arrays, numbers, strings, None:
    a learner's state_dict, RNG states) to one safetensors file, atomically. The tensors are stored
    as tensors; the structure around them is JSON in the file's metadata. Loading such a file runs
    no code, unlike a pickle (`torch.save`), which runs whatever its author put in it."""
    from safetensors.torch import save_file

    tensors = {}

    def tensor(t):
        key = f"t{len(tensors)}"
        tensors[key] = t.detach().cpu().contiguous().clone()
        return key

    def pack(x):
        if isinstance(x, torch.Tensor):
            return {"__tensor__": tensor(x)}
        if isinstance(x, np.ndarray):  # unsigned ints travel as int64 (safetensors' common ground)
            as_torch = torch.from_numpy(x.astype(np.int64) if x.dtype.kind == "u" else x.copy())
            return {"__ndarray__": tensor(as_torch), "dtype": str(x.dtype)}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: pack(v) for k, v in x.items()}
            return {"__items__": [[pack(k), pack(v)] for k, v in x.items()]}  # int keys stay ints
        if isinstance(x, tuple):
            return {"__tuple__": [pack(v) for v in x]}
        if isinstance(x, list):
            return [pack(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"save_state cannot store a {type(x).__name__}")

    skeleton = json.dumps(pack(obj))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file(tensors, tmp, metadata={"format": STATE_FORMAT, "skeleton": skeleton})
        os.replace(tmp, path)
    except Exception as e:  # safetensors reports a full disk as its own error: make it the OS's again
        code = re.search(r"os error (\d+)", str(e))
        if code and not isinstance(e, OSError):
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


def checks(module):
    """A stage's checks: its functions named test_*, in the order the file defines them. `--test`
    runs them all (run_checks); test_all.py runs each as its own pytest test."""
    return [
        f
        for name, f in vars(module).items()
        if name.startswith("test_") and getattr(f, "__module__", None) == module.__name__
    ]


def run_check(check):
    """One check, from the same random state whether it runs alone or after others."""
    torch.manual_seed(0)
    check()


def run_checks(module):
    """Every check of a stage, in order; an AssertionError names the check that failed."""
    t0, named = time.time(), checks(module)
    for check in named:
        what = " ".join((check.__doc__ or "").split()).split(". ")[0].rstrip(".")
        print(f"{check.__name__}: {what}")
        run_check(check)
    print(f"{len(named)} checks of {Path(module.__file__).name} passed in {time.time() - t0:.1f}s")


def checks_main(module, description):
    """The command line of a helper module beside this one that has only checks: `--test` runs them."""
    parser = Parser(description=description)
    parser.add_argument("--test", action="store_true", help="run its checks")
    main_guard(parser, lambda args: run_checks(module) if args.test else parser.print_help())


def user_error(call):
    """For the checks: the one-line message of the UserError that call() raises (and an
    AssertionError if it raises none)."""
    try:
        call()
    except UserError as e:
        return str(e)
    raise AssertionError("no UserError was raised")


class Planted:
    """For the checks: unpickling this object runs code (it creates the file `marker`), as an
    attacker's checkpoint would. A safe loader must refuse it without creating the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def load_state(path):
    """Read a file written by save_state. Anything else (a pickle, a damaged or edited file, a
    format of another version) is refused with one line; nothing in the file is ever executed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != STATE_FORMAT:
                raise UserError(
                    f"{path} is not a state file of this version (format {meta.get('format')!r}, "
                    f"want {STATE_FORMAT!r})"
                )
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            skeleton = json.loads(meta["skeleton"])
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (safetensors raises several kinds for a bad header)
        raise UserError(f"{path} is not a readable state file ({type(e).__name__}: {str(e)[:100]})")

    def unpack(x):
        if isinstance(x, list):
            return [unpack(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x or "__ndarray__" in x:
            key = x.get("__tensor__", x.get("__ndarray__"))
            if key not in tensors:
                raise UserError(f"{path} names a tensor {key!r} it does not hold: damaged or edited")
            t = tensors[key]
            return t if "__tensor__" in x else t.numpy().astype(x["dtype"])
        if "__tuple__" in x:
            return tuple(unpack(v) for v in x["__tuple__"])
        if "__items__" in x:
            return {unpack(k): unpack(v) for k, v in x["__items__"]}
        return {k: unpack(v) for k, v in x.items()}

    return unpack(skeleton)


# ----------------------------------------------------------------------------------------------
# Command line: one-line errors, checked numbers, the flags every stage shares
# ----------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse that reports a bad value in one line (exit 2) instead of usage + error, keeps the
    flags it declares in `declared` (for preset_help), and takes no abbreviations: `--steps 3200`
    given to a stage without --steps would otherwise set --steps-per-domain without a word."""

    def __init__(self, *args, **kwargs):
        self.declared = []
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.declared.append(action)
        return action

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text, least=1, most=10**9):
    """An integer in [least, most]: counts, sizes and intervals (a billion steps is already absurd)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if not least <= value <= most:
        raise argparse.ArgumentTypeError(f"must be an integer from {least} to {most}, got {value}")
    return value


def seed_arg(text):
    return positive_int(text, least=0, most=2**32 - 1)


def nonneg_int(text):
    return positive_int(text, least=0)


def nonneg_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not 0 <= value <= 1e6:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1e6, got {text}")
    return value


def positive_float(text):
    value = nonneg_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return value


def accuracy_arg(text):
    """An accuracy threshold in (0, 1]."""
    value = positive_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"an accuracy is at most 1, got {text}")
    return value


def unit_float(text):
    """A number in [0, 1): a share or a fraction."""
    value = nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def probability(text):
    """A number in (0, 1): a confidence level such as ADWIN's delta."""
    value = positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def add_common_args(parser, run_name, run_name_help=None, test=True):
    """--seed, --device, --out, --run-name, --test: the flags of every stage (stage 11's sub-commands
    take --test on the main parser instead)."""
    parser.add_argument(
        "--seed", type=seed_arg, default=0, help="random seed, 0 <= seed < 2**32 (default: 0)"
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where to run; auto = cuda if available (default: auto)",
    )
    parser.add_argument("--out", default="runs", help="folder for run outputs (default: runs)")
    parser.add_argument(
        "--run-name",
        default=run_name,
        type=run_name_arg,
        help=run_name_help or f"sub-folder of --out for this run (default: {run_name})",
    )
    if test:
        parser.add_argument("--test", action="store_true", help="run this stage's built-in checks and exit")


# Settings: each declared once, as a field of one dataclass per concern (the stream, the backbone,
# FLH, the baselines, the run). Its flag, type check, help and default all come from that field;
# a preset is a set of values for the fields; a saved run is read back through the same class.
def setting(default, type=None, help="", choices=None):
    """A field of a settings dataclass: its default, the flag's parser (`type`) or `choices`, its help."""
    return dataclasses.field(default=default, metadata={"type": type, "help": help, "choices": choices})


class Settings:
    """Base of the settings dataclasses: a value set in code is checked as its flag's text would be,
    so a bad one ends in the same one line."""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, check, choices = getattr(self, f.name), f.metadata["type"], f.metadata["choices"]
            if value is None or isinstance(value, bool):  # None: not set here (the stage decides)
                continue
            try:
                if choices and value not in choices:
                    raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}, got {value!r}")
                if check:
                    check(str(value))
            except argparse.ArgumentTypeError as e:
                raise UserError(f"--{f.name.replace('_', '-')}: {e}") from None


def add_settings(parser, cls, preset=(), only=None, **defaults):
    """A flag --x-y for each field x_y of the settings class `cls` (or those named in `only`), with
    the declared default or a stage's own value from `defaults`; the fields named in `preset` stay
    None, for a preset to fill."""
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag, default = (
            "--" + f.name.replace("_", "-"),
            None if f.name in preset else defaults.get(f.name, f.default),
        )
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=f.metadata["help"])
            continue
        parser.add_argument(
            flag,
            type=f.metadata["type"],
            choices=f.metadata["choices"],
            default=default,
            help=f.metadata["help"] + ("" if default is None else f" (default: {default})"),
        )


def settings(cls, source, **changes):
    """A `cls` from parsed flags or a run's saved config (a dict): every field the source holds, the
    declared default for the rest (a run saved before that setting existed), then `changes`."""
    values = source if isinstance(source, dict) else vars(source)
    held = {f.name: values[f.name] for f in dataclasses.fields(cls) if values.get(f.name) is not None}
    return cls(**{**held, **changes})


def preset_help(parser, presets):
    """Append each preset's value to the help of every flag a preset fills: '(quick: 16, paper: 32)'."""
    for action in parser.declared:
        if all(action.dest in p for p in presets.values()):
            base = re.sub(r"\s*\(default[^)]*\)$", "", action.help)
            action.help = f"{base} (" + ", ".join(f"{k}: {p[action.dest]}" for k, p in presets.items()) + ")"


def fill_from_preset(args, preset):
    """Set every flag left at None from the preset: explicit flags win."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


# What the operating system can refuse a run that is not the program's fault: said in one line.
OS_FAULTS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
}


def main_guard(parser, main, argv=None):
    """Run main(args); a UserError, or a fault of the file system (permission, full disk, read-only,
    name too long), becomes one line and exit code 2, never a traceback. Logs are appended line by
    line and states replaced atomically, so what was written before the fault stays whole."""
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        parser.error(str(e))
    except OSError as e:
        if e.errno not in OS_FAULTS:
            raise
        where = e.filename or "a file of the run"
        parser.error(f"{where}: {OS_FAULTS[e.errno]} (what was written before it stays whole)")
