"""Stage 5: one train step and the FLH outer loop, evaluated test-then-train.

Per batch s of the stream:
  1. birth     at step 0 and then every birth_interval steps from birth_offset on: a new prompt
               joins the pool (stage 4) and the optimiser;
  2. predict   with the parameters as they are *before* seeing batch s's labels;
  3. learn     one AdamW step, then  w_i <- w_i exp(-alpha l_i)  with each expert's loss l_i on batch s.

This is *prequential* (test-then-train) evaluation: the accuracy logged for step s was earned on
data the model had not learned from. The public reference logged the accuracy of the batch it
had just trained on, which overstates how fast anything recovers.

What trains, and what predicts (`train_mode`):
  weighted_sum  the plan's: predict and train with one prompt  p = sum_i w_i p_i  (`acc`); FLH's
                mixture  sum_i w_i softmax(f(x; p_i))  is logged beside it (`acc_mixture`, on the
                loss batch). The gradient reaching p_i is w_i times the shared one, but Adam divides
                by a running gradient scale, which cancels most of w_i: every prompt moves with the
                sum, so no expert keeps what an earlier regime taught it.
  independent   FLH's original form: every expert learns from its own loss (one batched pass with
                gradients; the backward of sum_j l_j gives each p_i exactly dl_i/dp_i). Every
                expert is retrained on the current regime, so again none remembers an old one.
  snapshot      one *live* prompt learns, on its own loss. At each birth the live prompt is frozen
                where it stands and stays in the pool as an expert, and the new live prompt starts
                as a copy of it (or of the heaviest expert, `birth_from='leader'`) with its Adam
                moments, so learning goes on without a restart. The frozen experts are memories:
                when a regime comes back, the expert frozen during its last visit is still there,
                and FLH's weights (with stage 4's floor) can move back to it.
In independent and snapshot mode the prediction, `acc`, is FLH's mixture, and the live prompt's
own accuracy is logged as `acc_live`.

Two helpers for a pool that must remember more regimes than its cap holds and still meet new ones:
  reservoir     (`--prune reservoir`) a uniform sample of past examples with their labels, over the
                whole stream; at a birth over the cap, stage 4 removes the expert the pool misses least
                on them, so the best memory of every stretch of the past stays.
  fresh births  (`--fresh-threshold`) a one-sided Page-Hinkley test on the best expert's loss per
                batch: when even the best expert gets worse, no memory knows the rule, and a prompt
                is born from random, which has nothing to unlearn (whether that pays: the README).

Both predictions come almost for free: the expert losses need the K-prompt pass anyway (stage 3
batches it), and the trained prompt's logits come from its training forward before its backward.

Two switches make the K-prompt pass cheaper (their accuracy cost is measured in the README's
"Performance"): `--precision bf16` runs the encoder under bf16 autocast (prompts, head and losses
stay fp32; `auto` takes whichever of fp32 and bf16 is faster here, measured), and `--loss-batch m`
scores the experts on the first m examples of the batch only: their losses, and so the weights,
come from those m; training uses all of it. Every example is still predicted (snapshot and
independent mode): beyond the first m, by the heaviest experts holding at least 1 - epsilon of the
weight (`--mixture-epsilon`), whose renormalised mixture is within epsilon of the full one in every
class probability (stage 4's `heaviest` proves it), at the cost of those few experts. `bench.py`
times them.

One JSONL row per step: step, regime, concept, domain, loss, acc, acc_mixture, mixture_loss,
weights, prompt_ids (birth index of each live prompt; the row where an index first appears gives
its birth step and concept), expert_losses, num_prompts, entropy (and acc_live, live_loss, and
mixture_experts: how many experts predicted beyond the loss batch; alarm and fresh_birth where a
fresh birth was raised and made).

Run `python stage5_train.py` for a short FLH stream on the defaults (log under runs/<run-name>/),
and `--test` for the checks (10 fixed batches are overfitted; logged accuracy is prequential;
snapshot births copy the live prompt and freeze the old one). Timings: `python bench.py`.
"""

import copy
import functools
import hashlib
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import assets
import common
from stage2_stream import StreamSettings, TextStream, batch_rows, build_stream
from stage3_backbone import (
    ModelSettings,
    choose_precision,
    forward_with_prompt,
    forward_with_prompts,
    load_backbone,
    text_budget,
)
from stage4_pool import FLHPromptPool, PoolSettings, per_prompt_losses


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def accuracy(logits, labels):
    return float((logits.argmax(-1) == labels).float().mean())


def r6(x):
    """Floats rounded to 6 significant digits: logs stay small and still deterministic."""
    return [r6(v) for v in x] if isinstance(x, (list, tuple)) else float(f"{float(x):.6g}")


def base_row(batch, loss, logits):
    """The fields every method logs: where the step is (regime, concept), its loss, its prequential
    accuracy."""
    return {
        "step": batch["step"],
        "regime": batch["regime"],
        "concept": batch["concept"],
        "domain": batch["domain"],
        "loss": r6(loss),
        "acc": r6(accuracy(logits, batch["labels"])),
    }


def train_step(model, prompt, optimizer, batch):
    """One AdamW step on CE(f(x; prompt), y). Returns (loss, logits before the step)."""
    logits = forward_with_prompt(model, batch, prompt)
    loss = F.cross_entropy(logits, batch["labels"])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), logits.detach()


def follow_pool(optimizer, added=None, removed=()):
    """Keep an optimiser in step with a pool: one param group per prompt, in pool order."""
    for p in removed:
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"][0] is not p]
        optimizer.state.pop(p, None)
    if added is not None:
        optimizer.add_param_group({"params": [added]})


def rise_detector(threshold, losses=()):
    """river's one-sided Page-Hinkley test (Page, "Continuous inspection schemes", Biometrika 1954):
    with m_t the running mean of the losses x_1..x_t, it keeps  U_t = 0.9999 U_{t-1} + x_t - m_t - 0.005
    and raises an alarm when U_t - min_{i<=t} U_i > threshold: a rise of g nats per batch is caught after
    about threshold / g batches, and a fall never. At least 20 batches after each (re)start. ADWIN, which
    tests both ways on two windows, took 25-55 batches on the same losses. `losses` are replayed (a
    resumed run's detector is then the same)."""
    from river import drift

    detector = drift.PageHinkley(threshold=threshold, mode="up", min_instances=20)
    for x in losses:
        detector.update(x)
    return detector


class Reservoir:
    """A uniform sample of `size` past examples with the labels they had then, over the whole stream
    (what `--prune reservoir` judges experts on). Bottom-k sampling: every example gets a pseudo-random
    key from its (step, row) alone, and the reservoir holds the `size` examples with the smallest keys
    seen so far, a uniform sample without replacement of all of them. It is a pure function of the
    steps seen (no random state, so a resumed run holds the same sample); it holds `size` rows of
    each input tensor (token ids and mask, or pixels) and their labels, and nothing else."""

    def __init__(self, size):
        self.size, self.keys, self.rows = size, torch.zeros(0, dtype=torch.long), {}

    @staticmethod
    def key(step, row):
        return int.from_bytes(hashlib.blake2b(b"%d,%d" % (step, row), digest_size=7).digest(), "big")

    def add(self, batch):
        n = len(batch["labels"])
        rows = {k: v.cpu() for k, v in batch.items() if torch.is_tensor(v) and v.dim() and len(v) == n}
        rows.pop("index", None)  # where the example sits in the dataset: not an input
        keys = torch.cat([self.keys, torch.tensor([self.key(batch["step"], i) for i in range(n)])])
        keep = keys.argsort(stable=True)[: self.size]
        self.keys = keys[keep]
        self.rows = {k: pad_cat(self.rows.get(k), v)[keep] for k, v in rows.items()}
        if "attention_mask" in self.rows:  # drop columns that are padding in every kept row
            width = int(self.rows["attention_mask"].any(0).nonzero().max()) + 1
            self.rows = {k: v[:, :width] if k in ("input_ids", "attention_mask", "token_type_ids") else v
                         for k, v in self.rows.items()}  # fmt: skip

    def losses(self, model, prompts):
        """Each prompt's cross-entropy on each reservoir example: [K, R]."""
        if not len(self.keys):
            return torch.zeros(len(prompts), 0)
        batch = {k: v.to(model.device) for k, v in self.rows.items()}
        with torch.inference_mode():
            logits = forward_with_prompts(model, batch, prompts).float()
        K, R, C = logits.shape
        y = batch["labels"].repeat(K)
        return F.cross_entropy(logits.reshape(K * R, C), y, reduction="none").view(K, R).cpu()

    def state(self):
        return {"keys": self.keys, "rows": dict(self.rows)}

    def load_state(self, state):
        self.keys, self.rows = state["keys"].clone(), {k: v.clone() for k, v in state["rows"].items()}


def pad_cat(a, b):
    """Rows of a (or None) then rows of b, the second dimension zero-padded to the wider of the two
    (token ids and masks of different lengths: a zero mask hides the padding)."""
    if a is None:
        return b
    if a.dim() > 1 and a.shape[1] != b.shape[1]:
        width = max(a.shape[1], b.shape[1])
        a, b = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, width - t.shape[1])) for t in (a, b))
    return torch.cat([a, b])


WEIGHT_DECAY = 0.01  # AdamW's, on every prompt of every method
TRAIN_MODES = ["weighted_sum", "independent", "snapshot"]
BIRTH_FROM = ["live", "leader", "random"]
setting = common.setting


@dataclass(frozen=True)
class RunSettings(common.Settings):
    """How long a run learns, and how fast (stage 8's presets fill both)."""

    steps: int = setting(300, common.positive_int, "batches in the stream")
    lr: float = setting(1e-3, common.positive_float, "AdamW learning rate")


def offset_arg(text):
    return text if text == "half" else common.nonneg_int(text)


@dataclass(frozen=True)
class FLHSettings(PoolSettings):
    """FLH's settings: how the pool weights and prunes (stage 4's PoolSettings), and how its prompts
    are born and learn. The one place each of them and its default is declared."""

    birth_interval: int = setting(100, common.positive_int, "steps between FLH births")
    birth_offset: object = setting(
        0,
        offset_arg,
        "FLH births at step 0 and then at offset + k * interval; "
        "'half' = interval // 2, off the change points when those fall on multiples",
    )
    train_mode: str = setting(
        "weighted_sum",
        choices=TRAIN_MODES,
        help="weighted_sum (the plan's) | independent | snapshot (frozen experts)",
    )
    birth_from: str = setting(
        "live",
        choices=BIRTH_FROM,
        help="snapshot mode: a newborn copies the live prompt, the leader, or starts at random",
    )
    reservoir_size: int = setting(
        32, common.positive_int, "--prune reservoir: past examples (with their labels) kept to judge experts"
    )
    fresh_threshold: float = setting(
        0.0,
        common.nonneg_float,
        "fresh births: when a Page-Hinkley test sees the best expert's loss rise by this many nats "
        "(summed over batches), a prompt is born from random, which needs no unlearning; 0 = never",
    )
    loss_batch: int = setting(
        0, common.nonneg_int, "score FLH's experts on the first N examples of each batch only; 0 = all"
    )
    mixture_epsilon: float = setting(
        0.05,
        common.unit_float,
        "beyond the loss batch, predict with the heaviest experts holding >= 1 - epsilon of the "
        "weight (every class probability within epsilon of the full mixture); 0 = every expert",
    )


class FLHLearner:
    """FLH over a pool of prompts. `step(batch)` -> log row. Training modes (see the docstring):
    weighted_sum (the plan's), independent (every expert on its own loss) and snapshot (one live
    prompt learns; births freeze it as an expert and continue from a copy)."""

    name = "flh"

    def __init__(self, model, prompt_length, lr, settings=FLHSettings()):
        s = self.settings = settings  # checked by its declaration
        self.model, self.birth_interval, self.loss_batch = model, s.birth_interval, s.loss_batch
        self.train_mode, self.birth_from, self.mixture_epsilon = s.train_mode, s.birth_from, s.mixture_epsilon
        self.birth_offset = s.birth_interval // 2 if s.birth_offset == "half" else s.birth_offset
        self.reservoir = Reservoir(s.reservoir_size) if s.prune == "reservoir" else None
        self.fresh_threshold, self.fresh_due, self.drift_losses = s.fresh_threshold, False, []
        self.detector = rise_detector(s.fresh_threshold) if s.fresh_threshold else None
        self.pool = FLHPromptPool(prompt_length, model.embed_dim, s, device=model.device)
        # AdamW needs at least one parameter: start with a placeholder group, dropped at the 1st birth.
        self._placeholder = torch.nn.Parameter(torch.zeros(1))
        self.lr = lr
        self.optimizer = torch.optim.AdamW([self._placeholder], lr=lr, weight_decay=WEIGHT_DECAY)

    def should_birth(self, step):
        """The first step, then every birth_interval steps counted from birth_offset: a learner
        does not know when the rules change, so births need not fall on the change points."""
        return step == 0 or (
            step >= self.birth_offset and (step - self.birth_offset) % self.birth_interval == 0
        )

    def birth(self, fresh=False):
        """A newcomer joins the pool and the optimiser. In snapshot mode it is a copy of the live
        prompt (or of the heaviest expert) with that prompt's Adam moments, and the old live
        prompt, no longer trained, stays in the pool as a frozen expert: a memory. A `fresh`
        newcomer starts at random whatever `birth_from` says."""
        pool, init, moments = self.pool, None, None
        if self.train_mode == "snapshot" and len(pool) and self.birth_from != "random" and not fresh:
            # the snapshot birth: the newcomer continues from the live prompt (or the leader) ...
            source = pool.prompts[-1 if self.birth_from == "live" else int(pool.log_w.argmax())]
            init = source.detach().clone()
            # ... with its Adam moments, so learning goes on at full speed, without a restart
            moments = {k: v.clone() for k, v in self.optimizer.state.get(source, {}).items()}
        # FLH's birth (stage 4): prune, then w_new = 1/t. The newcomer is the newest prompt, the
        # only one trained in snapshot mode; the old live prompt stays in the pool, frozen.
        probe = self.reservoir and (lambda: self.reservoir.losses(self.model, pool.stacked().detach()))
        added, removed = pool.birth_prompt(init, probe)
        follow_pool(self.optimizer, added, removed + [self._placeholder])
        if moments:
            self.optimizer.state[added] = moments

    def step(self, batch):
        """One prequential step on batch s: births, then every expert predicts batch s with the
        weights of step s - 1 (and the prompt that learns is trained on it), and only then do the
        batch's losses move the weights. Returns the log row."""
        pool, y = self.pool, batch["labels"]
        fresh, self.fresh_due = self.fresh_due, False
        if fresh or self.should_birth(batch["step"]):
            self.birth(fresh)
        weights, entropy = pool.weights, pool.entropy()  # the weights that predict batch s
        # each expert's loss l_i and logits on the loss batch; the trained prompt's loss and logits
        expert_losses, expert_logits, y_sub, loss, logits = getattr(self, "train_" + self.train_mode)(batch)
        self.rest_logits = {}  # frozen experts' logits beyond the loss batch, computed this step
        mixture = pool.mixture_probs(expert_logits)  # FLH's own prediction: sum_i w_i softmax(f(x; p_i))
        if self.train_mode != "weighted_sum":  # ... on every example of the batch, not only the scored
            mixture = torch.cat([mixture, self.mixture_beyond(batch, len(y_sub), logits)])
        mixture_loss = F.nll_loss(mixture.clamp_min(1e-12).log(), y[: len(mixture)])
        pool.update_weights(expert_losses)  # w_i <- w_i exp(-alpha l_i), normalised, floored (stage 4)
        pool.record(batch["step"], expert_logits)  # the predictions diverse pruning compares
        if self.reservoir:
            self.reservoir.add(batch)  # the labels are known now: a sample of the past, for pruning
        alarm = bool(self.detector) and self.rise_detected(float(expert_losses.min()))
        self.last_mixture, self.last_expert_logits = mixture, expert_logits  # for subclasses (stages 6, 9)
        self.last_live_logits = logits
        if self.train_mode == "weighted_sum":
            row = base_row(batch, loss, logits)  # acc: the weighted-sum prompt's
        else:  # acc: the mixture's, on every example; live: the trained prompt's
            row = {
                **base_row(batch, mixture_loss, mixture),
                "acc_live": r6(accuracy(logits, y)),
                "live_loss": r6(loss),
                "mixture_experts": self.mixture_experts,
            }
        return {
            **row,
            **({"fresh_birth": True} if fresh else {}),
            **({"alarm": True} if alarm else {}),
            "acc_mixture": r6(accuracy(mixture, y[: len(mixture)])),
            "mixture_loss": r6(mixture_loss),
            "weights": r6(weights),
            "prompt_ids": list(pool.birth_ids),
            "expert_losses": r6(expert_losses.tolist()),
            "num_prompts": len(pool),
            "entropy": r6(entropy),
        }

    # The three training modes. Each predicts batch s before learning from it and returns
    # (expert losses [K], expert logits [K, m, C] on the loss batch, its labels [m], the trained
    # prompt's loss, its logits [B, C]).
    def train_weighted_sum(self, batch):
        """The plan's: predict with, and train, the weighted-sum prompt sum_i w_i p_i; the experts'
        losses come from a pass without gradients."""
        expert_losses, expert_logits, y_sub = self.score_experts(batch)
        loss, logits = train_step(self.model, self.pool.get_prompt("weighted_sum"), self.optimizer, batch)
        return expert_losses, expert_logits, y_sub, loss, logits

    def train_independent(self, batch):
        """Every expert on its own loss, in one pass with gradients: d(sum_j l_j)/dp_i = dl_i/dp_i."""
        expert_logits = forward_with_prompts(self.model, batch, self.pool.stacked())
        expert_losses = per_prompt_losses(expert_logits, batch["labels"])
        self.optimizer.zero_grad(set_to_none=True)
        expert_losses.sum().backward()
        self.optimizer.step()
        expert_losses, expert_logits = expert_losses.detach(), expert_logits.detach()
        return expert_losses, expert_logits, batch["labels"], float(expert_losses[-1]), expert_logits[-1]

    def train_snapshot(self, batch):
        """One live prompt (the newest) learns; the frozen experts, the memories, are scored without
        gradients on the loss batch, and the live prompt by its own training forward, which runs
        before its update."""
        pool, sub = self.pool, self.sub_batch(batch)
        frozen_losses, frozen_logits = pool.get_all_losses(self.model, sub, pool.stacked()[:-1])
        loss, logits = train_step(self.model, pool.prompts[-1], self.optimizer, batch)
        y_sub, live = sub["labels"], logits[: len(sub["labels"])]
        expert_logits = torch.cat([frozen_logits, live[None]])
        expert_losses = torch.cat([frozen_losses, per_prompt_losses(live[None], y_sub)])
        return expert_losses, expert_logits, y_sub, loss, logits

    def rise_detected(self, loss):
        """Fresh births: a Page-Hinkley test watches the best expert's loss on each batch. When it rises
        (every expert, memories included, is worse than before: a rule none of them knows), the next
        step births a prompt from random, which needs no unlearning; the detector then restarts.
        Returns whether this batch raised the alarm."""
        self.drift_losses.append(loss)
        self.detector.update(loss)
        if self.detector.drift_detected:
            self.drift_losses, self.detector, self.fresh_due = [], rise_detector(self.fresh_threshold), True
        return self.fresh_due

    @torch.inference_mode()
    def mixture_beyond(self, batch, m, live_logits):
        """FLH's prediction [B - m, C] on the examples after the loss batch's m, where the frozen
        experts were not scored: the mixture of the heaviest experts holding >= 1 - epsilon of the
        weight (stage 4's `heaviest`: every class probability within epsilon of the full mixture's).
        The live prompt's logits exist for every example (its training forward); only the frozen
        experts among the heaviest need a forward, and within a regime that is often none."""
        pool, rest = self.pool, batch_rows(batch, m)
        if m == len(live_logits):
            self.mixture_experts = len(pool)
            return live_logits[:0].softmax(-1)
        keep = pool.heaviest(self.mixture_epsilon)
        self.mixture_experts = len(keep)
        frozen = [k for k in keep if k < len(pool) - 1]  # the last expert is the live prompt
        if frozen:
            self.rest_logits.update(
                zip(frozen, forward_with_prompts(self.model, rest, pool.stacked()[frozen]))
            )
        logits = torch.stack([self.rest_logits.get(k, live_logits[m:]) for k in keep])
        return pool.mixture_probs(logits, keep)

    def expert_logits_everywhere(self, k, batch):
        """Expert k's logits [B, C] on the whole batch of the last step (the leader's prediction):
        from what the step computed, plus a forward on the rest where that did not cover it."""
        head = self.last_expert_logits[k]
        if k == len(self.pool) - 1:
            return self.last_live_logits
        if len(head) == len(batch["labels"]):
            return head
        if k not in self.rest_logits:
            rest = batch_rows(batch, len(head))
            with torch.no_grad():
                self.rest_logits[k] = forward_with_prompt(self.model, rest, self.pool.prompts[k])
        return torch.cat([head, self.rest_logits[k]])

    @torch.no_grad()
    def predict(self, batch):
        """Class probabilities [B, C] for a batch without labels, by the pool as it stands (nothing
        learns): FLH's mixture in snapshot and independent mode, the weighted-sum prompt in
        weighted_sum mode, as `step` predicts. Also, per example, the experts that produced it, with
        their weights (birth index, birth step, weight)."""
        pool = self.pool
        if self.train_mode == "weighted_sum":
            probs = forward_with_prompt(self.model, batch, pool.get_prompt("weighted_sum")).softmax(-1)
        else:
            probs = pool.mixture_probs(forward_with_prompts(self.model, batch, pool.stacked()))
        return probs, [pool.experts()] * len(probs)

    def sub_batch(self, batch):
        """The batch's first loss_batch examples (all of it when loss_batch is 0)."""
        if not self.loss_batch:
            return batch
        return batch_rows(batch, 0, self.loss_batch)

    def score_experts(self, batch):
        """Every expert's loss and logits on the batch (its first loss_batch examples, if set), and
        those labels."""
        sub = self.sub_batch(batch)
        return (*self.pool.get_all_losses(self.model, sub), sub["labels"])

    def state_dict(self):
        return {
            "pool": self.pool.state(),
            "optimizer": self.optimizer.state_dict(),
            "reservoir": self.reservoir and self.reservoir.state(),
            "drift_losses": list(self.drift_losses),
            "fresh_due": self.fresh_due,
        }

    def load_state_dict(self, state):
        self.pool.load_state(state["pool"])
        if self.reservoir:
            self.reservoir.load_state(state["reservoir"])
        self.drift_losses, self.fresh_due = list(state.get("drift_losses", [])), state.get("fresh_due", False)
        if self.detector:
            self.detector = rise_detector(self.fresh_threshold, self.drift_losses)  # replayed: same state
        groups = [{"params": [p]} for p in self.pool.prompts] or [{"params": [self._placeholder]}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=WEIGHT_DECAY)
        self.optimizer.load_state_dict(state["optimizer"])


def run_stream(learner, stream, steps, log, start=0, every=None, callback=None, desc=None):
    """Feed batches start..steps-1 to the learner, one log row each; callback(step) every `every`."""
    device = learner.model.device
    bar = common.progress(range(start, steps), desc=desc or learner.name, initial=start, total=steps)
    for s in bar:
        # test-then-train: the learner predicts batch s, then learns from it; the row holds the
        # prediction's accuracy, so every logged accuracy is on data not yet learned from
        row = learner.step(to_device(stream.batch(s), device))
        numbers = [row["loss"], *row.get("weights", ()), *row.get("expert_losses", ())]
        if not all(math.isfinite(x) for x in numbers):  # never log NaN: stop and say what to change
            raise common.UserError(
                f"step {s}: the loss or the weights are not finite ({row['loss']}); "
                "training diverged: lower --lr (or --alpha)"
            )
        log.write(row)
        if s % 20 == 0:
            bar.set_postfix(acc=f"{row['acc']:.2f}", prompts=row.get("num_prompts", 1))
        if callback and every and (s + 1) % every == 0:
            callback(s + 1)
    bar.close()


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
@functools.cache
def _minilm_rt():
    """For the checks: the embedded MiniLM, its tokenizer, the rt data and a stream of it without flips."""
    model, tok = load_backbone("minilm")
    rt = assets.load_text_data("rt")
    return model, tok, rt, TextStream(rt, tok, batch_size=8, flip_every_n=None, seed=0)


def test_overfit():
    """The plan's overfit check: 10 fixed batches, no flips; the loss falls below half its start."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(model, 10, 3e-2, FLHSettings(birth_interval=10**9))
    batches = [stream.batch(s) for s in range(10)]
    epoch_loss = []
    for epoch in range(8):
        rows = [learner.step({**b, "step": epoch * 10 + i}) for i, b in enumerate(batches)]
        epoch_loss.append(sum(r["loss"] for r in rows) / 10)
    assert epoch_loss[-1] < epoch_loss[0] / 2, epoch_loss
    print(
        f"  ok: overfitting 10 fixed batches: mean loss {epoch_loss[0]:.3f} -> {epoch_loss[-1]:.3f} in "
        "8 epochs"
    )


def test_prequential():
    """Prequential: a step's logged accuracies are those of the parameters before the step."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(model, 10, 5e-2, FLHSettings(alpha=0.5, birth_interval=3))
    for s in range(7):  # births at 0, 3, 6: step 6 checks the case of a fresh newcomer too
        b = stream.batch(100 + s)
        b["step"] = s
        if s in (4, 6):
            snapshot, rng = copy.deepcopy(learner), torch.get_rng_state()
            row = learner.step(b)
            if s % 3 == 0:  # replay the birth (same random init) so the snapshot has the same pool
                torch.set_rng_state(rng)
                snapshot.pool.birth_prompt()
            with torch.no_grad():
                w_sum = snapshot.pool.get_prompt("weighted_sum")
                acc = accuracy(forward_with_prompt(model, b, w_sum), b["labels"])
                _, logits = snapshot.pool.get_all_losses(model, b)
                acc_mix = accuracy(snapshot.pool.mixture_probs(logits), b["labels"])
            assert row["acc"] == r6(acc) and row["acc_mixture"] == r6(acc_mix), (
                row["acc"],
                acc,
                row["acc_mixture"],
                acc_mix,
            )
            assert not torch.equal(snapshot.pool.stacked(), learner.pool.stacked()), "the step did not learn"
        else:
            row = learner.step(b)
        assert set(row) >= {
            "step",
            "regime",
            "loss",
            "acc",
            "acc_mixture",
            "weights",
            "num_prompts",
            "entropy",
        }
    print(
        "  ok: the logged acc and acc_mixture equal those of the pre-update parameters (also right "
        "after a birth)"
    )


def test_loss_batch():
    """--loss-batch m: the experts' losses come from the first m examples only; training uses all."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(model, 10, 5e-2, FLHSettings(birth_interval=2, loss_batch=3))
    for s in range(3):
        b = {**stream.batch(200 + s), "step": s}
        snapshot, rng = copy.deepcopy(learner), torch.get_rng_state()
        row = learner.step(b)
        if s % 2 == 0:
            torch.set_rng_state(rng)
            snapshot.pool.birth_prompt()
        head, _ = snapshot.pool.get_all_losses(model, batch_rows(b, 0, 3))
        whole, _ = snapshot.pool.get_all_losses(model, b)
        assert row["expert_losses"] == r6(head.tolist()) != r6(whole.tolist()), (
            row["expert_losses"],
            head,
            whole,
        )
    print("  ok: --loss-batch 3 gives each expert its loss on the batch's first 3 examples")


def test_optimiser_follows_pool():
    """Optimiser follows the pool through FLH2 pruning: one group per live prompt, same objects."""
    model, tok, rt, stream = _minilm_rt()
    tiny, _ = load_backbone("random:tiny-bert")
    learner = FLHLearner(tiny, 2, 1e-3, FLHSettings(birth_interval=1, prune="flh2"))
    small = TextStream(rt, tok, batch_size=2, max_length=16, flip_every_n=None)
    for s in range(40):
        learner.step(small.batch(s))
    groups = [g["params"][0] for g in learner.optimizer.param_groups]
    assert len(groups) == len(learner.pool) < 40 and all(a is b for a, b in zip(groups, learner.pool.prompts))
    print(f"  ok: after 40 births with FLH2 the optimiser holds exactly the {len(learner.pool)} live prompts")


def test_snapshot():
    """Snapshot: the live prompt alone learns; a birth freezes it and continues from a copy, Adam moments
    too."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(
        model,
        10,
        5e-2,
        FLHSettings(
            alpha=1.0,
            birth_interval=4,
            birth_offset=2,
            train_mode="snapshot",
            loss_batch=4,
            share=0.01,
            prune="diverse",
            max_prompts=3,
            mixture_epsilon=0.3,
        ),
    )
    births, frozen, gaps = [], {}, []
    for s in range(12):
        b = {**stream.batch(300 + s), "step": s}
        before = [p.detach().clone() for p in learner.pool.prompts]
        ids_before = list(learner.pool.birth_ids)
        snap, rng = copy.deepcopy(learner), torch.get_rng_state()
        row = learner.step(b)
        pool = learner.pool
        if pool.birth_ids[-1] not in ids_before:
            births.append(s)
            if ids_before:  # the newborn copies the old live prompt and its Adam moments
                old, new = pool.prompts[-2], pool.prompts[-1]
                assert pool.birth_ids[-2] == ids_before[-1]
                assert torch.equal(old.detach(), before[-1]), "the old live prompt moved at its freezing"
                moved = learner.optimizer.state[new]["step"]
                assert moved == learner.optimizer.state[old]["step"] + 1, "Adam moments were not copied"
                frozen[ids_before[-1]] = before[-1]
            torch.set_rng_state(rng)
            snap.birth()
        for j, p in zip(pool.birth_ids[:-1], pool.prompts[:-1]):  # frozen experts never move again
            if j in frozen:
                assert torch.equal(p.detach(), frozen[j]), f"frozen expert {j} moved"
        # prequential: acc is the mixture of the experts as they were before the step, on every
        # example: all experts on the loss batch (4), the heaviest holding >= 1 - epsilon beyond it
        with torch.no_grad():
            _, logits = snap.pool.get_all_losses(model, b)  # every expert on every example
            keep = snap.pool.heaviest(learner.mixture_epsilon)
            full = snap.pool.mixture_probs(logits)
            want = torch.cat([full[:4], snap.pool.mixture_probs(logits[keep, 4:], keep)])
            acc_live = accuracy(forward_with_prompt(model, b, snap.pool.prompts[-1]), b["labels"])
        gap = (learner.last_mixture - full).abs().max().item()
        assert gap <= learner.mixture_epsilon + 1e-6 and (learner.last_mixture - want).abs().max() < 1e-5
        assert row["acc"] == row["acc_mixture"] == r6(accuracy(want, b["labels"])), (row, want)
        assert row["acc_live"] == r6(acc_live) and row["mixture_experts"] == len(keep)
        assert abs(row["loss"] - F.nll_loss(want.log(), b["labels"]).item()) < 1e-4
        gaps.append((len(keep) < len(snap.pool), gap))
        assert (
            len(pool) <= 3
            and abs(sum(pool.weights) - 1) < 1e-9
            and min(pool.weights) >= 0.01 / len(pool) - 1e-12
        )
    assert births == [0, 2, 6, 10], births
    truncated = [g for cut, g in gaps if cut]
    assert truncated and max(truncated) > 0, gaps  # the cheap prediction was used, and it differs
    print(
        f"  ok: beyond the loss batch the heaviest experts predict: on {len(truncated)} of 12 real batches "
        f"they were fewer than the pool, and every class probability stayed within epsilon 0.3 of the "
        f"full mixture (largest gap {max(g for _, g in gaps):.4f})"
    )
    print(
        "  ok: snapshot mode: births at 0, 2, 6, 10 (offset 2); a newborn copies the live prompt and "
        "its Adam "
        "moments; frozen experts never move; acc is the pre-update mixture"
    )


def test_birth_from():
    """birth_from='leader' copies the heaviest expert; 'random' starts from noise."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(
        model, 10, 5e-2, FLHSettings(birth_interval=10**9, train_mode="snapshot", birth_from="leader")
    )
    for s in range(3):
        learner.step({**stream.batch(400 + s), "step": s})
        if s < 2:
            learner.birth()
    learner.pool.log_w = torch.tensor([0.1, 0.7, 0.2], dtype=torch.float64).log()
    learner.birth()
    assert torch.equal(learner.pool.prompts[-1].detach(), learner.pool.prompts[1].detach())
    learner.birth_from = "random"
    learner.birth()
    assert all(
        not torch.equal(learner.pool.prompts[-1].detach(), p.detach()) for p in learner.pool.prompts[:-1]
    )
    print("  ok: --birth-from leader copies the heaviest expert; random starts from noise")


def test_reservoir():
    """The reservoir: a uniform sample of the whole past, the same however the steps arrive; its padded rows
    give each expert the same losses as the examples had in their own batches."""
    model, tok, rt, stream = _minilm_rt()
    flips = TextStream(rt, tok, batch_size=8, flip_every_n=50, seed=0)
    a, b = Reservoir(32), Reservoir(32)
    for s in range(200):
        a.add(flips.batch(s))
    b.load_state(a.state())  # a copy through its saved state, as a resumed run has it
    for s in range(200, 260):
        a.add(flips.batch(s)), b.add(flips.batch(s))
    assert torch.equal(a.keys, b.keys) and all(torch.equal(a.rows[k], b.rows[k]) for k in a.rows)
    steps = sorted({s for s in range(260) for i in range(8) if Reservoir.key(s, i) in set(a.keys.tolist())})
    assert len(a.keys) == 32 and steps[0] < 65 and steps[-1] > 195, steps  # early and late alike
    prompts = torch.randn(2, 10, model.embed_dim) * 0.1
    want = []
    for s in range(260):
        batch = flips.batch(s)
        for i in range(8):
            if Reservoir.key(s, i) in set(a.keys.tolist()):
                row = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask")}
                with torch.no_grad():
                    logits = forward_with_prompts(model, row, prompts)
                want.append(
                    (
                        Reservoir.key(s, i),
                        F.cross_entropy(logits[:, 0], batch["labels"][i].repeat(2), reduction="none"),
                    )
                )
    want = torch.stack([x for _, x in sorted(want)], 1)
    assert torch.allclose(a.losses(model, prompts), want, atol=2e-2), (
        (a.losses(model, prompts) - want).abs().max()
    )
    print(
        f"  ok: the reservoir samples steps {steps[0]}..{steps[-1]} of 260 uniformly, survives a save, and "
        "its padded rows score each example as its own batch did"
    )


def test_fresh_births():
    """Fresh births: a rise of the best expert's loss makes the next step's newborn random, not a copy."""
    model, tok, rt, stream = _minilm_rt()
    learner = FLHLearner(
        model,
        10,
        5e-2,
        FLHSettings(
            birth_interval=10**9, train_mode="snapshot", prune="reservoir", max_prompts=3, fresh_threshold=2.0
        ),
    )
    flips = TextStream(rt, tok, batch_size=8, flip_every_n=50, seed=0)
    for s in range(3):
        learner.step(flips.batch(s))
    for loss in [0.3] * 40 + [1.5] * 30:  # the losses a flip gives: ADWIN raises the alarm
        if learner.rise_detected(loss):
            break
    assert learner.fresh_due, "no alarm at a rise of 1.2 nats"
    live = learner.pool.prompts[-1].detach().clone()
    row = learner.step(flips.batch(3))
    assert row["fresh_birth"] and len(learner.pool) == 2 and not torch.equal(learner.pool.prompts[-1], live)
    assert torch.equal(learner.pool.prompts[0].detach(), live)  # the old live prompt: a frozen memory
    assert int(learner.optimizer.state[learner.pool.prompts[-1]]["step"]) == 1  # new Adam moments, its own
    g = torch.Generator().manual_seed(0)
    losses = torch.rand(200, generator=g) * 0.3 + torch.tensor([0.3, 1.2, 0.4, 1.0]).repeat_interleave(50)

    def alarms(learner, start=0, stop=200):  # the steps of losses[start:stop] that raise an alarm
        found = []
        for s, x in enumerate(losses[start:stop].tolist(), start):
            if learner.rise_detected(x):
                found.append(s)
                learner.fresh_due = False  # as the next step's fresh birth does
        return found

    whole, cut, resumed = (
        FLHLearner(model, 10, 1e-3, FLHSettings(birth_interval=10**9, fresh_threshold=2.0)) for _ in range(3)
    )
    found, before = alarms(whole), alarms(cut, 0, 70)
    for learner in (cut, resumed):
        learner.pool.birth_prompt()  # a pool to save
    resumed.load_state_dict(cut.state_dict())  # a detector restored mid-stream, by replaying its losses
    again = alarms(resumed, 70)
    assert found[0] in range(50, 65) and found == before + again and 150 <= again[0] < 165, (found, again)
    falls = FLHLearner(model, 10, 1e-3, FLHSettings(birth_interval=10**9, fresh_threshold=2.0))
    assert not any(falls.rise_detected(x) for x in [1.5] * 40 + [0.3] * 30), "a fall raised a fresh birth"
    print(
        f"  ok: fresh births: a rise of the best expert's loss births a random prompt, the live one is kept "
        f"frozen; a fall does not; rises at 50 and 150 alarm at {found}, the same after a restore"
    )


def test_independent():
    """independent: one backward on the sum gives every prompt the gradient of its own loss."""
    _, tok, rt, _ = _minilm_rt()
    tiny, _ = load_backbone("random:tiny-bert")
    small = TextStream(rt, tok, batch_size=2, max_length=16, flip_every_n=None)
    learner = FLHLearner(tiny, 3, 1e-3, FLHSettings(birth_interval=10**9, train_mode="independent"))
    for _ in range(3):
        learner.pool.birth_prompt()
    b = small.batch(5)
    losses = per_prompt_losses(forward_with_prompts(tiny, b, learner.pool.stacked()), b["labels"])
    losses.sum().backward()
    together = [p.grad.clone() for p in learner.pool.prompts]
    for i, p in enumerate(learner.pool.prompts):
        learner.pool.zero_grad()
        per_prompt_losses(forward_with_prompts(tiny, b, p[None]), b["labels"]).sum().backward()
        assert torch.allclose(p.grad, together[i], atol=1e-6), (i, (p.grad - together[i]).abs().max())
    print(
        "  ok: independent mode: each prompt's gradient equals that of its own loss, from one backward pass"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


def prepare(args):
    """Seed, device, frozen backbone and stream from parsed flags: how every text run starts."""
    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    model, tok = load_backbone(args.backbone, pooling=args.pooling, device=device)
    stream = build_stream(args, tok, max_length=min(args.max_length, text_budget(model, args.prompt_length)))
    args.precision = choose_precision(
        model, stream.batch(0), args.precision, args.prompt_length
    )  # config.json says which
    return model, stream


def fresh_run(learner, stream, args):
    """A new run under --out/--run-name: config.json, a fresh log.jsonl over --steps. Returns the rows."""
    out = common.run_dir(args.out, args.run_name)
    with common.locked(out):
        common.write_json(out / "config.json", vars(args))
        (out / "log.jsonl").unlink(missing_ok=True)
        log = common.JsonlLog(out / "log.jsonl")
        try:
            run_stream(learner, stream, args.steps, log)
        finally:
            log.close()
        return common.read_jsonl(out / "log.jsonl")


def build_parser():
    p = common.Parser(description="Stage 5: run FLH on the changing stream and write one log row per step.")
    common.add_settings(p, StreamSettings)
    common.add_settings(p, ModelSettings)
    common.add_settings(p, RunSettings)
    common.add_settings(p, FLHSettings)
    common.add_common_args(p, run_name="flh")
    return p


def main(args):
    if args.test:
        return run_tests()
    model, stream = prepare(args)
    learner = FLHLearner(model, args.prompt_length, args.lr, common.settings(FLHSettings, args))
    t0 = time.time()
    rows = fresh_run(learner, stream, args)
    last = rows[-100:]
    print(
        f"{len(rows)} steps in {time.time() - t0:.0f}s -> {args.out}/{args.run_name}/log.jsonl; last "
        f"{len(last)} steps: "
        f"acc {sum(r['acc'] for r in last) / len(last):.3f}, acc_mixture "
        f"{sum(r['acc_mixture'] for r in last) / len(last):.3f}, {rows[-1]['num_prompts']} prompts"
    )


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
