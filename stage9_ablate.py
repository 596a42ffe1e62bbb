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
  train_mode  weighted_sum (the plan's: one step on CE(f(x; sum_i w_i p_i), y); Adam's
              per-parameter normalisation makes every prompt move at nearly the same rate whatever
              its weight), newest (only the newest prompt learns, on its own loss; older prompts stay
              as they were, so a recurring regime finds its old expert intact) and independent
              (FLH's original form: every prompt learns from its own loss; one batched forward of
              the K prompts gives all K losses, and one backward pass on their sum trains each
              prompt on its own loss, since d(sum_j l_j)/dp_i = dl_i/dp_i).
              In newest and independent mode the prediction logged as `acc` is FLH's mixture.
              Recovery is reported separately for first-time regimes and recurring ones.

The sweep: every (setting, seed) is one run folder, runs/<run-name>/<setting>/seed<s>/ with
log.jsonl and run.json (written last: a run with run.json is complete and is skipped, so a sweep
can be restarted). Settings equal to the base run (alpha 0.1, length 10, ...) are run once and
shared by the grids. --workers N runs N runs at a time (each with cores/N threads); --shard i/n
runs the i-th (1 <= i <= n) of n disjoint slices, for one job per machine:

    sbatch --array=1-4 --wrap "python stage9_ablate.py --grid all --seeds 3 --shard \\$SLURM_ARRAY_TASK_ID/4"
    python stage9_ablate.py --grid all --seeds 3 --summarize     # once all shards are done

Outputs in the sweep folder: summary.json, summary.md and one plot per grid (<grid>.png).
Run `--test` for the checks.
"""
import argparse
import json
import os
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon

import common
from stage3_backbone import forward_with_prompts
from stage4_pool import per_prompt_losses
from stage5_train import FLHLearner, accuracy, base_row, follow_pool, prepare, r6, run_stream, train_step
from stage7_metrics import compute_metrics, summary_table
from stage8_run import add_experiment_args, apply_preset

GRIDS = ["birth", "alpha", "length", "merge", "train_mode"]
ABLATION_DEFAULTS = dict(train_mode="weighted_sum", birth="fixed", merge="none")


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
        return {f"train_mode={m}": {"train_mode": m} for m in ("weighted_sum", "newest", "independent")}
    raise common.UserError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)} or all")


def run_key(overrides, args):
    """The folder name of a setting: what differs from the base run, or 'base'."""
    base = {**ABLATION_DEFAULTS, **vars(args)}
    diff = {k: v for k, v in sorted(overrides.items()) if base.get(k) != v}
    return ",".join(f"{k}={v}" for k, v in diff.items()) or "base"


def expand(grids, args, seeds):
    """All runs of a sweep, in a fixed order: [(key, overrides, seed)] without duplicates."""
    jobs = {}
    for grid in grids:
        for overrides in grid_settings(grid, args).values():
            for seed in range(seeds):
                jobs.setdefault((run_key(overrides, args), seed), overrides)
    return [(key, overrides, seed) for (key, seed), overrides in jobs.items()]


def shard(jobs, i, n):
    """The i-th of n disjoint slices (1 <= i <= n); their union is all jobs."""
    return jobs[i - 1::n]


# ----------------------------------------------------------------------------------------------
# FLH with the ablated parts
# ----------------------------------------------------------------------------------------------
class AblationLearner(FLHLearner):
    """FLHLearner + training modes, adaptive birth and merging (all off by default)."""

    def __init__(self, model, prompt_length, lr, alpha, birth_interval, prune="none", loss_batch=0,
                 train_mode="weighted_sum", birth="fixed", entropy_threshold=0.9, birth_gap=50,
                 merge="none", merge_every=50, merge_window=10, merge_cos=0.95, merge_js=0.01, history=100):
        super().__init__(model, prompt_length, lr, alpha, birth_interval, prune, loss_batch=loss_batch)
        if train_mode not in ("weighted_sum", "newest", "independent"):
            raise common.UserError(f"unknown train mode {train_mode!r}")
        self.train_mode, self.birth, self.merge = train_mode, birth, merge
        self.entropy_threshold, self.birth_gap = entropy_threshold, birth_gap
        self.merge_every, self.merge_window, self.merge_cos, self.merge_js = merge_every, merge_window, merge_cos, merge_js
        self.last_entropy, self.last_birth = None, None
        self.losses = {}   # birth id -> deque of its last `history` batch losses
        self.probs = {}    # birth id -> deque of (step, its predictive distribution [B, C]) on recent batches
        self.history = history

    def should_birth(self, step):
        if self.birth == "fixed":
            return step % self.birth_interval == 0
        if self.last_birth is None:
            return True
        high = self.last_entropy is not None and self.last_entropy > self.entropy_threshold
        return high and step - self.last_birth >= self.birth_gap

    def step(self, batch):
        model, pool, s, y = self.model, self.pool, batch["step"], batch["labels"]
        if self.should_birth(s):
            added, removed = pool.birth_prompt()
            follow_pool(self.optimizer, added, removed + [self._placeholder])
            self.last_birth = s
        weights, entropy = pool.weights, pool.entropy()
        if self.train_mode == "independent":  # one pass with gradients: K losses, each trains its own prompt
            logits = forward_with_prompts(model, batch, pool.stacked())
            losses = per_prompt_losses(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            losses.sum().backward()
            self.optimizer.step()
            expert_losses, expert_logits = losses.detach(), logits.detach()
        else:
            expert_losses, expert_logits, _ = self.score_experts(batch)
            prompt = pool.get_prompt("weighted_sum") if self.train_mode == "weighted_sum" else pool.prompts[-1]
            loss, logits = train_step(model, prompt, self.optimizer, batch)
        y_sub = y[:expert_logits.shape[1]]
        mixture = pool.mixture_probs(expert_logits)
        mixture_loss = F.nll_loss(mixture.clamp_min(1e-12).log(), y_sub)
        if self.train_mode != "weighted_sum":
            loss, logits = mixture_loss.item(), mixture  # FLH's own prediction
        self.last_entropy = float(-(mixture * mixture.clamp_min(1e-12).log()).sum(-1).mean()) / np.log(mixture.shape[-1])
        pool.update_weights(expert_losses)
        self.remember(expert_losses, expert_logits, s)
        row = {**base_row(batch if self.train_mode == "weighted_sum" else {**batch, "labels": y_sub}, loss, logits),
               "acc_mixture": r6(accuracy(mixture, y_sub)), "mixture_loss": r6(mixture_loss),
               "weights": r6(weights), "prompt_ids": list(pool.birth_ids), "expert_losses": r6(expert_losses.tolist()),
               "num_prompts": len(pool), "entropy": r6(entropy), "prediction_entropy": r6(self.last_entropy)}
        merged = self.maybe_merge(s)
        if merged:
            row["merged"] = merged
        return row

    def remember(self, losses, logits, step):
        live = set(self.pool.birth_ids)
        for d in (self.losses, self.probs):
            for gone in set(d) - live:
                del d[gone]
        probs = logits.softmax(-1).cpu().numpy()
        for i, j in enumerate(self.pool.birth_ids):
            self.losses.setdefault(j, deque(maxlen=self.history)).append(float(losses[i]))
            self.probs.setdefault(j, deque(maxlen=self.merge_window)).append((step, probs[i]))

    def merge_scores(self):
        """[(score, a, b)] for every eligible pair of pool indices; higher score = more alike."""
        ids, out = self.pool.birth_ids, []
        old = [i for i, j in enumerate(ids) if len(self.losses.get(j, ())) >= self.merge_window]
        flat = F.normalize(self.pool.stacked().detach().flatten(1), dim=1)
        for x, a in enumerate(old):
            for b in old[x + 1:]:
                if self.merge == "param":
                    out.append((float(flat[a] @ flat[b]), a, b))
                else:
                    pa, pb = dict(self.probs[ids[a]]), dict(self.probs[ids[b]])
                    common_steps = sorted(set(pa) & set(pb))
                    p = np.concatenate([pa[t] for t in common_steps])
                    q = np.concatenate([pb[t] for t in common_steps])
                    js = np.nan_to_num(jensenshannon(p, q, base=2, axis=-1)) ** 2  # nan: rounding below 0
                    out.append((-float(js.mean()), a, b))
        return out

    def maybe_merge(self, step):
        """Merge the most alike eligible pair if alike enough; returns the logged event or None."""
        if self.merge == "none" or step % self.merge_every or len(self.pool) < 2:
            return None
        scores = self.merge_scores()
        if not scores:
            return None
        score, a, b = max(scores)
        if (self.merge == "param" and score <= self.merge_cos) or (self.merge == "js" and -score >= self.merge_js):
            return None
        pool, w = self.pool, self.pool.log_w.exp()
        event = {"kept": pool.birth_ids[a], "removed": pool.birth_ids[b], "score": r6(abs(score)),
                 "weights": r6([w[a], w[b]]), "recent_loss": r6([np.mean(self.losses[pool.birth_ids[i]]) for i in (a, b)])}
        with torch.no_grad():
            pa, pb = pool.prompts[a], pool.prompts[b]
            pa.copy_((w[a].item() * pa + w[b].item() * pb) / (w[a] + w[b]).item())
        pool.log_w[a] = torch.logaddexp(pool.log_w[a], pool.log_w[b])
        self.optimizer.state.pop(pool.prompts[a], None)  # its Adam moments belong to neither parent
        removed = pool._remove([i for i in range(len(pool)) if i != b])
        follow_pool(self.optimizer, removed=removed)
        return event


# ----------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------
def ablation_args(args, overrides, seed):
    """The argparse namespace of one run: the sweep's flags, the setting's overrides, the seed."""
    return argparse.Namespace(**{**ABLATION_DEFAULTS, **vars(args), **overrides, "seed": seed})


def run_one(job, args, threads):
    """One (setting, seed) run into its folder; skipped when run.json says it is complete."""
    key, overrides, seed = job
    folder = Path(args.out) / args.run_name / key / f"seed{seed}"
    if (folder / "run.json").exists():
        return key, seed, "skipped"
    torch.set_num_threads(threads)
    a = ablation_args(args, overrides, seed)
    model, stream = prepare(a)
    learner = AblationLearner(model, a.prompt_length, a.lr, a.alpha, a.birth_interval, a.prune, a.loss_batch,
                              a.train_mode, a.birth, a.entropy_threshold, a.birth_gap or (a.flip_interval or a.steps_per_domain) // 4,
                              a.merge, a.merge_every or a.birth_interval, a.merge_window, a.merge_cos, a.merge_js)
    folder.mkdir(parents=True, exist_ok=True)
    common.write_json(folder / "config.json", vars(a))
    (folder / "log.jsonl").unlink(missing_ok=True)  # a run cut short starts over
    log = common.JsonlLog(folder / "log.jsonl")
    t0 = time.time()
    run_stream(learner, stream, a.steps, log, desc=f"{key} seed{seed}")
    log.close()
    common.write_json(folder / "run.json", {"key": key, "seed": seed, "wall_seconds": round(time.time() - t0, 1),
                                            "threads": threads, "steps": a.steps})
    return key, seed, f"{time.time() - t0:.0f}s"


def _worker(payload):
    return run_one(*payload)


def run_sweep(jobs, args):
    """Run the jobs, `args.workers` at a time, each worker with cores/workers threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, cores // args.workers)
    payloads = [(job, args, threads) for job in jobs]
    bar = common.progress(total=len(jobs), desc="runs")
    if args.workers == 1:
        results = []
        for p in payloads:
            results.append(_worker(p))
            bar.update()
    else:
        import multiprocessing
        with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for r in pool.map(_worker, payloads):
                results.append(r)
                bar.update()
    bar.close()
    for key, seed, what in results:
        print(f"  {key} seed{seed}: {what}")


# ----------------------------------------------------------------------------------------------
# Summary: tables and plots from whatever runs exist
# ----------------------------------------------------------------------------------------------
def recovery_by_kind(rows, threshold, recovery_window, flip_interval):
    """Mean recovery time over first-time regimes and over recurring ones (None: none recovered)."""
    def state(r):
        return r["domain"], (r["step"] // flip_interval) % 2 if flip_interval else 0
    seen, kinds = {state(rows[0])}, {}
    rec = compute_metrics(rows, threshold, len(rows), recovery_window)["recovery"]
    by_step = {r["step"]: r for r in rows}
    for shift in rec:
        s = state(by_step[shift["shift"]])
        kind = "recurring" if s in seen else "first"
        seen.add(s)
        kinds.setdefault(kind, []).append(shift)
    return {kind: {"recovered": sum(x["recovered"] for x in v), "shifts": len(v),
                   "mean_steps": float(np.mean([x["steps"] for x in v if x["recovered"]]))
                   if any(x["recovered"] for x in v) else None} for kind, v in kinds.items()}


def summarize(args, grids):
    """summary.json, summary.md and <grid>.png in the sweep folder, from the runs found there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sweep = Path(args.out) / args.run_name
    summary, md = {}, [f"# Stage 9 sweep `{args.run_name}`", ""]
    for grid in grids:
        per_seed, extra = {}, {}
        for label, overrides in grid_settings(grid, args).items():
            for run in sorted((sweep / run_key(overrides, args)).glob("seed*/run.json")):
                cfg = common.read_json(run.parent / "config.json")
                rows = common.read_jsonl(run.parent / "log.jsonl")
                m = compute_metrics(rows, cfg["recovery_threshold"], cfg["window"])
                m["mean_accuracy_mixture"] = float(np.mean([r["acc_mixture"] for r in rows]))
                m["merges"] = sum(1 for r in rows if "merged" in r)
                m["mean_prompts"] = float(np.mean([r["num_prompts"] for r in rows]))
                m["by_kind"] = recovery_by_kind(rows, cfg["recovery_threshold"], 50, cfg["flip_interval"])
                per_seed.setdefault(cfg["seed"], {})[label] = m
        labels = [lab for lab in grid_settings(grid, args) if all(lab in s for s in per_seed.values())]
        runs = [{lab: s[lab] for lab in labels} for s in per_seed.values()]
        if not runs or not labels:
            md += [f"## {grid}", "", "no complete runs yet", ""]
            continue
        table, stats = summary_table(runs)
        for lab in labels:
            for key in ("mean_accuracy_mixture", "merges", "mean_prompts"):
                vals = [r[lab][key] for r in runs]
                stats[lab][key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
            for kind in ("first", "recurring"):
                got = [r[lab]["by_kind"].get(kind) for r in runs if kind in r[lab]["by_kind"]]
                times = [g["mean_steps"] for g in got if g["mean_steps"] is not None]
                stats[lab][f"recovery_{kind}"] = {"recovered": sum(g["recovered"] for g in got),
                                                  "shifts": sum(g["shifts"] for g in got),
                                                  "mean_steps": float(np.mean(times)) if times else None}
            extra[lab] = stats[lab]
        summary[grid] = {"seeds": len(runs), "settings": stats}
        md += [f"## {grid} ({len(runs)} seed{'s' * (len(runs) > 1)})", "", table.replace("| method |", "| setting |"), ""]
        md += ["| setting | mixture acc | prompts (mean) | merges | first-time regimes: recovered, steps "
               "| recurring regimes: recovered, steps |", "|---|---|---|---|---|---|"]
        for lab, st in extra.items():
            kinds = []
            for kind in ("first", "recurring"):
                k = st[f"recovery_{kind}"]
                kinds.append(f"{k['recovered']}/{k['shifts']}, " + ("never" if k["mean_steps"] is None else f"{k['mean_steps']:.0f}"))
            md.append(f"| {lab} | {st['mean_accuracy_mixture']['mean']:.3f} | {st['mean_prompts']['mean']:.1f} "
                      f"| {st['merges']['mean']:.1f} | {kinds[0]} | {kinds[1]} |")
        md.append("")
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
        x = np.arange(len(labels))
        for key, name, fmt in (("mean_accuracy", "mean acc", "o-"), ("windowed_accuracy", "windowed acc", "s--"),
                               ("mean_accuracy_mixture", "mixture acc", "^:")):
            ax[0].errorbar(x, [stats[lab][key]["mean"] for lab in labels], [stats[lab][key]["std"] for lab in labels],
                           fmt=fmt, capsize=3, label=name)
        for j, (kind, color, name) in enumerate((("first", "tab:blue", "first-time regimes"),
                                                 ("recurring", "tab:orange", "recurring regimes"))):
            rec = [stats[lab][f"recovery_{kind}"] for lab in labels]
            xs = x + (j - 0.5) * 0.38
            ax[1].bar(xs, [r["mean_steps"] or 0 for r in rec], 0.36, color=color, label=name)
            for xi, r in zip(xs, rec):  # a shift never recovered has no time: say so, draw no bar
                text = f"{r['recovered']}/{r['shifts']}" if r["mean_steps"] is not None else f"never\n0/{r['shifts']}"
                ax[1].annotate(text, (xi, r["mean_steps"] or 0), ha="center", va="bottom", fontsize=7)
        for a in ax:
            a.set_xticks(x, [lab.split("=", 1)[1] for lab in labels])
            a.set_xlabel(grid)
        ax[0].set_ylabel("prequential accuracy")
        ax[0].legend(fontsize=8)
        ax[1].set_ylim(0, max(10, ax[1].get_ylim()[1] * 1.15))
        ax[1].set_ylabel("mean recovery time (steps)")
        ax[1].legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False,
                     title="labels: shifts recovered, over seeds", title_fontsize=8)
        fig.suptitle(f"{grid}: mean ± std over {len(runs)} seed(s)")
        fig.tight_layout()
        fig.savefig(sweep / f"{grid}.png", dpi=110)
        plt.close(fig)
    common.write_json(sweep / "summary.json", summary)
    (sweep / "summary.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"-> {sweep}/summary.json, summary.md and one PNG per grid")
    return summary


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def run_tests():
    import tempfile
    from stage3_backbone import load_backbone
    from stage2_stream import TextStream
    from stage3_backbone import load_tokenizer
    t0 = time.time()
    args = apply_preset(build_parser().parse_args([]))
    sizes = {g: len(grid_settings(g, args)) for g in GRIDS}
    assert sizes == {"birth": 4, "alpha": 4, "length": 4, "merge": 3, "train_mode": 3}, sizes
    assert [o.get("birth_interval") for o in grid_settings("birth", args).values()] == [100, 200, 400, None]
    jobs = expand(GRIDS, args, seeds=2)
    assert len(jobs) == 2 * (18 - 4), len(jobs)  # the base setting appears in all five grids, run once
    parts = [shard(jobs, i, 3) for i in (1, 2, 3)]
    assert sorted(j for p in parts for j in p) == sorted(jobs) and sum(map(len, parts)) == len(jobs)
    print(f"  ok: the grids expand to {sizes}; {len(jobs)} distinct runs for 2 seeds; 3 shards are disjoint and cover them")

    torch.manual_seed(0)
    model, _ = load_backbone("random:tiny-bert")
    tok = load_tokenizer("minilm")
    stream = TextStream(common.load_text_data("rt"), tok, batch_size=4, max_length=24, flip_every_n=None, seed=0)

    # Merging: two identical prompts (same tensors, same predictions) merge, weights summed; two
    # distinct ones (opposite tensors, opposite predictions) stay apart.
    for merge in ("param", "js"):
        for same in (True, False):
            learner = AblationLearner(model, 3, 1e-2, 0.1, 10 ** 9, merge=merge, merge_every=1, merge_window=2)
            for _ in range(2):
                added, removed = learner.pool.birth_prompt()
                follow_pool(learner.optimizer, added, removed + [learner._placeholder])
            logits = torch.tensor([[2.0, -2.0], [-1.0, 1.0]]).expand(2, 2, 2).clone()  # [K, B, C]
            with torch.no_grad():
                learner.pool.prompts[1].copy_(learner.pool.prompts[0] * (1 if same else -1))
            if not same:
                logits[1] = -logits[1]
            for s in (1, 2):
                learner.remember(torch.tensor([0.5, 0.7]), logits, s)
            event = learner.maybe_merge(2)
            assert (event is not None) == same and len(learner.pool) == (1 if same else 2), (merge, same, event)
            assert abs(sum(learner.pool.weights) - 1) < 1e-12 and len(learner.optimizer.param_groups) == len(learner.pool)
    print("  ok: param and js merging merge two identical prompts (weights summed) and leave two distinct ones")

    # independent: one backward on the sum gives every prompt the gradient of its own loss.
    learner = AblationLearner(model, 3, 1e-2, 0.1, 10 ** 9, train_mode="independent")
    for _ in range(3):
        learner.pool.birth_prompt()
    b = stream.batch(5)
    losses = per_prompt_losses(forward_with_prompts(model, b, learner.pool.stacked()), b["labels"])
    losses.sum().backward()
    together = [p.grad.clone() for p in learner.pool.prompts]
    for i, p in enumerate(learner.pool.prompts):
        learner.pool.zero_grad()
        own = per_prompt_losses(forward_with_prompts(model, b, p[None]), b["labels"])
        own.sum().backward()
        assert torch.allclose(p.grad, together[i], atol=1e-6), (i, (p.grad - together[i]).abs().max())
    print("  ok: independent mode: each prompt's gradient equals that of its own loss, from one backward pass")

    # newest: only the newest prompt moves.
    learner = AblationLearner(model, 3, 1e-1, 0.1, 2, train_mode="newest")
    learner.step(stream.batch(0) | {"step": 0})
    learner.step(stream.batch(1) | {"step": 1})
    before = [p.detach().clone() for p in learner.pool.prompts]
    learner.step(stream.batch(2) | {"step": 2})   # a birth, then a step
    after = learner.pool.prompts
    assert torch.equal(before[0], after[0]) and not torch.equal(after[1], before[0]) and len(after) == 2
    print("  ok: newest mode trains the newest prompt only")

    # Adaptive birth: fires when the last batch's prediction entropy is high, never within the gap.
    learner = AblationLearner(model, 3, 1e-2, 0.1, 10 ** 9, birth="adaptive", entropy_threshold=0.5, birth_gap=5)
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

    # A tiny sweep: runs, skips finished runs when restarted, and summarises them correctly.
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--grid", "alpha", "--backbone", "random:tiny-bert", "--steps", "12", "--flip-interval", "4",
                "--birth-interval", "3", "--batch-size", "2", "--max-length", "16", "--prompt-length", "2",
                "--out", tmp, "--run-name", "sw"]
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
        assert [s[f"alpha={x}"]["mean_accuracy"]["mean"] for x in (0.01, 0.1, 0.5, 1.0)] == [0.25, 0.5, 0.75, 1.0]
        assert s["alpha=0.5"]["mean_accuracy_mixture"]["mean"] == 0.375
        assert Path(tmp, "sw", "alpha.png").stat().st_size > 0
    print("  ok: a tiny sweep runs 4 settings, a restart skips them, the summary of known logs is right")
    print(f"stage 9 checks passed in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def shard_arg(text):
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected i/n such as 1/4, got {text!r}")
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"need 1 <= i <= n, got {text}")
    return i, n


def build_parser():
    p = common.Parser(description="Stage 9: ablation grids over the stage 8 FLH run (several seeds, workers, shards).")
    p.add_argument("--grid", default="all", choices=[*GRIDS, "all"], help="which grid, or all five (default: all)")
    p.add_argument("--seeds", type=common.positive_int, default=1, help="seeds 0..N-1 per setting (default: 1)")
    p.add_argument("--workers", type=common.positive_int, default=1,
                   help="runs at a time on this machine, each with cores/N threads (default: 1)")
    p.add_argument("--shard", type=shard_arg, default=(1, 1),
                   help="run only the i-th of n disjoint slices of the sweep, 1 <= i <= n, e.g. 2/4 (default: 1/1, all)")
    p.add_argument("--summarize", action="store_true", help="only build the summary from the runs that exist")
    add_experiment_args(p)
    p.add_argument("--entropy-threshold", type=common.nonneg_float, default=0.9,
                   help="adaptive birth: mean prediction entropy, as a fraction of log C, that calls a birth (default: 0.9)")
    p.add_argument("--birth-gap", type=common.positive_int, default=None,
                   help="adaptive birth: fewest steps between births (default: flip interval / 4)")
    p.add_argument("--merge-every", type=common.positive_int, default=None,
                   help="steps between merge checks (default: the birth interval)")
    p.add_argument("--merge-window", type=common.positive_int, default=10,
                   help="recent batches compared by js merging; prompts younger than this are not merged (default: 10)")
    p.add_argument("--merge-cos", type=common.nonneg_float, default=0.95,
                   help="param merging: cosine similarity above which a pair merges (default: 0.95)")
    p.add_argument("--merge-js", type=common.nonneg_float, default=0.01,
                   help="js merging: mean Jensen-Shannon divergence (bits) below which a pair merges (default: 0.01)")
    common.add_common_args(p, run_name="stage9")
    return p


def main(args):
    if args.test:
        return run_tests()
    apply_preset(args)
    grids = GRIDS if args.grid == "all" else [args.grid]
    if not args.summarize:
        jobs = shard(expand(grids, args, args.seeds), *args.shard)
        print(f"{len(jobs)} runs (shard {args.shard[0]}/{args.shard[1]}) with {args.workers} worker(s) "
              f"-> {Path(args.out) / args.run_name}")
        run_sweep(jobs, args)
        if args.shard[1] > 1:
            return print("this shard is done; run with --summarize once every shard has finished")
    summarize(args, grids)


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
