"""Stage 9: ablations. Which parts of FLH matter, one setting at a time, over several seeds.

Each grid changes one thing in the stage 8 FLH run and keeps the rest of the preset:
  birth       births every flip/4, flip/2 and flip steps (the plan's 250/500/1000 at flips every
              1,000; the quick preset's flips every 400 give 100/200/400), and *adaptive* birth: a
              prompt is born when the mean entropy of the mixture's predictions on the last batch,
                  H = mean_x  -sum_c q(c|x) log q(c|x),   q = sum_i w_i softmax(f(x; p_i)),
              exceeds --entropy-threshold (a fraction of log C), at least --birth-gap steps apart.
  alpha       0.01, 0.1, 0.5, 1.0  (the FLH learning rate in w_i <- w_i exp(-alpha l_i)).
  length      prompt length 5, 10, 20, 50.
  merge       none; *param*: the two prompts whose tensors have the highest cosine similarity,
              if above --merge-cos; *js*: the two whose predictive distributions on the last
              --merge-window batches have the lowest mean Jensen-Shannon divergence (scipy, bits),
              if below --merge-js. Checked every --merge-every steps among prompts at least
              --merge-window steps old; a merged pair becomes (w_a p_a + w_b p_b) / (w_a + w_b) with
              weight w_a + w_b. Every merge is logged (field `merged`).
  train_mode  weighted_sum (the plan's), independent, snapshot (stage 5) and newest (snapshot mode
              whose newborns start from noise instead of a copy of the live prompt).
              Recovery is reported separately for first-time and recurring shifts (stage 7).
And the parts the FLH that remembers added (the quick preset's snapshot pool, reservoir cap 8):
  share       the floor w <- (1 - share) w + share / K: 0, 0.001, 0.01, 0.1.
  cap         at most 4, 8 or 16 experts (reservoir pruning), or none (no pruning).
  weighting   flh, fixed_share, mpp (stage 4's three rules on the same pool).
  birth_from  a newborn copies the live prompt, the heaviest expert, or starts at random.

Tuning (not an ablation: how the quick preset's FLH was chosen). `--grid tuning` runs snapshot FLH
with the diverse cap of 8 at alpha in {1, 8} x share in {0, 0.01}, and alpha 0.1 with share 0.01;
`--grid tuning2` then runs FLH2 (no cap) and births from the leader at the one of those with the
lowest mean log loss of FLH's mixture (read from the logs, not from the headline metric). Run both
on tuning seeds only (`--first-seed 100 --seeds 3`), never on the seeds that are reported.

The sweep: every (setting, seed) is one run folder, runs/<run-name>/<setting>/seed<s>/ with
log.jsonl and run.json (written last: a run with run.json is complete and is skipped, so a sweep
can be restarted). Settings equal to the base run (length 10, births every 100, ...) are run once and
shared by the grids. --workers N runs N runs at a time (each with cores/N threads); --shard i/n
runs the i-th (1 <= i <= n) of n disjoint slices, for one job per machine (the README has a SLURM
recipe). The first shard records the sweep's settings in sweep.json; a later start with other flags
is refused, and `--summarize --run-name NAME` needs no other flag: it reads sweep.json and each
run's config.json, and names the settings and seeds still missing.

Outputs in the sweep folder: summary.json, summary.md (which names the commit that made the runs:
each run's run.json records it) and one plot per grid (<grid>.png).
Run `--test` for the checks.
"""

import argparse
import json
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import assets
import common
import runs
from stage2_stream import TextStream
from stage3_backbone import load_backbone, load_tokenizer
from stage4_pool import WEIGHTINGS, mean_js
from stage5_train import BIRTH_FROM, FLHLearner, FLHSettings, follow_pool, prepare, r6, run_stream
from stage7_metrics import MetricSettings, compute_metrics, summary_table
from stage8_run import add_experiment_args, apply_preset

PLAN_GRIDS = ["birth", "alpha", "length", "merge", "train_mode"]  # the plan's ablations
GRIDS = [*PLAN_GRIDS, "share", "cap", "weighting", "birth_from"]  # and today's FLH's (--grid all)
TUNING = ["tuning", "tuning2"]  # choosing snapshot FLH's settings
ABLATION_FLAGS = (
    "entropy_threshold",
    "birth_gap",
    "merge_every",
    "merge_cos",
    "merge_js",
)  # the grids set the rest
SNAPSHOT = dict(train_mode="snapshot", prune="diverse", max_prompts=8, birth_from="live")


def grid_settings(grid, args):
    """The settings of one grid: {label: overrides of the base run}."""
    scale = args.flip_interval or args.steps_per_domain
    if grid == "birth":
        out = {f"birth={n}": {"birth_interval": n} for n in (scale // 4, scale // 2, scale)}
        return {**out, "birth=adaptive": {"birth": "adaptive"}}
    if grid == "alpha":
        return {f"alpha={a}": {"alpha": a} for a in (0.01, 0.1, 0.5, 1.0)}
    if grid == "length":
        return {f"length={n}": {"prompt_length": n} for n in (5, 10, 20, 50)}
    if grid == "merge":
        return {f"merge={m}": {"merge": m} for m in ("none", "param", "js")}
    if grid == "train_mode":
        out = {f"train_mode={m}": {"train_mode": m} for m in ("weighted_sum", "independent", "snapshot")}
        return {**out, "train_mode=newest": {"train_mode": "snapshot", "birth_from": "random"}}
    if grid == "share":
        return {f"share={x}": {"share": x} for x in (0.0, 0.001, 0.01, 0.1)}
    if grid == "cap":
        out = {f"cap={n}": {"max_prompts": n, "prune": "reservoir"} for n in (4, 8, 16)}
        return {**out, "cap=none": {"max_prompts": 0, "prune": "none"}}
    if grid in ("weighting", "birth_from"):
        values = WEIGHTINGS if grid == "weighting" else BIRTH_FROM
        return {f"{grid}={v}": {grid: v} for v in values}
    if grid == "tuning":
        out = {
            f"alpha={a},share={sh}": {**SNAPSHOT, "alpha": a, "share": sh}
            for a in (1.0, 8.0)
            for sh in (0.0, 0.01)
        }
        return {**out, "alpha=0.1,share=0.01": {**SNAPSHOT, "alpha": 0.1, "share": 0.01}}
    if grid == "tuning2":
        label, best = best_setting(args, "tuning")
        return {
            label: best,
            f"{label},flh2": {**best, "prune": "flh2", "max_prompts": 0},
            f"{label},birth_from=leader": {**best, "birth_from": "leader"},
        }
    raise common.UserError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS + TUNING)} or all")


def best_setting(args, grid):
    """(label, overrides) of the grid's setting with the lowest mean log loss of FLH's mixture,
    averaged over its seeds: the tuning criterion, chosen from the tuning seeds' logs alone."""
    sweep, scores = Path(args.out) / common.check_run_name(args.run_name), {}
    for label, overrides in grid_settings(grid, args).items():
        for seed in seed_range(args):
            folder = sweep / folder_key(grid, label, overrides, args) / f"seed{seed}"
            if not runs.complete(folder, args.steps):
                raise common.UserError(f"--grid {grid} has not finished ({folder} is missing): run it first")
            rows = common.read_jsonl(folder / "log.jsonl")
            scores.setdefault(label, []).append(np.mean([r["mixture_loss"] for r in rows]))
    label = min(scores, key=lambda k: np.mean(scores[k]))
    return label, grid_settings(grid, args)[label]


def seed_range(args):
    return range(args.first_seed, args.first_seed + args.seeds)


def folder_key(grid, label, overrides, args):
    """Tuning runs are named by their label (they set every FLH setting they depend on, so a later
    change of the preset cannot rename them); ablation runs by what differs from the base run."""
    return label if grid in TUNING else run_key(overrides, args)


def run_key(overrides, args):
    """The folder name of a setting: what differs from the base run, or 'base'."""
    base = {**asdict(AblationSettings()), **vars(args)}
    diff = {k: v for k, v in sorted(overrides.items()) if base.get(k) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "base"


def expand(grids, args):
    """All runs of a sweep, in a fixed order: [(key, overrides, seed)] without duplicates."""
    jobs = {}
    for grid in grids:
        for label, overrides in grid_settings(grid, args).items():
            for seed in seed_range(args):
                jobs.setdefault((folder_key(grid, label, overrides, args), seed), overrides)
    return [(key, overrides, seed) for (key, seed), overrides in jobs.items()]


NOT_PLANNED = ("grid", "workers", "shard", "summarize", "out", "run_name", "test", "device")


def sweep_plan(args, grids):
    """What a sweep runs, as sweep.json keeps it: each grid's settings (label, run folder, the
    overrides), the seeds, the steps, and the flags every shard must share."""
    return {
        "grids": {
            g: {
                label: {"folder": folder_key(g, label, o, args), "overrides": o}
                for label, o in grid_settings(g, args).items()
            }
            for g in grids
        },
        "seeds": list(seed_range(args)),
        "steps": args.steps,
        "flags": {k: v for k, v in vars(args).items() if k not in NOT_PLANNED},
    }


# ----------------------------------------------------------------------------------------------
# FLH with the ablated parts
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AblationSettings(common.Settings):
    """The ablated parts, both off by default (the grids switch them on), each declared once."""

    birth: str = common.setting(
        "fixed", choices=["fixed", "adaptive"], help="births every interval, or on entropy"
    )
    entropy_threshold: float = common.setting(
        0.9,
        common.accuracy_arg,
        "adaptive birth: mean prediction entropy, as a fraction of log C, that calls a birth",
    )
    birth_gap: int = common.setting(
        None, common.positive_int, "adaptive birth: fewest steps between births (default: flip interval / 4)"
    )
    merge: str = common.setting("none", choices=["none", "param", "js"], help="which pairs of prompts merge")
    merge_every: int = common.setting(
        None, common.positive_int, "steps between merge checks (default: the birth interval)"
    )
    merge_cos: float = common.setting(
        0.95, common.accuracy_arg, "param merging: cosine similarity above which a pair merges"
    )
    merge_js: float = common.setting(
        0.01,
        common.nonneg_float,
        "js merging: mean Jensen-Shannon divergence (bits) below which a pair merges",
    )


class AblationLearner(FLHLearner):
    """FLHLearner (stage 5, all its training modes) + adaptive birth and merging, both off by
    default. The step is FLH's own; this class only decides births differently and merges after it."""

    def __init__(self, model, prompt_length, lr, flh, ablation=AblationSettings(), history=100):
        super().__init__(model, prompt_length, lr, flh)
        a = ablation
        self.birth_rule, self.merge = a.birth, a.merge
        self.entropy_threshold, self.birth_gap = a.entropy_threshold, a.birth_gap
        self.merge_every, self.merge_cos, self.merge_js = a.merge_every, a.merge_cos, a.merge_js
        self.last_entropy, self.last_birth = None, None
        self.losses, self.history = {}, history  # birth id -> deque of its last `history` batch losses

    def should_birth(self, step):
        if self.birth_rule == "fixed":
            fire = super().should_birth(step)
        elif self.last_birth is None:
            fire = True
        else:
            high = self.last_entropy is not None and self.last_entropy > self.entropy_threshold
            fire = high and step - self.last_birth >= self.birth_gap
        if fire:
            self.last_birth = step
        return fire

    def step(self, batch):
        row = super().step(batch)
        mixture = self.last_mixture
        self.last_entropy = float(-(mixture * mixture.clamp_min(1e-12).log()).sum(-1).mean()) / np.log(
            mixture.shape[-1]
        )
        self.losses = {j: self.losses.get(j, deque(maxlen=self.history)) for j in self.pool.birth_ids}
        for j, loss in zip(self.pool.birth_ids, row["expert_losses"]):
            self.losses[j].append(loss)
        row["prediction_entropy"] = r6(self.last_entropy)
        merged = self.maybe_merge(batch["step"])
        if merged:
            row["merged"] = merged
        return row

    def merge_scores(self):
        """[(score, a, b)] for every eligible pair of pool indices; higher score = more alike.
        Eligible: experts that have been scored on at least merge_window batches."""
        pool = self.pool
        old = [i for i, j in enumerate(pool.birth_ids) if len(pool.recent.get(j, ())) >= pool.window]
        flat = F.normalize(pool.stacked().detach().flatten(1), dim=1)
        out = []
        for x, a in enumerate(old):
            for b in old[x + 1 :]:
                if self.merge == "param":
                    out.append((float(flat[a] @ flat[b]), a, b))
                else:
                    recent = [dict(pool.recent[pool.birth_ids[i]]) for i in (a, b)]
                    out.append((-mean_js(*recent), a, b))
        return out

    def maybe_merge(self, step):
        """Merge the most alike eligible pair if alike enough; returns the logged event or None."""
        if self.merge == "none" or step % self.merge_every or len(self.pool) < 2:
            return None
        scores = self.merge_scores()
        if not scores:
            return None
        score, a, b = max(scores)
        if (self.merge == "param" and score <= self.merge_cos) or (
            self.merge == "js" and -score >= self.merge_js
        ):
            return None
        pool, w = self.pool, self.pool.log_w.exp()
        event = {
            "kept": pool.birth_ids[a],
            "removed": pool.birth_ids[b],
            "score": r6(abs(score)),
            "weights": r6([w[a], w[b]]),
            "recent_loss": r6([np.mean(self.losses[pool.birth_ids[i]]) for i in (a, b)]),
        }
        with torch.no_grad():
            pa, pb = pool.prompts[a], pool.prompts[b]
            pa.copy_((w[a].item() * pa + w[b].item() * pb) / (w[a] + w[b]).item())
        pool.log_w[a] = torch.logaddexp(pool.log_w[a], pool.log_w[b])
        self.optimizer.state.pop(pool.prompts[a], None)  # its Adam moments belong to neither parent
        removed = pool.remove([i for i in range(len(pool)) if i != b])
        follow_pool(self.optimizer, removed=removed)
        return event


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def ablation_args(args, overrides, seed):
    """The argparse namespace of one run: the sweep's flags, the setting's overrides, the seed."""
    return argparse.Namespace(**{**asdict(AblationSettings()), **vars(args), **overrides, "seed": seed})


def run_one(job, args, threads):
    """One (setting, seed) run into its folder; skipped when it is complete (run.json written last,
    and a log of all its rows). The folder is locked while it runs."""
    key, overrides, seed = job
    folder = Path(args.out) / args.run_name / key / f"seed{seed}"
    a = ablation_args(args, overrides, seed)
    if runs.complete(folder, a.steps):
        return key, seed, "skipped"
    torch.set_num_threads(threads)
    model, stream = prepare(a)
    ablation = common.settings(
        AblationSettings,
        a,
        birth_gap=a.birth_gap or (a.flip_interval or a.steps_per_domain) // 4,
        merge_every=a.merge_every or a.birth_interval,
    )
    learner = AblationLearner(model, a.prompt_length, a.lr, common.settings(FLHSettings, a), ablation)
    folder.mkdir(parents=True, exist_ok=True)
    with common.locked(folder):
        (folder / "run.json").unlink(missing_ok=True)
        common.write_json(folder / "config.json", vars(a))
        (folder / "log.jsonl").unlink(missing_ok=True)  # a run cut short starts over
        log = common.JsonlLog(folder / "log.jsonl")
        t0 = time.time()
        try:
            run_stream(learner, stream, a.steps, log, desc=f"{key} seed{seed}")
        finally:
            log.close()
        common.write_json(
            folder / "run.json",
            {
                "key": key,
                "seed": seed,
                "wall_seconds": round(time.time() - t0, 1),
                "threads": threads,
                "steps": a.steps,
                "commit": common.code_commit(),
            },
        )
    return key, seed, f"{time.time() - t0:.0f}s"


# ----------------------------------------------------------------------------------------------
# Summary: tables and plots from whatever runs exist
# ----------------------------------------------------------------------------------------------
def grid_runs(sweep, plan, grid):
    """The complete runs of one grid as [{label: metrics}], one dict per seed, keeping only the
    settings that every seed found has; and {setting: the sweep's seeds it still misses}. Each
    run's own config.json must agree with the setting it is filed under."""
    per_seed, missing = {}, {}
    for label, setting in plan["grids"][grid].items():
        for seed in plan["seeds"]:
            folder = sweep / setting["folder"] / f"seed{seed}"
            if not runs.complete(folder, plan["steps"]):
                missing.setdefault(label, []).append(seed)
                continue
            cfg = common.read_json(folder / "config.json")
            wrong = {
                k: cfg.get(k) for k, v in {**setting["overrides"], "seed": seed}.items() if cfg.get(k) != v
            }
            if wrong:
                raise common.UserError(f"{folder} was run with {wrong}, not as its setting {label!r} says")
            rows = common.read_jsonl(folder / "log.jsonl")
            m = compute_metrics(rows, common.settings(MetricSettings, cfg))
            m["mean_accuracy_mixture"] = float(np.mean([r["acc_mixture"] for r in rows]))
            m["mixture_log_loss"] = float(np.mean([r["mixture_loss"] for r in rows]))
            m["merges"] = sum(1 for r in rows if "merged" in r)
            m["mean_prompts"] = float(np.mean([r["num_prompts"] for r in rows]))
            per_seed.setdefault(seed, {})[label] = m
    labels = [lab for lab in plan["grids"][grid] if all(lab in s for s in per_seed.values())]
    return [{lab: s[lab] for lab in labels} for s in per_seed.values()], labels, missing


def grid_stats(by_seed, labels):
    """Mean ± std over seeds of every metric, and recovery and first-50 accuracy by kind of shift."""
    table, stats = summary_table(by_seed)
    for lab in labels:
        for key in ("mean_accuracy_mixture", "mixture_log_loss", "merges", "mean_prompts"):
            vals = [r[lab][key] for r in by_seed]
            stats[lab][key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
        for kind in ("first", "recurring"):
            got = [r[lab]["by_kind"][kind] for r in by_seed if kind in r[lab]["by_kind"]]
            times = [
                d["recovery"]
                for r in by_seed
                for d in r[lab]["shift_details"]
                if d["kind"] == kind and d["recovery"] is not None
            ]
            stats[lab][f"recovery_{kind}"] = {
                "recovered": sum(g["recovered"] for g in got),
                "shifts": sum(g["shifts"] for g in got),
                "mean_steps": float(np.mean(times)) if times else None,
                "first50": float(np.mean([g["first50"] for g in got])) if got else None,
            }
    return table, stats


def grid_markdown(grid, by_seed, table, stats, labels):
    """The grid's two Markdown tables: the headline metrics, then mixture, pool size and recovery by kind."""
    md = [
        f"## {grid} ({len(by_seed)} seed{'s' * (len(by_seed) > 1)})",
        "",
        table.replace("| method |", "| setting |"),
        "",
    ]
    md += [
        "| setting | mixture log loss | mixture acc | prompts (mean) | merges "
        "| first-time shifts: recovered, steps, first-50 acc "
        "| recurring shifts: recovered, steps, first-50 acc |",
        "|---|---|---|---|---|---|---|",
    ]
    for lab in labels:
        st, kinds = stats[lab], []
        for kind in ("first", "recurring"):
            k = st[f"recovery_{kind}"]
            steps = "never" if k["mean_steps"] is None else f"{k['mean_steps']:.0f}"
            kinds.append(
                f"{k['recovered']}/{k['shifts']}, {steps}"
                + ("" if k["first50"] is None else f", {k['first50']:.3f}")
            )
        md.append(
            f"| {lab} | {st['mixture_log_loss']['mean']:.4f} | {st['mean_accuracy_mixture']['mean']:.3f} "
            f"| {st['mean_prompts']['mean']:.1f} | {st['merges']['mean']:.1f} | {kinds[0]} | {kinds[1]} |"
        )
    return md + [""]


def plot_grid(grid, stats, labels, seeds, path):
    """Accuracy (mean ± std over seeds), and the first 50 steps after a shift by kind of shift (the
    headline: on short regimes few shifts get back to the recovery threshold), one setting per tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    x = np.arange(len(labels))
    for key, name, fmt in (
        ("mean_accuracy", "mean acc", "o-"),
        ("windowed_accuracy", "windowed acc", "s--"),
        ("mean_accuracy_mixture", "mixture acc", "^:"),
    ):
        means, stds = [stats[lab][key]["mean"] for lab in labels], [stats[lab][key]["std"] for lab in labels]
        ax[0].errorbar(x, means, stds, fmt=fmt, capsize=3, label=name)
    kinds = (("first", "tab:blue", "first-time shifts"), ("recurring", "tab:orange", "recurring shifts"))
    for j, (kind, color, name) in enumerate(kinds):
        acc = [stats[lab][f"recovery_{kind}"]["first50"] for lab in labels]  # None: no such shift
        xs = x + (j - 0.5) * 0.38
        ax[1].bar(xs, [v or 0 for v in acc], 0.36, color=color, label=name)
        for xi, v in zip(xs, acc):
            ax[1].annotate(
                "-" if v is None else f"{v:.2f}", (xi, v or 0), ha="center", va="bottom", fontsize=7
            )
    for a in ax:  # one thing varies: its value; several (tuning): the whole label
        ticks = [lab.split("=", 1)[1] if lab.count("=") == 1 else lab.replace(",", "\n") for lab in labels]
        a.set_xticks(x, ticks, fontsize=8 if grid in TUNING else 10)
        a.set_xlabel(grid)
    ax[0].set_ylabel("prequential accuracy")
    ax[0].legend(fontsize=8)
    ax[1].set_ylim(0, 1)
    ax[1].set_ylabel("accuracy, first 50 steps after")
    ax[1].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    fig.suptitle(f"{grid}: mean (left: ± std) over {seeds} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def made_at(sweep):
    """Which commit made the sweep's complete runs, as their run.json says ("unknown": a run made
    outside a git checkout, or before run.json kept it)."""
    done = sorted(sweep.glob("*/seed*/run.json"))
    commits = Counter(common.read_json(run).get("commit") or "unknown" for run in done)
    return "Made at commit " + ", ".join(f"{c} ({n} runs)" for c, n in commits.items()) + "."


def summarize(args, grids=None):
    """summary.json, summary.md and <grid>.png in the sweep folder, from the runs found there and
    the settings its sweep.json recorded (no flags to repeat; `grids`: all it holds unless named).
    A sweep from before sweep.json existed is read with the settings the flags give."""
    sweep = common.run_dir(args.out, args.run_name, create=False)
    if (sweep / "sweep.json").exists():
        plan = common.read_json(sweep / "sweep.json")
    else:
        print(
            f"[flh] {sweep} has no sweep.json: its settings are taken from the flags given", file=sys.stderr
        )
        plan = sweep_plan(args, grids or GRIDS)
    grids = grids or list(plan["grids"])
    unknown = [g for g in grids if g not in plan["grids"]]
    if unknown:
        raise common.UserError(
            f"{sweep} has no grid {', '.join(unknown)}; it holds {', '.join(plan['grids'])}"
        )
    summary, md = {}, [f"# Stage 9 sweep `{args.run_name}`", "", made_at(sweep), ""]
    for grid in grids:
        by_seed, labels, missing = grid_runs(sweep, plan, grid)
        note = [f"Still missing (setting: seeds without a complete run): {missing}", ""] if missing else []
        if not by_seed or not labels:
            md += [f"## {grid}", "", "no complete runs yet", "", *note]
            continue
        table, stats = grid_stats(by_seed, labels)
        summary[grid] = {"seeds": len(by_seed), "settings": stats}
        md += grid_markdown(grid, by_seed, table, stats, labels) + note
        plot_grid(grid, stats, labels, len(by_seed), sweep / f"{grid}.png")
    common.write_json(sweep / "summary.json", summary)
    (sweep / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"-> {sweep}/summary.json, summary.md and one PNG per grid")
    return summary


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def test_grids():
    """The grids' sizes; a setting equal to the base run (the quick preset's FLH) is run once for all
    the grids that hold it (the alpha grid, {0.01, 0.1, 0.5, 1}, does not hold the preset's 8; the
    newest training mode is births from random); shards are disjoint and cover the runs."""
    args = apply_preset(build_parser().parse_args([]))
    sizes = {g: len(grid_settings(g, args)) for g in GRIDS}
    assert list(sizes.values()) == [4, 4, 4, 3, 4, 4, 4, 3, 3], sizes
    assert [o.get("birth_interval") for o in grid_settings("birth", args).values()] == [100, 200, 400, None]
    args.seeds, args.first_seed = 2, 0
    jobs = expand(GRIDS, args)
    assert len(jobs) == 2 * (sum(sizes.values()) - 8), len(jobs)  # 8 settings are another's run
    parts = [runs.shard(jobs, i, 3) for i in (1, 2, 3)]
    assert sorted(j for p in parts for j in p) == sorted(jobs) and sum(map(len, parts)) == len(jobs)
    print(
        f"  ok: the grids expand to {sizes}; {len(jobs)} distinct runs for 2 seeds; 3 shards are "
        "disjoint and cover them"
    )


def _tiny_stream():
    """For the checks: random tiny-bert, and a stream of rt without flips in batches of 4."""
    model, _ = load_backbone("random:tiny-bert")
    tok = load_tokenizer("minilm")
    return model, TextStream(
        assets.load_text_data("rt"), tok, batch_size=4, max_length=24, flip_every_n=None, seed=0
    )


def test_merging():
    """Merging: two identical prompts (same tensors, same predictions) merge, weights summed; two distinct
    ones (opposite tensors, opposite predictions) stay apart."""
    model, stream = _tiny_stream()
    for merge in ("param", "js"):
        for same in (True, False):
            flh = FLHSettings(birth_interval=10**9, merge_window=2)
            learner = AblationLearner(model, 3, 1e-2, flh, AblationSettings(merge=merge, merge_every=1))
            for _ in range(2):
                learner.birth()
            logits = torch.tensor([[2.0, -2.0], [-1.0, 1.0]]).expand(2, 2, 2).clone()  # [K, B, C]
            with torch.no_grad():
                learner.pool.prompts[1].copy_(learner.pool.prompts[0] * (1 if same else -1))
            if not same:
                logits[1] = -logits[1]
            for s in (1, 2):
                learner.pool.record(s, logits)
                for j, loss in zip(learner.pool.birth_ids, (0.5, 0.7)):
                    learner.losses.setdefault(j, deque()).append(loss)
            event = learner.maybe_merge(2)
            assert (event is not None) == same and len(learner.pool) == (1 if same else 2), (
                merge,
                same,
                event,
            )
            assert abs(sum(learner.pool.weights) - 1) < 1e-12 and len(learner.optimizer.param_groups) == len(
                learner.pool
            )
    print(
        "  ok: param and js merging merge two identical prompts (weights summed) and leave two distinct ones"
    )


def test_same_rows_as_flh():
    """Stage 9 holds no copy of FLH's step: with its parts off, the ablation learner logs what FLH logs."""
    model, stream = _tiny_stream()
    for mode in ("weighted_sum", "snapshot"):
        logs = []
        for cls in (FLHLearner, AblationLearner):
            torch.manual_seed(0)
            learner = cls(model, 3, 1e-2, FLHSettings(birth_interval=2, train_mode=mode, loss_batch=2))
            logs.append([learner.step(stream.batch(s)) for s in range(6)])
        assert [{k: v for k, v in r.items() if k != "prediction_entropy"} for r in logs[1]] == logs[0], mode
    print(
        "  ok: with adaptive birth and merging off, the ablation learner's rows equal FLH's "
        "(weighted_sum, snapshot)"
    )


def test_newest():
    """newest (snapshot mode, newborns from noise): only the newest prompt moves."""
    model, stream = _tiny_stream()
    flh = FLHSettings(birth_interval=2, train_mode="snapshot", birth_from="random")
    learner = AblationLearner(model, 3, 1e-1, flh)
    learner.step(stream.batch(0) | {"step": 0})
    learner.step(stream.batch(1) | {"step": 1})
    before = [p.detach().clone() for p in learner.pool.prompts]
    learner.step(stream.batch(2) | {"step": 2})  # a birth, then a step
    after = learner.pool.prompts
    assert torch.equal(before[0], after[0]) and not torch.equal(after[1], before[0]) and len(after) == 2
    print("  ok: newest mode trains the newest prompt only")


def test_adaptive_birth():
    """Adaptive birth: fires when the last batch's prediction entropy is high, never within the gap."""
    model, stream = _tiny_stream()
    adaptive = AblationSettings(birth="adaptive", entropy_threshold=0.5, birth_gap=5)
    learner = AblationLearner(model, 3, 1e-2, FLHSettings(birth_interval=10**9), adaptive)
    assert learner.should_birth(0)
    learner.last_birth, fired = 0, []
    for s in range(1, 20):
        learner.last_entropy = 0.9 if s >= 3 else 0.1
        if learner.should_birth(s):
            fired.append(s)
            learner.last_birth = s
    assert fired == [5, 10, 15], fired
    learner.last_entropy = 0.4
    assert not learner.should_birth(100)
    print("  ok: adaptive birth fires on high-entropy batches (steps 5, 10, 15 with gap 5), not on low ones")


TINY = "--backbone random:tiny-bert --flip-interval 4 --batch-size 2 --max-length 16 --prompt-length 2"


def test_sweep():
    """A tiny sweep: runs, skips finished runs when restarted, and summarises them correctly."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = [*f"--grid alpha {TINY} --steps 12 --birth-interval 3 --run-name sw".split(), "--out", tmp]
        a = apply_preset(build_parser().parse_args(argv))
        main(a)
        logs = sorted(Path(tmp, "sw").glob("*/seed0/log.jsonl"))
        stamps = [p.stat().st_mtime_ns for p in logs]
        assert len(logs) == 4, logs
        main(a)  # restarted: all four are complete, nothing reruns
        assert [p.stat().st_mtime_ns for p in logs] == stamps
        # The summary of fake runs: known accuracies give known means.
        for lab, acc in (("alpha=0.01", 0.25), ("alpha=0.1", 0.5), ("alpha=0.5", 0.75), ("alpha=1.0", 1.0)):
            folder = Path(tmp, "sw", run_key(grid_settings("alpha", a)[lab], a), "seed0")
            rows = common.read_jsonl(folder / "log.jsonl")
            with open(folder / "log.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps({**r, "acc": acc, "acc_mixture": acc / 2}) + "\n")
        s = summarize(a, ["alpha"])["alpha"]["settings"]
        assert [s[f"alpha={x}"]["mean_accuracy"]["mean"] for x in (0.01, 0.1, 0.5, 1.0)] == [
            0.25,
            0.5,
            0.75,
            1.0,
        ]
        assert s["alpha=0.5"]["mean_accuracy_mixture"]["mean"] == 0.375
        assert Path(tmp, "sw", "alpha.png").stat().st_size > 0
        made = f"Made at commit {common.code_commit() or 'unknown'} (4 runs)."
        assert made in Path(tmp, "sw", "summary.md").read_text().splitlines(), made  # which code made them
        # --summarize needs no flags but the sweep's name: sweep.json has its settings; a start with
        # other flags is refused; a run whose config.json disagrees with its label is refused.
        bare = build_parser().parse_args(["--summarize", "--run-name", "sw", "--out", tmp])
        assert main(bare)["alpha"]["settings"] == summarize(a, ["alpha"])["alpha"]["settings"]
        for argv_, says in (
            ([*argv, "--steps", "10"], "was started with other flags (steps)"),
            (["--summarize", "--grid", "birth", "--run-name", "sw", "--out", tmp], "has no grid birth"),
        ):
            try:
                main(build_parser().parse_args(argv_))
                raise AssertionError(f"accepted {argv_}")
            except common.UserError as e:
                assert says in str(e), e
        cfg_path = Path(tmp, "sw", run_key(grid_settings("alpha", a)["alpha=0.5"], a), "seed0", "config.json")
        good = cfg_path.read_text()
        cfg_path.write_text(json.dumps({**json.loads(good), "alpha": 0.7}))
        try:
            main(bare)
            raise AssertionError("a run filed under the wrong setting was summarised")
        except common.UserError as e:
            assert "was run with {'alpha': 0.7}, not as its setting 'alpha=0.5' says" in str(e), e
        cfg_path.write_text(good)
        # A run whose log lost rows is not complete: a restart redoes it. A second copy of a shard refuses.
        folder = Path(tmp, "sw", run_key(grid_settings("alpha", a)["alpha=0.5"], a), "seed0")
        (folder / "log.jsonl").write_text(
            "".join((folder / "log.jsonl").read_text().splitlines(keepends=True)[:5])
        )
        assert not runs.complete(folder, 12)
        main(a)
        assert runs.complete(folder, 12)
        import subprocess
        import sys

        with common.locked(Path(tmp, "sw"), ".lock-shard-1-of-1"):
            r = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
        lines = [x for x in r.stderr.splitlines() if x.strip()]
        assert r.returncode == 2 and len(lines) == 1 and "in use by another process" in lines[0], r.stderr
    print(
        "  ok: a tiny sweep runs 4 settings, a restart skips them and redoes one whose log lost rows, "
        "a second copy of a running shard refuses in one line, the summary of known logs is right, "
        "--summarize needs only the sweep's name, other flags and misfiled runs are refused"
    )


def test_tuning():
    """Tuning: five snapshot settings; tuning2 adds FLH2 and leader births at the one of lowest mixture
    loss."""
    with tempfile.TemporaryDirectory() as tmp:
        seeds = "--first-seed 100 --seeds 2"
        argv = [
            *f"--grid tuning {TINY} --steps 8 --birth-interval 2 {seeds} --run-name tu".split(),
            "--out",
            tmp,
        ]
        a = apply_preset(build_parser().parse_args(argv))
        try:
            grid_settings("tuning2", a)
            raise AssertionError("tuning2 was built before tuning ran")
        except common.UserError as e:
            assert "has not finished" in str(e)
        main(a)
        runs = sorted(Path(tmp, "tu").glob("*/seed*/run.json"))
        assert len(runs) == 10 and {p.parent.name for p in runs} == {"seed100", "seed101"}, runs
        losses = {
            lab: np.mean(
                [
                    np.mean(
                        [
                            r["mixture_loss"]
                            for r in common.read_jsonl(Path(tmp, "tu", lab, f"seed{sd}", "log.jsonl"))
                        ]
                    )
                    for sd in (100, 101)
                ]
            )
            for lab, o in grid_settings("tuning", a).items()
        }
        label, best = best_setting(a, "tuning")
        assert (
            label == min(losses, key=losses.get)
            and best["train_mode"] == "snapshot"
            and best["max_prompts"] == 8
        )
        t2 = grid_settings("tuning2", a)
        assert (
            list(t2) == [label, f"{label},flh2", f"{label},birth_from=leader"]
            and t2[f"{label},flh2"]["prune"] == "flh2"
        )
        cfg = common.read_json(Path(tmp, "tu", label, "seed100", "config.json"))
        assert cfg["train_mode"] == "snapshot" and cfg["prune"] == "diverse" and cfg["seed"] == 100
    print(
        "  ok: the tuning grid runs 5 snapshot settings on seeds 100-101; tuning2 builds on the one "
        "of lowest "
        f"mixture log loss ({label})"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser():
    p = common.Parser(
        description="Stage 9: ablation grids over the stage 8 FLH run (several seeds, workers, shards)."
    )
    p.add_argument(
        "--grid",
        choices=[*GRIDS, "all", *TUNING],
        help="which grid, or all five ablations; tuning: snapshot FLH's alpha x share; tuning2: FLH2 and "
        "leader births at the best of tuning (default: all; with --summarize: every grid the sweep ran)",
    )
    p.add_argument("--seeds", type=common.positive_int, default=1, help="seeds per setting (default: 1)")
    p.add_argument(
        "--first-seed",
        type=common.nonneg_int,
        default=0,
        help="seeds first-seed .. first-seed + seeds - 1; tune on 100.. and report on 0.. (default: 0)",
    )
    p.add_argument(
        "--workers",
        type=runs.workers_arg,
        default=1,
        help="runs at a time on this machine, each with cores/N threads, at most 4 x cores (default: 1)",
    )
    p.add_argument(
        "--shard",
        type=runs.shard_arg,
        default=(1, 1),
        help="run only the i-th of n disjoint slices of the sweep, 1 <= i <= n, e.g. 2/4 (default: 1/1, all)",
    )
    p.add_argument(
        "--summarize",
        action="store_true",
        help="only build the summary from the runs that exist, with the settings the sweep recorded "
        "(sweep.json): only --run-name and --out are needed",
    )
    add_experiment_args(p)
    common.add_settings(p, AblationSettings, only=ABLATION_FLAGS)
    common.add_common_args(p, run_name="stage9")
    return p


def main(args):
    if args.test:
        return run_tests()
    apply_preset(args)
    grids = GRIDS if args.grid == "all" else [args.grid] if args.grid else None
    if args.summarize:
        return summarize(args, grids)
    grids = grids or GRIDS
    jobs = runs.shard(expand(grids, args), *args.shard)
    sweep = common.run_dir(args.out, args.run_name)
    runs.record_plan(sweep, sweep_plan(args, grids))
    print(
        f"{len(jobs)} runs (shard {args.shard[0]}/{args.shard[1]}) with {args.workers} worker(s) -> {sweep}"
    )
    with common.locked(sweep, f".lock-shard-{args.shard[0]}-of-{args.shard[1]}"):
        runs.run_jobs(run_one, jobs, args)
    if args.shard[1] > 1:
        return print("this shard is done; run with --summarize once every shard has finished")
    summarize(args, grids)


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
