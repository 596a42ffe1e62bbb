"""Stage 5: one train step and the FLH outer loop, evaluated test-then-train.

Per batch s of the stream (DESIGN.md sec. 4):
  1. birth     if s % birth_interval == 0: a new prompt joins the pool (and the optimiser);
  2. predict   with the parameters as they are *before* seeing batch s's labels:
                 acc          accuracy of the weighted-sum prompt  p = sum_i w_i p_i  (the plan's);
                 acc_mixture  accuracy of FLH's mixture  sum_i w_i softmax(f(x; p_i));
  3. learn     one AdamW step on  CE(f(x; p), y)  (gradient flows into every p_i, scaled by w_i),
               then  w_i <- w_i exp(-alpha l_i)  with each expert's loss l_i on batch s.

This is *prequential* (test-then-train) evaluation: the accuracy logged for step s was earned on
data the model had not learned from. The public reference logged the accuracy of the batch it
had just trained on, which overstates how fast anything recovers.

Both predictions come almost for free: the expert losses need the K-prompt pass anyway (stage 3
batches it), and the weighted-sum logits come from the training forward before its backward.

Note for the write-up: under weighted-sum training prompt i's gradient is w_i times the shared one,
but Adam divides by a running gradient scale, which cancels most of w_i: old, light prompts keep
moving almost as fast as the leader.

One JSONL row per step: step, regime, domain, loss, acc, acc_mixture, mixture_loss, weights,
prompt_ids (birth index of each live prompt), expert_losses, num_prompts, entropy.

Run `python stage5_train.py` for a short FLH stream on the defaults (log under runs/<run-name>/),
`--test` for the checks (10 fixed batches are overfitted; logged accuracy is prequential).
"""
import copy
import time

import torch
import torch.nn.functional as F

import common
from stage2_stream import TextStream, add_stream_args, build_stream
from stage3_backbone import forward_with_prompt, load_backbone, text_budget
from stage4_pool import FLHPromptPool


def to_device(batch, device):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def accuracy(logits, labels):
    return float((logits.argmax(-1) == labels).float().mean())


def r6(x):
    """Floats rounded to 6 significant digits: logs stay small and still deterministic."""
    return [r6(v) for v in x] if isinstance(x, (list, tuple)) else float(f"{float(x):.6g}")


def base_row(batch, loss, logits):
    """The fields every method logs: where the step is, its training loss, its prequential accuracy."""
    return {"step": batch["step"], "regime": batch["regime"], "domain": batch["domain"],
            "loss": r6(loss), "acc": r6(accuracy(logits, batch["labels"]))}


def train_step(model, prompt, optimizer, batch):
    """One AdamW step on CE(f(x; prompt), y). Returns (loss, logits before the step)."""
    logits = forward_with_prompt(model, batch["input_ids"], batch["attention_mask"], prompt)
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


class FLHLearner:
    """FLH over a pool of prompts, trained on the weighted-sum prompt. `step(batch)` -> log row."""

    name = "flh"

    def __init__(self, model, prompt_length, lr=1e-3, alpha=0.1, birth_interval=500,
                 prune="none", max_prompts=None, weight_decay=0.01):
        self.model, self.birth_interval = model, birth_interval
        self.pool = FLHPromptPool(prompt_length, model.embed_dim, alpha, prune, max_prompts,
                                  device=model.head.weight.device)
        # AdamW needs at least one parameter: start with a placeholder group, dropped at the 1st birth.
        self._placeholder = torch.nn.Parameter(torch.zeros(1))
        self.lr, self.weight_decay = lr, weight_decay
        self.optimizer = torch.optim.AdamW([self._placeholder], lr=lr, weight_decay=weight_decay)

    def step(self, batch):
        model, pool, y = self.model, self.pool, batch["labels"]
        if batch["step"] % self.birth_interval == 0:
            added, removed = pool.birth_prompt()
            follow_pool(self.optimizer, added, removed + [self._placeholder])
        weights, entropy = pool.weights, pool.entropy()                 # the weights that predict batch s
        expert_losses, expert_logits = pool.get_all_losses(model, batch)
        mixture = pool.mixture_probs(expert_logits)
        loss, logits = train_step(model, pool.get_prompt("weighted_sum"), self.optimizer, batch)
        pool.update_weights(expert_losses)
        return {**base_row(batch, loss, logits), "acc_mixture": r6(accuracy(mixture, y)),
                "mixture_loss": r6(F.nll_loss(mixture.clamp_min(1e-12).log(), y)),
                "weights": r6(weights), "prompt_ids": list(pool.birth_ids),
                "expert_losses": r6(expert_losses.tolist()), "num_prompts": len(pool), "entropy": r6(entropy)}

    def state_dict(self):
        return {"pool": self.pool.state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        self.pool.load_state(state["pool"])
        groups = [{"params": [p]} for p in self.pool.prompts] or [{"params": [self._placeholder]}]
        self.optimizer = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
        self.optimizer.load_state_dict(state["optimizer"])


def run_stream(learner, stream, steps, log, start=0, every=None, callback=None, desc=None):
    """Feed batches start..steps-1 to the learner, one log row each; callback(step) every `every`."""
    device = learner.model.head.weight.device
    bar = common.progress(range(start, steps), desc=desc or learner.name, initial=start, total=steps)
    for s in bar:
        row = learner.step(to_device(stream.batch(s), device))
        log.write(row)
        if s % 20 == 0:
            bar.set_postfix(acc=f"{row['acc']:.2f}", prompts=row.get("num_prompts", 1))
        if callback and every and (s + 1) % every == 0:
            callback(s + 1)
    bar.close()


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def run_tests():
    t0 = time.time()
    torch.manual_seed(0)
    model, tok = load_backbone("minilm")
    rt = common.load_text_data("rt")
    stream = TextStream(rt, tok, batch_size=8, flip_every_n=None, seed=0)

    # The plan's overfit check: 10 fixed batches, no flips; the loss falls below half its start.
    learner = FLHLearner(model, prompt_length=10, lr=3e-2, birth_interval=10 ** 9)
    batches = [stream.batch(s) for s in range(10)]
    epoch_loss = []
    for epoch in range(8):
        rows = [learner.step({**b, "step": epoch * 10 + i}) for i, b in enumerate(batches)]
        epoch_loss.append(sum(r["loss"] for r in rows) / 10)
    assert epoch_loss[-1] < epoch_loss[0] / 2, epoch_loss
    print(f"  ok: overfitting 10 fixed batches: mean loss {epoch_loss[0]:.3f} -> {epoch_loss[-1]:.3f} in 8 epochs")

    # Prequential: a step's logged accuracies are those of the parameters before the step.
    learner = FLHLearner(model, prompt_length=10, lr=5e-2, alpha=0.5, birth_interval=3)
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
                acc = accuracy(forward_with_prompt(model, b["input_ids"], b["attention_mask"], w_sum), b["labels"])
                _, logits = snapshot.pool.get_all_losses(model, b)
                acc_mix = accuracy(snapshot.pool.mixture_probs(logits), b["labels"])
            assert row["acc"] == r6(acc) and row["acc_mixture"] == r6(acc_mix), (row["acc"], acc, row["acc_mixture"], acc_mix)
            assert not torch.equal(snapshot.pool.stacked(), learner.pool.stacked()), "the step did not learn"
        else:
            row = learner.step(b)
        assert set(row) >= {"step", "regime", "loss", "acc", "acc_mixture", "weights", "num_prompts", "entropy"}
    print("  ok: the logged acc and acc_mixture equal those of the pre-update parameters (also right after a birth)")

    # Optimiser follows the pool through FLH2 pruning: one group per live prompt, same objects.
    tiny, _ = load_backbone("random:tiny-bert")
    learner = FLHLearner(tiny, prompt_length=2, birth_interval=1, prune="flh2")
    small = TextStream(rt, tok, batch_size=2, max_length=16, flip_every_n=None)
    for s in range(40):
        learner.step(small.batch(s))
    groups = [g["params"][0] for g in learner.optimizer.param_groups]
    assert len(groups) == len(learner.pool) < 40 and all(a is b for a, b in zip(groups, learner.pool.prompts))
    print(f"  ok: after 40 births with FLH2 the optimiser holds exactly the {len(learner.pool)} live prompts")
    print(f"stage 5 checks passed in {time.time() - t0:.1f}s")


def add_model_args(parser, prompt_length=10):
    parser.add_argument("--backbone", default="minilm",
                        help="minilm (embedded, default) | random:tiny-bert | random:bert-base | hub id | folder")
    parser.add_argument("--pooling", choices=["cls", "mean"], default=None,
                        help="read-out (default: mean for minilm, cls for BERT models)")
    parser.add_argument("--prompt-length", type=common.positive_int, default=prompt_length,
                        help=f"soft tokens per prompt (default: {prompt_length})")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="encoder arithmetic: bf16 autocast or fp32; auto = bf16 where the device has "
                             "native bf16 (recent CPUs and GPUs), else fp32 (default: auto)")


def prepare(args):
    """Seed, device, frozen backbone and stream from parsed flags: how every text run starts."""
    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    model, tok = load_backbone(args.backbone, pooling=args.pooling, device=device)
    model.precision = args.precision = common.resolve_precision(args.precision, device)  # config.json says which
    stream = build_stream(args, tok, max_length=min(args.max_length, text_budget(model, args.prompt_length)))
    return model, stream


def fresh_run(learner, stream, args):
    """A new run under --out/--run-name: config.json, a fresh log.jsonl over --steps. Returns the rows."""
    out = common.run_dir(args.out, args.run_name)
    common.write_json(out / "config.json", vars(args))
    (out / "log.jsonl").unlink(missing_ok=True)
    log = common.JsonlLog(out / "log.jsonl")
    run_stream(learner, stream, args.steps, log)
    log.close()
    return common.read_jsonl(out / "log.jsonl")


def build_parser():
    p = common.Parser(description="Stage 5: run FLH on the changing stream and write one log row per step.")
    add_stream_args(p)
    add_model_args(p)
    p.add_argument("--steps", type=common.positive_int, default=300, help="batches to train on (default: 300)")
    p.add_argument("--birth-interval", type=common.positive_int, default=100, help="steps between births (default: 100)")
    p.add_argument("--alpha", type=common.nonneg_float, default=0.1, help="FLH learning rate alpha (default: 0.1)")
    p.add_argument("--lr", type=common.positive_float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--prune", choices=["none", "flh2"], default="none", help="pool pruning (default: none)")
    p.add_argument("--max-prompts", type=common.positive_int, default=None, help="cap on live prompts (default: none)")
    common.add_common_args(p, run_name="flh")
    return p


def main(args):
    if args.test:
        return run_tests()
    model, stream = prepare(args)
    learner = FLHLearner(model, args.prompt_length, args.lr, args.alpha, args.birth_interval,
                         args.prune, args.max_prompts)
    t0 = time.time()
    rows = fresh_run(learner, stream, args)
    last = rows[-100:]
    print(f"{len(rows)} steps in {time.time() - t0:.0f}s -> {args.out}/{args.run_name}/log.jsonl; last {len(last)} steps: "
          f"acc {sum(r['acc'] for r in last) / len(last):.3f}, acc_mixture "
          f"{sum(r['acc_mixture'] for r in last) / len(last):.3f}, {rows[-1]['num_prompts']} prompts")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
