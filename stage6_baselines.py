"""Stage 6: three baselines that FLH has to beat, behind the same interface as FLH.

  single      one prompt, trained on every batch. It must *unlearn* after every change of rules.
  random      K prompts made at the start; each batch draws one uniformly at random, predicts with
              it and trains it. No weights, no memory of which prompt suits which regime.
  similarity  mini-L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022):
              K prompts with learned keys k_j. The query q(x) is the frozen backbone's [CLS] state
              *without* any prompt (one no-grad pass). Example x uses prompt j*(x) = argmax_j cos(q, k_j),
                  loss = CE(f(x; p_j*), y) - 0.1 * cos(q(x), k_j*),
              which trains the selected prompts and pulls their keys towards their queries.
              Selection looks only at the input, so when labels flip on the *same* inputs it keeps
              picking the same prompt, which must unlearn like the single prompt (the plan's
              hypothesis: it fails to recover).

Every method, FLH included (stage 5), is a *learner*: `step(batch)` predicts on the batch with the
parameters it has, then learns from the batch's labels, and returns one log row; `state_dict()` /
`load_state_dict()` hold everything a checkpoint needs. The runner of stage 8 treats them alike.
`make_learner(method, model, ...)` builds any of the four.

Run `python stage6_baselines.py --method similarity` for a short run, `--test` for the checks.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import common
from stage2_stream import TextStream, add_stream_args
from stage3_backbone import forward_with_example_prompts, load_backbone
from stage5_train import FLHLearner, add_model_args, base_row, fresh_run, prepare, train_step

METHODS = ["flh", "single", "random", "similarity"]


class PromptLearner:
    """Shared parts: a list of trainable tensors, one AdamW over them, checkpointing."""

    def __init__(self, model, params, lr, weight_decay=0.01):
        self.model, self.params = model, params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def state_dict(self):
        return {"params": [p.detach().cpu().clone() for p in self.params], "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state):
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])


def new_prompt(model, prompt_length, std=0.02):
    return nn.Parameter(torch.randn(prompt_length, model.embed_dim).to(model.head.weight.device) * std)


class SingleLearner(PromptLearner):
    name = "single"

    def __init__(self, model, prompt_length, lr=1e-3):
        self.prompt = new_prompt(model, prompt_length)
        super().__init__(model, [self.prompt], lr)

    def step(self, batch):
        loss, logits = train_step(self.model, self.prompt, self.optimizer, batch)
        return {**base_row(batch, loss, logits), "num_prompts": 1}


class RandomPoolLearner(PromptLearner):
    """K prompts; each batch draws one uniformly (from torch's global RNG, which checkpoints keep)."""
    name = "random"

    def __init__(self, model, prompt_length, num_prompts=10, lr=1e-3):
        self.prompts = [new_prompt(model, prompt_length) for _ in range(num_prompts)]
        super().__init__(model, self.prompts, lr)

    def draw(self):
        return int(torch.randint(len(self.prompts), (1,)))

    def step(self, batch):
        j = self.draw()
        # AdamW skips parameters whose grad is None, so only the drawn prompt moves.
        loss, logits = train_step(self.model, self.prompts[j], self.optimizer, batch)
        return {**base_row(batch, loss, logits), "num_prompts": len(self.prompts), "selected": j}


class SimilarityLearner(PromptLearner):
    """mini-L2P: per-example prompt chosen by cosine similarity of the [CLS] query to learned keys."""
    name = "similarity"

    def __init__(self, model, prompt_length, num_prompts=10, lr=1e-3, key_weight=0.1):
        self.prompts = [new_prompt(model, prompt_length) for _ in range(num_prompts)]
        self.keys = [nn.Parameter(torch.randn(model.embed_dim).to(model.head.weight.device)) for _ in range(num_prompts)]
        self.key_weight = key_weight
        super().__init__(model, self.prompts + self.keys, lr)


    def select(self, q):
        """Index of the nearest key for each query, and the (differentiable) similarities [B, K]."""
        sim = F.cosine_similarity(q[:, None], torch.stack(self.keys)[None], dim=-1)
        return sim.argmax(1), sim

    def step(self, batch):
        q = self.model.query(batch)  # the frozen [CLS] state, no prompt
        idx, sim = self.select(q)
        logits = forward_with_example_prompts(self.model, batch, torch.stack(self.prompts)[idx])
        ce = F.cross_entropy(logits, batch["labels"])
        loss = ce - self.key_weight * sim.gather(1, idx[:, None]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        counts = torch.bincount(idx, minlength=len(self.prompts)).tolist()
        return {**base_row(batch, ce.item(), logits.detach()), "num_prompts": len(self.prompts), "selected": counts}


def make_learner(method, model, prompt_length, lr, num_prompts=10, alpha=0.1, birth_interval=500,
                 prune="none", max_prompts=None, loss_batch=0):
    """Any of the four methods as a learner."""
    if method == "flh":
        return FLHLearner(model, prompt_length, lr, alpha, birth_interval, prune, max_prompts, loss_batch=loss_batch)
    if method == "single":
        return SingleLearner(model, prompt_length, lr)
    if method == "random":
        return RandomPoolLearner(model, prompt_length, num_prompts, lr)
    if method == "similarity":
        return SimilarityLearner(model, prompt_length, num_prompts, lr)
    raise common.UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def run_tests():
    t0 = time.time()
    model, tok = load_backbone("minilm")
    texts, labels = common.load_text_data("rt")["rt"]
    # A fixed-label stream over 80 sentences, 40 of each class (the file is sorted by label),
    # so that 100 batches of 8 pass over each 10 times.
    pick = [i for i, y in enumerate(labels) if y == 1][:40] + [i for i, y in enumerate(labels) if y == 0][:40]
    small = TextStream({"rt": ([texts[i] for i in pick], [labels[i] for i in pick])}, tok, batch_size=8,
                       max_length=64, flip_every_n=None)
    for method in ("single", "random", "similarity"):
        torch.manual_seed(0)
        learner = make_learner(method, model, prompt_length=8, lr=3e-2, num_prompts=2)
        rows = [learner.step(small.batch(s)) for s in range(100)]
        late = sum(r["acc"] for r in rows[50:]) / 50
        assert late > 0.6, (method, late)   # 400 examples: 0.6 is 4 standard errors above chance
        print(f"  ok: {method} learns a fixed-label stream: prequential accuracy over steps 50-99 = {late:.2f}")
    stream = TextStream({"rt": (texts, labels)}, tok, batch_size=8, max_length=64, flip_every_n=None)

    # Random selection is uniform: 10 prompts, 5,000 draws, every count within 15% of 500.
    torch.manual_seed(0)
    learner = RandomPoolLearner(model, 2, num_prompts=10)
    counts = torch.bincount(torch.tensor([learner.draw() for _ in range(5000)]), minlength=10)
    assert ((counts - 500).abs() < 75).all(), counts
    print(f"  ok: random draws are uniform: counts {counts.tolist()}")

    # Similarity picks the nearest key, and the keys move towards their queries.
    torch.manual_seed(0)
    learner = SimilarityLearner(model, prompt_length=4, num_prompts=4, lr=5e-2)
    batch = stream.batch(0)
    q = model.query(batch)
    idx, _ = learner.select(q)
    for b in range(len(q)):
        cos = [float(F.cosine_similarity(q[b], k.detach(), dim=0)) for k in learner.keys]
        assert int(idx[b]) == max(range(4), key=cos.__getitem__)
    before = F.cosine_similarity(q, torch.stack(learner.keys)[idx].detach(), dim=-1).mean()
    for _ in range(5):
        learner.step(batch)
    after = F.cosine_similarity(q, torch.stack(learner.keys)[idx].detach(), dim=-1).mean()
    assert after > before + 0.05, (before, after)
    print(f"  ok: similarity picks the nearest key; 5 steps raise cos(query, its key) {before:.3f} -> {after:.3f}")
    print(f"stage 6 checks passed in {time.time() - t0:.1f}s")


def build_parser():
    p = common.Parser(description="Stage 6: run one baseline on the changing stream (stage 8 runs them all).")
    p.add_argument("--method", choices=METHODS, default="single", help="which learner (default: single)")
    add_stream_args(p)
    add_model_args(p)
    p.add_argument("--steps", type=common.positive_int, default=300, help="batches (default: 300)")
    p.add_argument("--num-prompts", type=common.positive_int, default=10, help="K for random/similarity (default: 10)")
    p.add_argument("--lr", type=common.positive_float, default=1e-2, help="AdamW learning rate (default: 1e-2)")
    common.add_common_args(p, run_name="baseline")
    return p


def main(args):
    if args.test:
        return run_tests()
    model, stream = prepare(args)
    learner = make_learner(args.method, model, args.prompt_length, args.lr, args.num_prompts)
    rows = fresh_run(learner, stream, args)[-100:]
    print(f"{args.method}: accuracy over the last {len(rows)} steps {sum(r['acc'] for r in rows) / len(rows):.3f} "
          f"-> {args.out}/{args.run_name}/log.jsonl")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
