"""Run plumbing: what makes a run restartable and its results reusable, apart from what it computes.

- Checkpoints: the learner's state and every random generator's, each --checkpoint-every steps,
  so that `--resume` continues a killed run to the log an uninterrupted run writes, byte for byte.
- Saved learners: what a run learned (<method>/pool/), safetensors + JSON, checked when read back.
- Soft prompt files (stage 11): a trained prompt with what it was trained on, and the same prompt as
  a PEFT prompt-tuning adapter that loads with its base model.
- Sweeps: a grid's runs cut into shards, run by workers, under a plan (sweep.json) that every
  shard and restart must share; a run is complete when its run.json exists and its log is whole.

The formats underneath (atomic JSON, JSONL logs, state files without pickle, locks, run folders)
are common.py's; the stages call these.
"""

import argparse
import os
import random
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

import common


# ----------------------------------------------------------------------------------------------
# Run folders, checkpoints and resume (stages 8 and 10)
# ----------------------------------------------------------------------------------------------
def rng_state():
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, step, learner, seconds=None):
    """checkpoints/step_N.safetensors, written atomically: learner state, RNG states, stream position
    and the wall seconds its steps took so far, so that a resumed run can report its whole time
    (common.save_state: tensors and JSON, no pickle)."""
    path = folder / "checkpoints" / f"step_{step}.safetensors"
    path.parent.mkdir(exist_ok=True)
    state = {"step": step, "learner": learner.state_dict(), "rng": rng_state(), "seconds": seconds}
    common.save_state(path, state)


def load_latest_checkpoint(folder):
    """The newest readable checkpoint's contents, or None if there is none. An unreadable one (a
    truncated or edited file, say) is skipped with a message, and the one before it is used; if
    none can be read, the run is not touched. Pickle checkpoints of older versions are refused:
    unpickling a file can run any code its author put in it."""
    old = sorted((folder / "checkpoints").glob("step_*.pt"))
    if old:
        raise common.UserError(
            f"{old[0]} is a pickle checkpoint of an older version; it is not loaded (a pickle can run "
            "code): start the run again without --resume"
        )
    found = sorted(
        (folder / "checkpoints").glob("step_*.safetensors"),
        key=lambda p: int(p.stem.split("_")[1]),
        reverse=True,
    )
    for path in found:
        try:
            return common.load_state(path)
        except common.UserError as e:
            print(f"[flh] {e}; falling back to the previous checkpoint", file=sys.stderr)
    if found:
        raise common.UserError(f"--resume: no checkpoint of {folder} can be read; the run is left as it is")
    return None


def add_resume_arg(p):
    p.add_argument("--resume", action="store_true", help="continue each method from its latest checkpoint")


def start_run(args, default_name):
    """The run folder: --run-name, or `default_name` (a data file's path becomes one folder name);
    --resume needs a run that exists."""
    args.run_name = args.run_name or re.sub(r"[^\w.-]+", "_", default_name)[:100]
    if args.resume and not (Path(args.out) / args.run_name / "config.json").exists():
        raise common.UserError(f"--resume: there is no run {Path(args.out) / args.run_name} to continue")
    return common.run_dir(args.out, args.run_name)


# ----------------------------------------------------------------------------------------------
# Saved learners (stage 6 reads them back, stage 8's --predict uses them)
# ----------------------------------------------------------------------------------------------
def save_learner(learner, folder, config, steps):
    """What a run learned, in `folder` (stage 8 writes <method>/pool/ at the end of a run):
    learner.safetensors, the learner's whole state (prompts, optimiser moments, FLH's weights:
    common.save_state, no pickle), and learner.json, readable: the method, how many steps it learned
    from, the run's settings, and for a pool its experts (birth index, birth step, weight).
    `load_learner` rebuilds the learner from these two files alone."""
    folder.mkdir(parents=True, exist_ok=True)
    common.save_state(folder / "learner.safetensors", learner.state_dict())
    about = {"method": learner.name, "steps": steps, "config": config}
    if hasattr(learner, "pool"):
        about["experts"] = learner.pool.experts()
    common.write_json(folder / "learner.json", about)


def check_state(state, prompt_shape, where):
    """A loaded state, checked before it is used: every float tensor finite (a NaN log-weight or
    prompt would predict p=nan) and every prompt-like one (2-D or more) of this run's prompt shape."""
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        if not torch.isfinite(state).all():
            raise common.UserError(f"{where} holds NaN or infinite values")
        if state.ndim >= 2 and tuple(state.shape[-2:]) != prompt_shape:
            raise common.UserError(
                f"{where} has shape {tuple(state.shape)}; this run's prompts are {prompt_shape}"
            )
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, list) else ()
    for key, value in items:
        check_state(value, prompt_shape, f"{where}[{key!r}]")


# ----------------------------------------------------------------------------------------------
# Sweeps (stage 9): shards, workers, the plan every shard shares
# ----------------------------------------------------------------------------------------------
def shard(jobs, i, n):
    """The i-th of n disjoint slices (1 <= i <= n); their union is all jobs."""
    return jobs[i - 1 :: n]


def complete(folder, steps):
    """A run is complete when run.json exists and its log holds all its rows."""
    return (folder / "run.json").exists() and len(common.read_jsonl(folder / "log.jsonl")) == steps


def record_plan(sweep, plan):
    """Write sweep.json, or add grids to it. A later start (another shard, a restart, a second grid)
    must use the same flags: a sweep whose runs disagree would be summarised under wrong labels."""
    path = sweep / "sweep.json"
    with common.locked(sweep, ".lock-plan"):
        if path.exists():
            old = common.read_json(path)
            changed = sorted(
                k for k in {*old["flags"], *plan["flags"]} if old["flags"].get(k) != plan["flags"].get(k)
            )
            if changed:
                raise common.UserError(
                    f"{sweep} was started with other flags ({', '.join(changed)}): give the same flags "
                    "(its sweep.json has them), or another --run-name"
                )
            plan = {**plan, "grids": {**old["grids"], **plan["grids"]}}
        common.write_json(path, plan)


def _call(payload):
    run_one, *arguments = payload
    return run_one(*arguments)


def run_jobs(run_one, jobs, args):
    """run_one(job, args, threads) -> (key, seed, what) for every job, `args.workers` at a time, each
    worker with cores/workers threads; one line per finished run, flushed at once (a cluster job's
    log shows progress while it runs)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // args.workers)
    payloads = [(run_one, job, args, threads) for job in jobs]
    bar = common.progress(total=len(jobs), desc="runs")

    def done(result):
        key, seed, what = result
        bar.write(f"  {key} seed{seed}: {what}")
        sys.stdout.flush()
        bar.update()

    if args.workers == 1:
        for p in payloads:
            done(_call(p))
    else:
        import multiprocessing

        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_call, p) for p in payloads]):
                done(future.result())
    bar.close()


def workers_arg(text):
    value, most = common.positive_int(text), 4 * (os.cpu_count() or 1)
    if value > most:
        raise argparse.ArgumentTypeError(f"at most {most} (4 per core), got {value}")
    return value


def shard_arg(text):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 1/4, got {text!r}")
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"need 1 <= i <= n, got {text}")
    return i, n


# ----------------------------------------------------------------------------------------------
# Soft prompt files and their PEFT export (stage 11)
# ----------------------------------------------------------------------------------------------
def save_prompt(path, prompt, meta):
    """A soft prompt file (stage 11), written atomically (tmp + rename): a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"soft_prompts": prompt.detach().cpu().clone(), **meta}, tmp)
    tmp.replace(path)


def load_prompt(path):
    """A soft prompt file written by `save_prompt`: {soft_prompts, model, init, ...}. Read with
    weights_only=True: tensors and plain values only, so a file that carries code is refused."""
    try:
        state = torch.load(path, weights_only=True)
        assert isinstance(state, dict) and torch.is_tensor(state["soft_prompts"])
    except Exception as e:  # noqa: BLE001 (an unpickling error, a foreign file: all mean "not ours")
        raise common.UserError(f"{path} is not a soft prompt file ({type(e).__name__}: {str(e)[:100]})")
    return state


def export_peft(folder, prompt, model, base, init):
    """The prompt as a PEFT prompt-tuning adapter (adapter_config.json + adapter_model.safetensors),
    written without peft: AutoPeftModelForCausalLM.from_pretrained(folder) loads it with `base`, the
    weights the prompt was trained on (stage 11's peft_base)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.num_attention_heads,
        "num_layers": cfg.num_hidden_layers,
        "prompt_tuning_init": {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}[init],
        "base_model_name_or_path": base,
        "inference_mode": True,
    }
    common.write_json(folder / "adapter_config.json", config)
    save_file(
        {"prompt_embeddings": prompt.detach().cpu().float().contiguous()},
        str(folder / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


# ----------------------------------------------------------------------------------------------
# Checks (`python runs.py --test`; test_all.py runs each)
# ----------------------------------------------------------------------------------------------
def test_hostile_checkpoints():
    """A checkpoint that carries a pickle is never unpickled: as an old step_N.pt it is refused in one
    line; renamed to .safetensors, or a real one with its structure edited, it cannot be read either."""
    with tempfile.TemporaryDirectory() as tmp:
        folder, marker = Path(tmp) / "run", Path(tmp) / "pwned"
        ckpts = folder / "checkpoints"
        folder.mkdir()
        save_checkpoint(folder, 10, torch.nn.Linear(2, 2))
        assert load_latest_checkpoint(folder)["step"] == 10
        good = (ckpts / "step_10.safetensors").read_bytes()
        torch.save({"step": 11, "learner": common.Planted(marker)}, ckpts / "step_11.pt")
        said = [common.user_error(lambda: load_latest_checkpoint(folder))]
        (ckpts / "step_11.pt").rename(ckpts / "step_11.safetensors")
        (ckpts / "step_10.safetensors").unlink()  # the pickle is then the only checkpoint there is
        said.append(common.user_error(lambda: load_latest_checkpoint(folder)))
        (ckpts / "step_11.safetensors").unlink()  # a real checkpoint whose JSON names a tensor it lacks
        head = int.from_bytes(good[:8], "little")
        header = good[8 : 8 + head].replace(b'"t0"', b'"x0"', 1)
        edited = len(header).to_bytes(8, "little") + header + good[8 + head :]
        (ckpts / "step_10.safetensors").write_bytes(edited)
        said.append(common.user_error(lambda: load_latest_checkpoint(folder)))
        assert not marker.exists(), "the pickle ran"
    wants = ("pickle checkpoint of an older version", "no checkpoint", "no checkpoint")
    assert all(want in s and "\n" not in s for want, s in zip(wants, said)), said


def test_log_rewrite_is_atomic():
    """A resumed log is cut back to its checkpoint's step by an atomic rewrite: a crash before the
    rename leaves the old log whole, and a log shorter than the checkpoint is refused, untouched."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        log = common.JsonlLog(path)
        for step in range(250):
            log.write({"step": step})
        whole = path.read_text()
        assert "rows were lost" in common.user_error(lambda: log.truncate_to(300))
        real_replace = os.replace
        os.replace = lambda *a: (_ for _ in ()).throw(OSError("crash"))
        try:
            log.truncate_to(100)
        except OSError:
            pass
        finally:
            os.replace = real_replace
        assert path.read_text() == whole and not list(path.parent.glob(".log.jsonl.*"))
        log.truncate_to(100)
        log.close()
        assert path.read_text() == whole[: whole.index('{"step":100}')]


def run_tests():
    common.run_checks(sys.modules[__name__])


if __name__ == "__main__":
    common.checks_main(
        sys.modules[__name__], "Run plumbing (checkpoints, saved learners, sweeps): its checks."
    )
