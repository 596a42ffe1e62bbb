"""Stage 7: metrics and plots, computed from the JSON logs alone.

Everything here reads `log.jsonl` files (one row per step, written by stages 5, 6 and 8), so the
numbers of any old run can be recomputed: `python stage7_metrics.py runs/<name>`.

Metrics. Let a_s be the prequential accuracy of step s, and c a shift (the first step of a new
regime). A shift is *first-time* if its concept (stage 2: which rule is active) has not been
active before, *recurring* if it has: only at a recurring shift can a memory of the past help.
  accuracy_over_time   (s, a_s) for every step; plots smooth it with a trailing window.
  mean_accuracy        mean of a_s over the whole run: the area under the accuracy curve.
  adaptive_regret      *the plan's name* for the mean accuracy over the last N steps (N=500 in the
                       plan, `--window` here). It is a windowed accuracy, not a regret; the name is
                       kept for the plan's readers and the same number is also `windowed_accuracy`.
  true_adaptive_regret FLH's actual guarantee (Hazan & Seshadhri 2009): the largest, over windows
                       I of N steps, of  sum_{s in I} loss_s(method) - min_i sum_{s in I} loss_s(expert i),
                       over experts alive throughout I (FLH runs only: they log every expert's loss).
  recovery_time        for each shift c: the number of steps n until the trailing mean of a over
                       [c+n-w, c+n) first reaches the threshold (default 0.8), with a window of w=50
                       steps lying inside the new regime (so n >= w). A shift whose regime ends first
                       is *not recovered* (censored): reported as null with `recovered: false`,
                       never as a number that looks like a success.
  weight_entropy       -sum_i w_i log w_i per step (log K for uniform weights over K prompts).
  first50              per shift, the mean of a_s over its first 50 steps: how well a method does
                       right after the rules change, before it could relearn much. Reported for
                       first-time and recurring shifts apart (recovery time too).
  switch_time          (FLH logs) per recurring shift c: steps n until more than half of the weight
                       that predicts step c+n sits on experts made during an earlier visit of c's
                       concept. An expert belongs to the step before the next prompt's birth (the
                       next birth id's first row): in snapshot mode that is the last step it learned
                       from, when it was frozen. (Its own birth step would mislabel a prompt born
                       just before a shift and frozen after it; in the other modes every prompt
                       keeps learning, and the switch time only says where the weight goes.)
                       For `leader` all the weight sits on the expert it chose.
                       Censored (null) if it never happens within the regime.
  paired differences   over several runs (seeds) of the same stream: per shift, a method's first50
                       minus the single prompt's (and the leader's) on the same shift, with a 95%
                       bootstrap interval over the shifts (10,000 resamples), and run by run (the
                       mean over one run's shifts): the pooled interval treats shifts as independent,
                       the per-run column shows whether every seed agrees.

Plots: accuracy vs step for every method with the shifts marked; FLH's weight heat-map (prompt,
by birth, x step); recovery-time bars per method; live prompts vs step; first-50 accuracy after
first-time and recurring shifts per method.

Run `python stage7_metrics.py RUN [RUN ...]` (several runs, e.g. seeds, are also summarised
together), `--test` for the checks on synthetic logs with known answers.
"""

import argparse
import contextlib
import gzip
import io
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import common  # noqa: E402

COLORS = {
    "flh": "tab:red",
    "flh_sum": "tab:orange",
    "leader": "tab:brown",
    "oracle": "black",
    "single": "tab:blue",
    "reset": "tab:olive",
    "random": "tab:green",
    "similarity": "tab:purple",
    "detect": "tab:cyan",
    # variants of FLH that a results folder holds beside it (flh_<variant>)
    "flh_today": "tab:pink",
    "flh_fixed_share": "darkred",
    "flh_mpp": "goldenrod",
}  # any other method: gray
KINDS = ("first", "recurring")


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------
def shifts(rows):
    """Steps at which the regime changes (the first step of each new regime)."""
    return [b["step"] for a, b in zip(rows, rows[1:]) if b["regime"] != a["regime"]]


def trailing_mean(x, w):
    """Mean of the last min(w, s+1) values at every s."""
    c = np.cumsum(np.insert(np.asarray(x, float), 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), w)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


@dataclass(frozen=True)
class MetricSettings(common.Settings):
    """What counts as recovered, and over how many steps accuracy is averaged: declared once (the
    defaults are the plan's; stage 8's presets set their own)."""

    recovery_threshold: float = common.setting(
        0.8, common.accuracy_arg, "accuracy that counts as recovered, in (0, 1]"
    )
    recovery_window: int = common.setting(
        50, common.positive_int, "steps in the rolling accuracy for recovery"
    )
    window: int = common.setting(500, common.positive_int, "N of the windowed accuracy / adaptive regret")


def recovery_times(rows, threshold, window):
    """Per shift: steps until the `window`-step accuracy inside the new regime reaches `threshold`."""
    acc = np.array([r["acc"] for r in rows], float)
    steps = [r["step"] for r in rows]
    cuts = shifts(rows)
    out = []
    for i, c in enumerate(cuts):
        start = steps.index(c)
        end = steps.index(cuts[i + 1]) if i + 1 < len(cuts) else len(rows)
        seg = acc[start:end]
        hit = None
        if len(seg) >= window:
            means = np.convolve(seg, np.ones(window) / window, mode="valid")  # means[j] = mean seg[j:j+w]
            reached = np.flatnonzero(means >= threshold - 1e-12)
            hit = int(reached[0] + window) if len(reached) else None
        out.append(
            {"shift": c, "steps": hit, "recovered": hit is not None, "regime_length": int(end - start)}
        )
    return out


def true_adaptive_regret(rows, window, loss_key="mixture_loss"):
    """max over N-step windows of (method loss - best expert's loss), experts alive throughout."""
    if not rows or "expert_losses" not in rows[0] or len(rows) < window:
        return None
    T = len(rows)
    ids = sorted({i for r in rows for i in r["prompt_ids"]})
    pos = {i: k for k, i in enumerate(ids)}
    L = np.zeros((len(ids), T))
    alive = np.zeros((len(ids), T))
    for s, r in enumerate(rows):
        for i, loss in zip(r["prompt_ids"], r["expert_losses"]):
            L[pos[i], s], alive[pos[i], s] = loss, 1

    def window_sums(x):
        c = np.concatenate([np.zeros(x.shape[:-1] + (1,)), np.cumsum(x, -1)], -1)
        return c[..., window:] - c[..., :-window]

    method = window_sums(np.array([r[loss_key] for r in rows], float))
    experts = np.where(window_sums(alive) == window, window_sums(L), np.inf)
    best = experts.min(0)
    valid = np.isfinite(best)
    return float((method[valid] - best[valid]).max()) if valid.any() else None


def predicting_weights(r):
    """The weight each expert has in step r's prediction: FLH's weights, or for the `leader` baseline
    (whose log also carries the pool's FLH weights) all of it on the expert it chose."""
    if "leader" in r:
        return [float(j == r["leader"]) for j in r["prompt_ids"]]
    return r["weights"]


def shift_details(rows, recovery, first=50):
    """Per shift: its concept, kind (first-time or recurring), first-`first`-step accuracy, recovery
    (from `recovery`, one entry per shift) and, for FLH logs, the switch time."""
    acc = np.array([r["acc"] for r in rows], float)
    first_row = {}  # birth id -> index of the first row it appears in
    for k, r in enumerate(rows):
        for j in r.get("prompt_ids", ()):
            first_row.setdefault(j, k)
    ids = sorted(first_row)  # an expert stopped learning alone when the next one was born: (step, concept)
    frozen = {
        j: (rows[first_row[n] - 1]["step"], rows[first_row[n] - 1]["concept"]) for j, n in zip(ids, ids[1:])
    }
    seen, out = {rows[0]["concept"]: 1}, []  # concept -> regimes of it so far
    for rec in recovery:
        start = next(k for k, r in enumerate(rows) if r["step"] == rec["shift"])
        end = start + rec["regime_length"]
        concept = rows[start]["concept"]
        d = {
            "shift": rec["shift"],
            "concept": concept,
            "kind": "recurring" if concept in seen else "first",
            "visit": seen.get(concept, 0),  # 0: first time; n: the n-th time the rule comes back
            "first50": float(acc[start : min(end, start + first)].mean()),
            "recovery": rec["steps"],
        }
        seen[concept] = seen.get(concept, 0) + 1
        if d["kind"] == "recurring" and "weights" in rows[0]:
            d["switch"] = None
            for n, r in enumerate(rows[start:end]):
                old = sum(
                    w
                    for j, w in zip(r["prompt_ids"], predicting_weights(r))
                    if j in frozen and frozen[j][0] < rec["shift"] and frozen[j][1] == concept
                )
                if old > 0.5:
                    d["switch"] = n
                    break
        out.append(d)
    return out


def by_kind(details):
    """Means over first-time and over recurring shifts: first50, recovery (recovered/shifts) and switch."""
    out = {}
    for kind in KINDS:
        ds = [d for d in details if d["kind"] == kind]
        if not ds:
            continue
        rec = [d["recovery"] for d in ds if d["recovery"] is not None]
        out[kind] = {
            "shifts": len(ds),
            "first50": float(np.mean([d["first50"] for d in ds])),
            "recovered": len(rec),
            "mean_recovery": float(np.mean(rec)) if rec else None,
        }
        if "switch" in ds[0]:
            sw = [d["switch"] for d in ds if d["switch"] is not None]
            out[kind].update(switched=len(sw), mean_switch=float(np.mean(sw)) if sw else None)
    return out


def bootstrap_interval(x, resamples=10_000, seed=0):
    """95% percentile-bootstrap interval of the mean of x (resampling its items)."""
    x = np.asarray(x, float)
    if len(x) < 2:
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), (resamples, len(x)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def methods_of(per_run):
    """Every method of several runs, in the order of first appearance (runs may hold different ones)."""
    return list(dict.fromkeys(m for run in per_run for m in run))


def first50_summary(per_run, baselines=("single", "leader")):
    """Over runs of the same stream ({method: metrics} each): per method and kind, the first50 mean over
    all (run, shift) pairs with a bootstrap interval, and the paired difference to each baseline on
    the runs that hold both (against `leader`: what FLH's weighting adds to keeping snapshots)."""
    out = {}
    for m in methods_of(per_run):
        out[m] = {}
        for kind in KINDS:
            mine = [d for run in per_run if m in run for d in run[m]["shift_details"] if d["kind"] == kind]
            if not mine:
                continue
            x = [d["first50"] for d in mine]
            rec = [d["recovery"] for d in mine if d["recovery"] is not None]
            out[m][kind] = {
                "n": len(x),
                "mean": float(np.mean(x)),
                "ci": bootstrap_interval(x),
                "recovery": {"recovered": len(rec), "mean": float(np.mean(rec)) if rec else None},
            }
            for baseline in baselines:
                runs = [  # one list of paired differences per run (None where it lacks either method)
                    [
                        d["first50"] - b["first50"]
                        for d, b in zip(run[m]["shift_details"], run[baseline]["shift_details"])
                        if d["kind"] == kind
                    ]
                    if m != baseline and m in run and baseline in run
                    else None
                    for run in per_run
                ]
                diff = [x for r in runs if r for x in r]
                if diff:
                    out[m][kind]["minus_" + baseline] = {
                        "n": len(diff),
                        "mean": float(np.mean(diff)),
                        "ci": bootstrap_interval(diff),
                        "per_run": [float(np.mean(r)) if r else None for r in runs],
                    }
            if kind == "recurring" and "switch" in mine[0]:
                done = [d["switch"] for d in mine if d["switch"] is not None]
                out[m][kind]["switch"] = {
                    "switched": len(done),
                    "shifts": len(mine),
                    "mean": float(np.mean(done)) if done else None,
                }
    return out


def first50_table(summary, baselines=("single", "leader")):
    """Markdown: first-50 accuracy after recurring and first-time shifts per method, with intervals,
    and the paired differences to each baseline present; recovery (mean steps over the shifts that
    recovered, recovered/shifts) and the switch time."""

    def steps(mean, done, shifts):  # "75 steps (4/5)", or "never (0/5)" when none got there
        if mean is None:
            return f"never (0/{shifts})"
        return f"{mean:.0f} {'step' if round(mean) == 1 else 'steps'} ({done}/{shifts})"

    def cell(v):
        if v is None:
            return "-"
        ci = f" [{v['ci'][0]:.3f}, {v['ci'][1]:.3f}]" if v.get("ci") else ""
        return f"{v['mean']:.3f}{ci}"

    baselines = [b for b in baselines if b in summary]
    head = ["method"]
    for kind, name in (("recurring", "recurring"), ("first", "first-time")):
        head += [f"first-50 acc, {name}", *(f"minus {b}, {name}" for b in baselines)]
    lines = [
        "| "
        + " | ".join([*head, "recovery, recurring", "recovery, first-time", "switch time (recurring)"])
        + " |",
        "|---" * (len(head) + 3) + "|",
    ]
    for m, k in summary.items():
        rec, fst = k.get("recurring", {}), k.get("first", {})
        sw = rec.get("switch")
        cells = [m]
        for v in (rec, fst):
            cells += [cell(v or None), *(cell(v.get("minus_" + b)) for b in baselines)]
        cells += [
            steps(v["recovery"]["mean"], v["recovery"]["recovered"], v["n"]) if v else "-" for v in (rec, fst)
        ]
        cells.append(steps(sw["mean"], sw["switched"], sw["shifts"]) if sw else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_visit(per_run, methods=("flh", "oracle", "single")):
    """First-50 accuracy by visit: for each method, over all runs' shifts whose rule comes back for
    the n-th time (n = 0: a rule never seen), the mean with a 95% bootstrap interval over the shifts.
    Does the gap to the oracle close as later visits find better snapshots, or grow as the cap
    forces old ones out?"""
    out = {}
    for m in [m for m in methods if any(m in run for run in per_run)]:
        details = [d for run in per_run if m in run for d in run[m]["shift_details"]]
        out[m] = {
            v: {"n": len(x), "mean": float(np.mean(x)), "ci": bootstrap_interval(x)}
            for v in sorted({d["visit"] for d in details})
            for x in [[d["first50"] for d in details if d["visit"] == v]]
        }
    return out


def visit_table(visits):
    """Markdown: one row per method, one column per visit number."""
    cols = sorted({v for m in visits.values() for v in m})
    name = lambda v: "first time" if v == 0 else f"return {v}"  # noqa: E731
    lines = ["| method | " + " | ".join(name(v) for v in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for m, per in visits.items():
        cells = []
        for v in cols:
            x = per.get(v)
            ci = f" [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]" if x and x["ci"] else ""
            cells.append(f"{x['mean']:.3f}{ci} (n={x['n']})" if x else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_visits(visits, path, title=None):
    """First-50 accuracy against the visit number, one line per method (whiskers: 95% bootstrap)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for j, (m, per) in enumerate(visits.items()):
        vs = sorted(per)
        x = np.array(vs) + (j - (len(visits) - 1) / 2) * 0.06  # a little apart, so whiskers do not hide
        means = np.array([per[v]["mean"] for v in vs])
        err = np.array(
            [
                [per[v]["mean"] - per[v]["ci"][0], per[v]["ci"][1] - per[v]["mean"]]
                if per[v]["ci"]
                else [0, 0]
                for v in vs
            ]
        )
        ax.errorbar(x, means, err.T, marker="o", ms=4, capsize=3, lw=1.2, label=m)
    ax.axhline(0.5, color="0.3", lw=0.6, ls=":")
    ticks = sorted({v for per in visits.values() for v in per})
    ax.set_xticks(ticks, ["first\ntime" if v == 0 else f"return\n{v}" for v in ticks])
    ax.set(
        ylim=(0, 1), ylabel="accuracy over a shift's first 50 steps", title=title or "by visit of the concept"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_loss_table(per_run, names):
    """Markdown: each method's mean log loss run by run, and the mean over the runs that hold it."""
    lines = ["| method | " + " | ".join(names) + " | mean |", "|---" * (len(names) + 2) + "|"]
    for m in methods_of(per_run):
        vals = [run[m].get("mean_log_loss") if m in run else None for run in per_run]
        cells = ["-" if v is None else f"{v:.4f}" for v in vals]
        got = [v for v in vals if v is not None]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {np.mean(got):.4f} |" if got else "")
    return "\n".join(line for line in lines if line)


def per_run_table(summary, names, baseline="single"):
    """Markdown: each method's paired first-50 difference to `baseline` run by run (the mean over that
    run's shifts of each kind), so a reader sees whether every seed agrees with the pooled interval."""
    kinds = (("recurring", "recurring"), ("first", "first-time"))
    head = [f"minus {baseline}", *(f"{n}, {name}" for _, name in kinds for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for m, k in summary.items():
        cells = [
            "-" if v is None else f"{v:+.3f}"
            for kind, _ in kinds
            for v in k.get(kind, {}).get("minus_" + baseline, {}).get("per_run", [None] * len(names))
        ]
        if set(cells) != {"-"}:
            lines.append("| " + " | ".join([m, *cells]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""  # nothing to show: no run had that baseline


def compute_metrics(rows, settings):
    """All metrics of one method's log."""
    threshold, window, recovery_window = (
        settings.recovery_threshold,
        settings.window,
        settings.recovery_window,
    )
    acc = np.array([r["acc"] for r in rows], float)
    rec = recovery_times(rows, threshold, recovery_window)
    done = [r["steps"] for r in rec if r["recovered"]]
    n = min(window, len(rows))
    m = {
        "steps": len(rows),
        "mean_accuracy": float(acc.mean()),
        # the log loss of the method's own prediction (FLH's: its mixture's), what tuning compares
        "mean_log_loss": float(np.mean([r["loss"] for r in rows])) if "loss" in rows[0] else None,
        "windowed_accuracy": float(acc[-n:].mean()),
        "adaptive_regret": float(acc[-n:].mean()),
        "window": n,
        "final_accuracy": float(acc[-recovery_window:].mean()),
        "recovery": rec,
        "recovery_threshold": threshold,
        "recovery_window": recovery_window,
        "shifts_recovered": len(done),
        "shifts": len(rec),
        "mean_recovery_time": float(np.mean(done)) if done else None,
        "accuracy_over_time": [[r["step"], r["acc"]] for r in rows],
    }
    if "concept" in rows[0]:
        m["shift_details"] = shift_details(rows, rec)
        m["by_kind"] = by_kind(m["shift_details"])
    if isinstance(rows[0].get("selected"), list):  # mini-L2P: how often each key was chosen
        counts = np.sum([r["selected"] for r in rows], 0)
        m["key_usage"] = (counts / counts.sum()).round(4).tolist()
    if "acc_mixture" in rows[0]:
        m["mean_accuracy_mixture"] = float(np.mean([r["acc_mixture"] for r in rows]))
        m["recovery_mixture"] = recovery_times(
            [{**r, "acc": r["acc_mixture"]} for r in rows], threshold, recovery_window
        )
    if "weights" in rows[0]:
        m["weight_entropy"] = [r["entropy"] for r in rows]
        m["true_adaptive_regret"] = true_adaptive_regret(rows, n, "mixture_loss")
        m["true_adaptive_regret_weighted_sum"] = true_adaptive_regret(rows, n, "loss")
    return m


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------
def _shift_lines(ax, cuts):
    for c in cuts:
        ax.axvline(c, color="0.6", ls=":", lw=1)


def _finish_accuracy_plot(fig, ax, path, rows, smooth, threshold, title):
    """Rule changes (dotted, from one log's rows), the threshold, chance, labels; then save."""
    _shift_lines(ax, shifts(rows))
    if threshold:
        ax.axhline(threshold, color="k", lw=0.6, ls="--")
    ax.axhline(0.5, color="0.8", lw=0.6)
    ax.set(xlabel="step", ylabel=f"prequential accuracy ({smooth}-step mean)", ylim=(0, 1), title=title)
    ax.legend(loc="lower right", fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(logs, path, smooth=50, threshold=None, title=None):
    """Prequential accuracy (trailing mean over `smooth` steps) of every method."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for name, rows in logs.items():
        steps = [r["step"] for r in rows]
        top = 3 if name == "flh" else 2  # FLH drawn over the methods that track it closely (leader)
        ax.plot(
            steps,
            trailing_mean([r["acc"] for r in rows], smooth),
            label=name,
            color=COLORS.get(name, "0.5"),
            lw=1.4,
            zorder=top,
        )
        if "acc_mixture" in rows[0]:
            ax.plot(
                steps,
                trailing_mean([r["acc_mixture"] for r in rows], smooth),
                label=f"{name} (mixture)",
                color=COLORS.get(name, "0.5"),
                lw=1,
                ls="--",
                zorder=top,
            )
    title = title or "accuracy over time (dotted: rule changes)"
    _finish_accuracy_plot(fig, ax, path, next(iter(logs.values())), smooth, threshold, title)


def plot_accuracy_seeds(runs, path, smooth=50, threshold=None, title=None):
    """Mean over runs (seeds) of each method's smoothed accuracy, shaded between min and max."""
    fig, ax = plt.subplots(figsize=(9, 4))
    for name in methods_of(runs):
        curves = np.array(
            [trailing_mean([r["acc"] for r in logs[name]], smooth) for logs in runs if name in logs]
        )
        steps = [r["step"] for r in next(logs for logs in runs if name in logs)[name]]
        ax.plot(steps, curves.mean(0), label=f"{name}", color=COLORS.get(name, "0.5"), lw=1.4)
        ax.fill_between(steps, curves.min(0), curves.max(0), color=COLORS.get(name, "0.5"), alpha=0.15, lw=0)
    counts = {sum(name in logs for logs in runs) for name in methods_of(runs)}
    seeds = f"{len(runs)} seeds" if counts == {len(runs)} else f"{min(counts)}-{len(runs)} seeds per method"
    band = "one run" if len(runs) == 1 else f"mean over {seeds} (band: min-max)"
    title = title or f"{band}; dotted: rule changes"
    _finish_accuracy_plot(fig, ax, path, next(iter(runs[0].values())), smooth, threshold, title)


def plot_weights(rows, path, title="FLH weights"):
    """Heat-map of each prompt's weight in the prediction (rows: prompts by birth) over the steps."""
    ids = sorted({i for r in rows for i in r["prompt_ids"]})
    pos = {i: k for k, i in enumerate(ids)}
    W = np.full((len(ids), len(rows)), np.nan)
    for s, r in enumerate(rows):
        for i, w in zip(r["prompt_ids"], predicting_weights(r)):
            W[pos[i], s] = w
    fig, ax = plt.subplots(figsize=(9, 3.5))
    steps = [r["step"] for r in rows]
    im = ax.imshow(
        W,
        aspect="auto",
        origin="lower",
        cmap="viridis",
        vmin=0,
        vmax=1,
        interpolation="nearest",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(ids) - 0.5),
    )
    _shift_lines(ax, shifts(rows))
    ax.set(xlabel="step", ylabel="prompt (birth order)", title=f"{title} (blank: not born or pruned)")
    fig.colorbar(im, ax=ax, label="weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recovery(metrics, path):
    """Mean recovery time per method over the shifts it recovered from; k/n = recovered / shifts
    ("never": no bar, not an instant recovery)."""
    names = list(metrics)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for x, name in enumerate(names):
        m = metrics[name]
        done = [r["steps"] for r in m["recovery"] if r["recovered"]]
        height = np.mean(done) if done else 0
        spread = np.std(done) if len(done) > 1 else 0
        ax.bar(x, height, color=COLORS.get(name, "0.5"), yerr=spread or None, capsize=4)
        label = f"{len(done)}/{len(m['recovery'])}"
        ax.annotate(
            label if done else f"never {label}",
            (x, height + spread),
            xytext=(0, 4),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.set_xticks(range(len(names)), names)
    ax.margins(y=0.15)
    thr = metrics[names[0]]["recovery_threshold"]
    ax.set(
        ylabel="steps to recover",
        title=f"recovery to {thr:.0%} ({metrics[names[0]]['recovery_window']}-step "
        "window); k/n shifts recovered",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_first50(summary, path, title=None):
    """Bars: first-50 accuracy after first-time and after recurring shifts, per method (95% intervals)."""
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(names) + 2), 3.8))
    x = np.arange(len(names))
    for j, (kind, color) in enumerate((("first", "0.65"), ("recurring", "tab:orange"))):
        vals = [summary[m].get(kind) for m in names]
        means = [v["mean"] if v else 0 for v in vals]
        xs = x + (j - 0.5) * 0.38
        ax.bar(
            xs, means, 0.36, color=color, label="first-time shifts" if kind == "first" else "recurring shifts"
        )
        for xi, v in zip(xs, vals):  # a whisker only where there is an interval (two or more shifts)
            if v and v.get("ci"):
                ax.errorbar(
                    xi,
                    v["mean"],
                    [[v["mean"] - v["ci"][0]], [v["ci"][1] - v["mean"]]],
                    color="k",
                    capsize=3,
                    lw=1,
                )
        for xi, v in zip(xs, vals):
            if v:
                ax.annotate(f"{v['mean']:.2f}", (xi, 0.02), ha="center", va="bottom", fontsize=7, rotation=90)
    ax.axhline(0.5, color="0.3", lw=0.6, ls=":")
    ax.set_xticks(x, names, rotation=20)
    ax.set(
        ylim=(0, 1),
        ylabel="accuracy over a shift's first 50 steps",
        title=title or "right after the rules change (bars: mean over shifts; whiskers: 95% bootstrap)",
    )
    ax.legend(fontsize=8, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_prompts(logs, path):
    """Number of live prompts per step (dashes keep overlapping lines visible)."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k, (name, rows) in enumerate(logs.items()):
        ax.plot(
            [r["step"] for r in rows],
            [r.get("num_prompts", 1) for r in rows],
            label=name,
            color=COLORS.get(name, "0.5"),
            lw=1.6,
            ls=["-", "--", "-.", ":"][k % 4],
        )
    ax.set(xlabel="step", ylabel="live prompts", title="prompts in the pool per step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# A run folder -> metrics.json and plots
# ----------------------------------------------------------------------------------------------
def read_log(path):
    """The rows of one log.jsonl, saying so on stderr when a torn last line is dropped or steps are
    missing; an empty log or rows without step/regime/acc are one clear error."""

    def warn(message):
        print(f"[stage 7] {message}", file=sys.stderr)

    rows = common.read_jsonl(path, report=warn)
    if not rows:
        raise common.UserError(f"{path} holds no complete row")
    if not all(isinstance(r, dict) and {"step", "regime", "acc"} <= set(r) for r in rows):
        raise common.UserError(f"{path} is not a log of this project (rows need step, regime and acc)")
    for a, b in zip(rows, rows[1:]):
        if b["step"] != a["step"] + 1:
            warn(
                f"{path}: the steps jump from {a['step']} to {b['step']} (rows missing); metrics use "
                "the rows there are"
            )
            break
    return rows


def find_logs(folder):
    """{method: rows} from a run folder: its own log.jsonl, or one per method sub-folder (either may be
    gzipped, log.jsonl.gz; a plain log.jsonl wins over a gzipped one beside it)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise common.UserError(f"{folder} is not a folder")
    own = [p for p in (folder / "log.jsonl", folder / "log.jsonl.gz") if p.exists()]
    if own:
        cfg = folder / "config.json"
        name = common.read_json(cfg).get("method", folder.name) if cfg.exists() else folder.name
        return {name: read_log(own[0])}
    logs = {}  # one per method sub-folder: log.jsonl, or log.jsonl.gz as committed under results/
    for p in sorted([*folder.glob("*/log.jsonl.gz"), *folder.glob("*/log.jsonl")]):
        logs[p.parent.name] = read_log(p)
    if not logs:
        raise common.UserError(f"no log.jsonl in {folder} or its sub-folders")
    steps = (
        common.read_json(folder / "config.json").get("steps") if (folder / "config.json").exists() else None
    )
    for name, rows in list(logs.items()):
        if steps and 0 < len(rows) < steps and len(logs) > 1:  # still running, or killed: not comparable
            print(f"note: {folder}/{name} has {len(rows)} of {steps} steps (unfinished): left out")
            del logs[name]
    order = {m: i for i, m in enumerate(COLORS)}
    return dict(sorted(logs.items(), key=lambda kv: order.get(kv[0], 99)))


def analyse(folder, settings, smooth=50, logs=None):
    """Write metrics.json and the plots into a run folder (from `logs` where the caller has read
    them already); returns the metrics."""
    folder, threshold = Path(folder), settings.recovery_threshold
    logs = {k: v for k, v in (logs or find_logs(folder)).items() if v}
    metrics = {name: compute_metrics(rows, settings) for name, rows in logs.items()}
    common.write_json(folder / "metrics.json", metrics)
    plot_accuracy(
        logs, folder / "accuracy.png", smooth, threshold, title=f"{folder.name}: accuracy over time"
    )
    plot_recovery(metrics, folder / "recovery.png")
    plot_prompts(logs, folder / "prompts.png")
    for name, rows in logs.items():
        if "weights" in rows[0]:
            what = "the expert it chose" if "leader" in rows[0] else "weights"
            plot_weights(rows, folder / f"weights_{name}.png", title=f"{name}: {what}")
    if all("shift_details" in m for m in metrics.values()) and any(
        m["shift_details"] for m in metrics.values()
    ):
        plot_first50(
            first50_summary([metrics]),
            folder / "first50.png",
            title=f"{folder.name}: first 50 steps after a shift",
        )
    return metrics


def run_table(folder, metrics):
    """The table stages 8 and 10 print at the end of a run: each method's headline metrics and wall time."""
    lines = [
        f"{'method':<11}{'mean acc':>9}{'window acc':>11}{'final acc':>10}{'recovered':>10}"
        f"{'recovery':>9}{'first-50 first/recurring':>26}{'wall s':>8}"
    ]
    for name, m in metrics.items():
        run = folder / name / "run.json"
        r = common.read_json(run) if run.exists() else {}
        wall = r.get("total_seconds") or r.get("wall_seconds", float("nan"))  # a resumed run: all of it
        rec = f"{m['mean_recovery_time']:.0f}" if m["mean_recovery_time"] is not None else "never"
        kinds = m.get("by_kind", {})
        f50 = "/".join(f"{kinds[k]['first50']:.3f}" if k in kinds else "-" for k in ("first", "recurring"))
        lines.append(
            f"{name:<11}{m['mean_accuracy']:>9.3f}{m['windowed_accuracy']:>11.3f}{m['final_accuracy']:>10.3f}"
            f"{m['shifts_recovered']:>6}/{m['shifts']:<3}{rec:>9}{f50:>26}{wall:>8.0f}"
        )
    return "\n".join(lines)


def summary_table(per_run):
    """Markdown table: mean +- std over runs (seeds) of the headline metrics, per method."""
    keys = [
        ("mean_accuracy", "mean acc"),
        ("mean_log_loss", "log loss"),
        ("windowed_accuracy", "windowed acc"),
        ("final_accuracy", "final acc"),
        ("mean_recovery_time", "recovery (steps)"),
    ]
    lines = [
        "| method | " + " | ".join(k[1] for k in keys) + " | shifts recovered | runs |",
        "|---" * (len(keys) + 3) + "|",
    ]
    summary = {}
    for m in methods_of(per_run):
        runs = [run for run in per_run if m in run]
        cells, summary[m] = [], {}
        for key, _ in keys:
            vals = [run[m][key] for run in runs if run[m][key] is not None]
            summary[m][key] = {
                "mean": float(np.mean(vals)) if vals else None,
                "std": float(np.std(vals)) if vals else None,
                "n": len(vals),
            }
            fmt = (
                "{:.0f}" if key == "mean_recovery_time" else "{:.4f}" if key == "mean_log_loss" else "{:.3f}"
            )
            cells.append(f"{fmt.format(np.mean(vals))} ± {fmt.format(np.std(vals))}" if vals else "never")
        rec = sum(run[m]["shifts_recovered"] for run in runs)
        tot = sum(run[m]["shifts"] for run in runs)
        summary[m]["shifts_recovered"] = [rec, tot]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {rec}/{tot} | {len(runs)} |")
    return "\n".join(lines), summary


# ----------------------------------------------------------------------------------------------
# Checks on synthetic logs with known answers
# ----------------------------------------------------------------------------------------------
def _fake_rows(acc, interval, weights=None):
    rows = []
    for s, a in enumerate(acc):
        r = {
            "step": s,
            "regime": s // interval,
            "concept": (s // interval) % 2,
            "acc": float(a),
            "loss": 1 - float(a),
        }
        if weights is not None:
            r.update(
                weights=weights,
                prompt_ids=list(range(1, len(weights) + 1)),
                num_prompts=len(weights),
                entropy=float(-sum(w * math.log(w) for w in weights)),
                expert_losses=[1 - float(a)] * len(weights),
                mixture_loss=1 - float(a),
                acc_mixture=float(a),
            )
        rows.append(r)
    return rows


def _recovering_acc():
    acc = np.ones(800)
    acc[200:230] = 0.5
    acc[400:600] = 0.5
    return acc


def test_recovery_times():
    """Regimes of 200 steps. After shift 200: accuracy 0.5 for 30 steps, then 1.0 -> the 50-step mean first
    reaches 0.8 at the window [c+n-50, c+n) with 20 steps of 0.5 and 30 of 1.0 -> n = 60. After shift 400:
    0.5 forever -> censored. Shift 600: perfect at once -> n = 50 (the window)."""
    acc = _recovering_acc()
    rows = _fake_rows(acc, 200)
    rec = recovery_times(rows, threshold=0.8, window=50)
    assert [r["shift"] for r in rec] == [200, 400, 600]
    assert rec[0]["steps"] == 60 and rec[0]["recovered"]
    assert rec[1]["steps"] is None and not rec[1]["recovered"] and rec[1]["regime_length"] == 200
    assert rec[2]["steps"] == 50
    m = compute_metrics(rows, MetricSettings(window=100))
    assert m["shifts_recovered"] == 2 and m["mean_recovery_time"] == 55 and m["windowed_accuracy"] == 1.0
    assert abs(m["mean_log_loss"] - np.mean([r["loss"] for r in rows])) < 1e-12 and m["mean_log_loss"] > 0
    print("  ok: recovery times 60 and 50 steps where known; a regime that never recovers is censored (null)")


def test_shift_kinds():
    """Kinds, first-50 accuracy and switch time. Concepts 0, 1, 0, 1 over 200-step regimes: the shift at 200
    is first-time, those at 400 and 600 recur. Three experts: born at 0 (concept 0), 200 (concept 1) and
    400 (concept 0). After 400 the expert born at 0 gets weight 0.6 from step 407 on: switch 7. After 600
    the expert born at 200 never holds more than 0.4: censored."""
    acc2 = np.ones(800)
    acc2[200:250], acc2[400:450], acc2[600:650] = 0.2, np.r_[np.zeros(25), np.ones(25)], 0.9
    rows = _fake_rows(acc2, 200)
    for r in rows:
        s_ = r["step"]
        r["prompt_ids"] = [1] + ([2] if s_ >= 200 else []) + ([3] if s_ >= 400 else [])
        w1 = 0.6 if 407 <= s_ < 600 else 0.2
        r["weights"] = {1: [1.0], 2: [0.5, 0.5], 3: [w1, 0.4, 0.6 - w1]}[len(r["prompt_ids"])]
    d = shift_details(rows, recovery_times(rows, 0.8, 50))
    assert [x["kind"] for x in d] == ["first", "recurring", "recurring"] and [x["concept"] for x in d] == [
        1,
        0,
        1,
    ]
    assert np.allclose([x["first50"] for x in d], [0.2, 0.5, 0.9]) and "switch" not in d[0], d
    assert [x["visit"] for x in d] == [0, 1, 1], d  # concept 0 was active from step 0: 400 is its 1st return
    v = by_visit(
        [{"flh": {"shift_details": d}}, {"flh": {"shift_details": d}, "single": {"shift_details": d}}]
    )
    assert list(v) == ["flh", "single"] and v["flh"][1]["n"] == 4 and np.isclose(v["flh"][1]["mean"], 0.7)
    assert v["single"][0]["n"] == 1 and v["single"][0]["ci"] is None and "| return 1 |" in visit_table(v)
    assert d[1]["switch"] == 7 and d[2]["switch"] is None, d
    # The leader baseline logs the pool's FLH weights too, but predicts with one expert: its switch
    # time follows its choice (expert 1 from step 420 on, expert 2 from 610 on), not those weights.
    for r in rows:
        s_ = r["step"]
        r["leader"] = 1 if s_ < 200 or 420 <= s_ < 600 else 2 if s_ < 400 or s_ >= 610 else 3
    dl = shift_details(rows, recovery_times(rows, 0.8, 50))
    assert dl[1]["switch"] == 20 and dl[2]["switch"] == 10, dl
    assert predicting_weights(rows[500]) == [1.0, 0.0, 0.0]
    for r in rows:
        del r["leader"]
    # An expert born just before a shift and frozen after it belongs to the concept it was frozen in:
    # expert 2 born at 190 (concept 0) learns alone until expert 3's birth at 400, so holding 0.9 of
    # the weight after the shift at 400 (concept 0 again) is not a switch back to a memory of concept 0.
    straddle = [
        {**r, "prompt_ids": [1, 2, 3][: 1 + (r["step"] >= 190) + (r["step"] >= 400)]} for r in rows[:600]
    ]
    for r in straddle:
        r["weights"] = [[1.0], [0.5, 0.5], [0.05, 0.9, 0.05]][len(r["prompt_ids"]) - 1]
    ds = shift_details(straddle, recovery_times(straddle, 0.8, 50))
    assert ds[1]["shift"] == 400 and ds[1]["switch"] is None, ds
    k = by_kind(d)
    assert (
        np.isclose(k["first"]["first50"], 0.2)
        and np.isclose(k["recurring"]["first50"], 0.7)
        and k["recurring"]["switched"] == 1
    )
    print(
        "  ok: shifts split into first-time (200) and recurring (400, 600); first-50 accuracy 0.2 / "
        "0.5 / 0.9; "
        "switch time 7 steps, and censored where the old expert never gets half the weight; the leader's "
        "switch follows the expert it chose (20 and 10 steps); an expert frozen after a shift is no "
        "memory of the concept it was born in"
    )


def test_paired_differences():
    """Paired differences: a method exactly 0.1 better than single on every shift; bootstrap intervals."""
    x = np.random.default_rng(1).normal(0.6, 0.1, 400)
    lo, hi = bootstrap_interval(x)
    assert (
        lo < x.mean() < hi
        and hi - lo < 4 * 1.96 * x.std() / 20
        and bootstrap_interval([0.3] * 5) == [0.3, 0.3]
    )
    base = {
        "shift_details": [
            {"kind": kk, "first50": v, "recovery": r}
            for kk, v, r in (("first", 0.4, None), ("recurring", 0.5, 60), ("recurring", 0.3, 90))
        ]
    }
    better = {"shift_details": [{**e, "first50": e["first50"] + 0.1} for e in base["shift_details"]]}
    f50 = first50_summary([{"single": base, "m": better}, {"single": base, "m": better}])
    assert (
        abs(f50["m"]["recurring"]["minus_single"]["mean"] - 0.1) < 1e-12 and f50["m"]["recurring"]["n"] == 4
    )
    assert (
        np.allclose(f50["m"]["recurring"]["minus_single"]["ci"], [0.1, 0.1])
        and abs(f50["m"]["first"]["mean"] - 0.5) < 1e-12
    )
    assert "minus_single" not in f50["single"]["first"] and first50_table(f50).count("\n") == 3
    assert f50["m"]["recurring"]["recovery"] == {"recovered": 4, "mean": 75.0}
    assert "| 75 steps (4/4) | never (0/2) |" in first50_table(f50)
    f50 = first50_summary([{"single": base, "m": better, "leader": better}])  # and against leader: 0
    assert f50["m"]["recurring"]["minus_leader"]["mean"] == 0 and "minus_leader" not in f50["leader"]["first"]
    assert "| m | 0.500 [0.400, 0.600] | 0.100 [0.100, 0.100] | 0.000 [0.000, 0.000] |" in first50_table(f50)
    worse = {"shift_details": [{**e, "first50": e["first50"] - 0.2} for e in base["shift_details"]]}
    f50 = first50_summary([{"single": base, "m": better}, {"single": base}, {"single": base, "m": worse}])
    a, b, c = f50["m"]["recurring"]["minus_single"]["per_run"]
    assert b is None and np.allclose([a, c], [0.1, -0.2]), (a, b, c)
    assert "| m | +0.100 | - | -0.200 | +0.100 | - | -0.200 |" in per_run_table(f50, ["a", "b", "c"])
    print(
        "  ok: paired first-50 differences against single (+0.1 on every shift -> 0.1 [0.1, 0.1]), "
        "and run by run (+0.1, missing, -0.2); the bootstrap interval brackets the mean; recovery "
        "pooled by kind (75 steps, 4/4; never, 0/2)"
    )


def test_regret_and_plots():
    """Weight entropy; true adaptive regret: a method 0.3 worse than its best expert on 40 steps of a
    50-step window has regret 0.3 * 40; then metrics.json and the plots of a run folder."""
    acc, K = _recovering_acc(), 5
    rows = _fake_rows(np.full(300, 0.7), 100, weights=[1 / K] * K)
    m = compute_metrics(rows, MetricSettings(window=50))
    assert abs(m["weight_entropy"][0] - math.log(K)) < 1e-12
    print(f"  ok: entropy of uniform weights over {K} prompts = log {K} = {math.log(K):.4f}")
    assert abs(m["true_adaptive_regret"]) < 1e-9, m["true_adaptive_regret"]
    for r in rows[100:140]:
        r["mixture_loss"] += 0.3
    assert abs(true_adaptive_regret(rows, 50) - 12.0) < 1e-9
    print("  ok: true adaptive regret is 0 when the method equals its best expert, 12.0 for a known gap")

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("flh", "single"):
            (Path(tmp) / name).mkdir()
            with open(Path(tmp) / name / "log.jsonl", "w") as f:
                for r in _fake_rows(acc, 200, [0.5, 0.5]) if name == "flh" else _fake_rows(acc[::-1], 200):
                    f.write(json.dumps(r) + "\n")
        metrics = analyse(tmp, MetricSettings(window=100))
        assert set(metrics) == {"flh", "single"}
        for png in ("accuracy.png", "recovery.png", "prompts.png", "weights_flh.png", "first50.png"):
            p = Path(tmp) / png
            assert p.exists() and p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG", png
        assert common.read_json(Path(tmp) / "metrics.json")["flh"]["shifts"] == 3
        seeds = argparse.Namespace(recovery_threshold=0.6, baselines=None)  # the same run twice, as two seeds
        md = write_summary(
            Path(tmp) / "sum", ["r-seed0", "r-seed1"], [metrics] * 2, [find_logs(tmp)] * 2, seeds
        )
        made = (
            "summary.md",
            "summary.json",
            "accuracy_seeds.png",
            "first50.json",
            "first50.png",
            "visits.png",
        )
        assert all((Path(tmp) / "sum" / f).stat().st_size > 500 for f in made)
        assert md.startswith("over 2 runs:") and md.endswith(
            (Path(tmp) / "sum" / "summary.md").read_text()[-200:-1]
        )
        assert "| minus single | seed0, recurring |" in md and "by visit of the concept" in md, md
        summary = common.read_json(Path(tmp) / "sum" / "summary.json")["methods"]
        assert summary["flh"]["mean_recovery_time"]["mean"] == 55 and summary["flh"]["shifts_recovered"] == [
            4,
            6,
        ]
        # A method still running (fewer rows than the run's config says) is left out, and said to be.
        common.write_json(Path(tmp) / "config.json", {"steps": len(acc)})
        (Path(tmp) / "reset").mkdir()
        (Path(tmp) / "reset" / "log.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in _fake_rows(acc, 200)[:300])
        )
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert set(find_logs(tmp)) == {"flh", "single"}
        assert "reset has 300 of 800 steps (unfinished): left out" in out.getvalue(), out.getvalue()
        # A gzipped log (as committed under results/) reads as the plain one.
        (Path(tmp) / "flh_gz").mkdir()
        with gzip.open(Path(tmp) / "flh_gz" / "log.jsonl.gz", "wt") as f:
            f.write((Path(tmp) / "flh" / "log.jsonl").read_text())
        with contextlib.redirect_stdout(out):
            logs = find_logs(tmp)
        assert logs["flh_gz"] == logs["flh"] and find_logs(Path(tmp) / "flh_gz")["flh_gz"] == logs["flh"]
        shutil.rmtree(Path(tmp) / "flh_gz")
        # A torn last line and a gap are reported; an empty or foreign log is one clear error.
        log = Path(tmp) / "single" / "log.jsonl"
        lines = log.read_text().splitlines(keepends=True)
        log.write_text("".join(lines[:10] + lines[40:]) + '{"step": 8')
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rows = find_logs(Path(tmp) / "single")["single"]
        assert (
            len(rows) == len(lines) - 30
            and "torn last line" in err.getvalue()
            and "jump from 9 to 40" in err.getvalue()
        )
        for text, says in (("", "no complete row"), ('{"a": 1}\n', "not a log"), ("garbage\n", "not JSON")):
            log.write_text(text)
            try:
                find_logs(Path(tmp) / "single")
                raise AssertionError(f"{text!r} was accepted")
            except common.UserError as e:
                assert says in str(e), e
    print(
        "  ok: an unfinished method is left out with a note; a torn last line and missing steps are "
        "reported; empty, foreign and garbage logs are one clear error"
    )
    print("  ok: a run folder gives metrics.json and 4 non-empty PNGs; the seed summary averages right")


def run_tests():
    common.run_checks(sys.modules[__name__])


def build_parser():
    p = common.Parser(
        description="Stage 7: metrics and plots from run folders (several = seeds, summarised)."
    )
    p.add_argument("runs", nargs="*", help="run folders (each with log.jsonl, or one sub-folder per method)")
    common.add_settings(p, MetricSettings)
    p.add_argument(
        "--summary", default=None, help="folder for summary.json/summary.md over all runs (default: none)"
    )
    p.add_argument(
        "--baselines",
        type=lambda t: [m for m in t.split(",") if m],
        default=None,
        help="with --summary: the methods every other is compared with, shift by shift and run by run "
        "(comma-separated; default: single and leader, where the runs hold them)",
    )
    p.add_argument("--test", action="store_true", help="run this stage's built-in checks and exit")
    return p


def write_summary(out, runs, per_run, run_logs, args):
    """Over several runs (seeds), into `out`: summary.md and summary.json (headline metrics, each
    run's log loss), accuracy_seeds.png; where the logs have shift details also the first 50 steps
    after a shift against --baselines (first50.json/.png, paired differences run by run) and by visit
    of the concept (visits.json/.png). Returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    table, summary = summary_table(per_run)
    names = [Path(r).name for r in runs]
    md = [
        table,
        "Log loss of each method's own prediction, per run (what tuning compares):",
        log_loss_table(per_run, names),
    ]
    common.write_json(out / "summary.json", {"runs": runs, "methods": summary})
    plot_accuracy_seeds(run_logs, out / "accuracy_seeds.png", threshold=args.recovery_threshold)
    n_runs = f"{len(per_run)} run" + "s" * (len(per_run) > 1)
    if all("shift_details" in m for run in per_run for m in run.values()):
        held = methods_of(per_run)
        baselines = args.baselines or [b for b in ("single", "leader") if b in held]
        missing = [b for b in baselines if b not in held]
        if missing:
            raise common.UserError(f"--baselines: no run holds {', '.join(missing)}")
        f50 = first50_summary(per_run, baselines)
        cut = os.path.commonprefix(names).rfind("-") + 1  # remember-rt-seed0, ... -> seed0, ...
        short = [n[cut:] for n in names] if len(names) > 1 else names
        tables = filter(None, (per_run_table(f50, short, b) for b in baselines))
        md += [
            "First 50 steps after a shift (95% bootstrap intervals over shifts):",
            first50_table(f50, baselines),
        ]
        md += ["Paired difference per run:", "\n\n".join(tables)]
        common.write_json(out / "first50.json", {"runs": runs, "methods": f50})
        plot_first50(f50, out / "first50.png", title=f"first 50 steps after a shift, {n_runs}")
        visits = by_visit(per_run)
        if visits:
            md += ["First 50 steps by visit of the concept (a rule, or a domain):", visit_table(visits)]
            common.write_json(out / "visits.json", {"runs": runs, "methods": visits})
            plot_visits(visits, out / "visits.png", title=f"first 50 steps by visit of the concept, {n_runs}")
    (out / "summary.md").write_text("\n\n".join(md) + "\n")
    return f"over {n_runs}:\n" + "\n\n".join(md)


def main(args):
    if args.test:
        return run_tests()
    if not args.runs:
        raise common.UserError("give at least one run folder")
    per_run, run_logs = [], [find_logs(run) for run in args.runs]
    for run, logs in zip(args.runs, run_logs):
        per_run.append(analyse(run, common.settings(MetricSettings, args), logs=logs))
        print(f"{run}:\n{summary_table(per_run[-1:])[0]}\n")
    if args.summary:
        print(write_summary(Path(args.summary), args.runs, per_run, run_logs, args))


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
