"""Stage 4: a pool of soft prompts weighted by Follow-the-Leading-History (FLH).

Each prompt is an *expert* born at some step. FLH (Hazan & Seshadhri, "Efficient learning
algorithms for changing environments", ICML 2009) keeps a distribution w over the live experts:

  birth     at the t-th birth (t counts births, the newcomer included)
                w_new = 1/t,      w_i <- (1 - 1/t) w_i  for every older expert;
  update    after a batch with per-expert losses l_i
                w_i <- w_i exp(-alpha l_i) / sum_j w_j exp(-alpha l_j).

The birth step is what makes FLH *adaptive*: a newcomer always gets a fixed share 1/t, so after a
change of rules an expert trained only on the new rules starts with real weight and, if its loss
is lower, takes over within a few batches of exponential updates, however long the old leader
led. (Fixed Share, which the public reference implemented under FLH's name, mixes towards the
uniform distribution instead.)

We keep log-weights and normalise with logsumexp, so thousands of updates with large losses
never underflow to 0/0. Weights are exposed as plain floats.

Pruning (FLH2). Every expert costs a forward pass per step. FLH2 keeps O(log T) of them: the
expert of birth index j = r 2^k (r odd) lives for 2^(k+2) + 1 births, then is removed and the rest
renormalised. Births 1, 2, 3 ... therefore survive for 5, 9, 5, 17, 5, 9, 5, 33 ... births: recent
experts are dense, old ones sparse. A plain `max_prompts` cap (drop the lightest) is offered too.

Prediction. `get_prompt('weighted_sum')` gives the plan's prompt sum_i w_i p_i; FLH's own
prediction is the mixture sum_i w_i softmax(f(x; p_i)), which `get_all_losses` makes possible from
the same batched pass that gives the losses (it returns the logits too).

Run `python stage4_pool.py` for a small simulation, `--test` for the arithmetic checks.
"""
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import common
from stage3_backbone import forward_with_prompt, forward_with_prompts, load_backbone


def flh2_lifetime(j):
    """Births that expert j = r 2^k (r odd) lives for: 2^(k+2) + 1."""
    k = (j & -j).bit_length() - 1
    return 2 ** (k + 2) + 1


class FLHPromptPool(nn.Module):
    """Soft prompts [P, D] with FLH weights. `prune`: 'none' or 'flh2'; `max_prompts`: a cap."""

    def __init__(self, prompt_length, embed_dim, alpha=0.1, prune="none", max_prompts=None, init_std=0.02,
                 device="cpu"):
        super().__init__()
        if prune not in ("none", "flh2"):
            raise common.UserError(f"unknown pruning {prune!r}; choose none or flh2")
        self.prompt_length, self.embed_dim, self.alpha = prompt_length, embed_dim, alpha
        self.prune, self.max_prompts, self.init_std = prune, max_prompts, init_std
        self.device = torch.device(device)  # where prompts live; weights stay on the CPU in float64
        self.prompts = nn.ParameterList()
        self.log_w = torch.zeros(0, dtype=torch.float64)
        self.birth_ids = []      # the birth index t of each live prompt (1-based, ever increasing)
        self.num_births = 0

    def __len__(self):
        return len(self.prompts)

    @property
    def weights(self):
        return self.log_w.exp().tolist()

    def entropy(self):
        """-sum w log w of the current weights (0 for one prompt, log K for uniform)."""
        return float(-(self.log_w.exp() * self.log_w).sum())

    def _remove(self, keep):
        """Keep the prompts at indices `keep`, renormalise; returns the removed Parameters."""
        removed = [p for i, p in enumerate(self.prompts) if i not in keep]
        self.prompts = nn.ParameterList([self.prompts[i] for i in keep])
        self.birth_ids = [self.birth_ids[i] for i in keep]
        self.log_w = self.log_w[keep] - self.log_w[keep].logsumexp(0)
        return removed

    def birth_prompt(self):
        """Birth t: prune (FLH2 / cap), then w_i *= 1 - 1/t and w_new = 1/t.
        Returns (the new Parameter, the removed Parameters) so an optimiser can follow."""
        t = self.num_births + 1
        removed = []
        if self.prune == "flh2":
            keep = [i for i, j in enumerate(self.birth_ids) if t < j + flh2_lifetime(j)]
            if len(keep) < len(self):
                removed += self._remove(keep)
        if self.max_prompts and len(self) >= self.max_prompts:
            order = sorted(range(len(self)), key=lambda i: -self.log_w[i].item())
            removed += self._remove(sorted(order[:self.max_prompts - 1]))
        prompt = nn.Parameter((torch.randn(self.prompt_length, self.embed_dim) * self.init_std).to(self.device))
        self.prompts.append(prompt)
        # The survivors sum to 1 (pruning renormalises), so after mixing the weights sum to 1 again.
        shrink = math.log1p(-1 / t) if t > 1 else 0.0
        self.log_w = torch.cat([self.log_w + shrink, torch.tensor([-math.log(t)], dtype=torch.float64)])
        self.birth_ids.append(t)
        self.num_births = t
        return prompt, removed

    def update_weights(self, losses):
        """w_i <- w_i exp(-alpha l_i), renormalised (in log space)."""
        losses = torch.as_tensor(losses, dtype=torch.float64).cpu()
        self.log_w = self.log_w - self.alpha * losses
        self.log_w = self.log_w - self.log_w.logsumexp(0)

    def stacked(self):
        """All prompts as one [K, P, D] tensor (differentiable)."""
        return torch.stack(list(self.prompts))

    def get_prompt(self, mode="weighted_sum"):
        """weighted_sum: sum_i w_i p_i; sample: one prompt drawn from w; top_k: the heaviest."""
        w = self.log_w.exp()
        if mode == "weighted_sum":
            return torch.einsum("k,kpd->pd", w.to(self.device, torch.float32), self.stacked())
        if mode == "sample":
            return self.prompts[int(torch.multinomial(w, 1))]
        if mode == "top_k":
            return self.prompts[int(w.argmax())]
        raise ValueError(f"unknown mode {mode!r}")

    @torch.no_grad()
    def get_all_losses(self, model, batch):
        """Every prompt's mean cross-entropy on the batch from one batched no-grad pass.
        Returns (losses [K], logits [K, B, C])."""
        logits = forward_with_prompts(model, batch, self.stacked())
        return per_prompt_losses(logits, batch["labels"]), logits

    def mixture_probs(self, logits):
        """FLH's prediction sum_i w_i softmax(logits_i): [B, C] from logits [K, B, C]."""
        w = self.log_w.exp().to(logits.device, logits.dtype)
        return torch.einsum("k,kbc->bc", w, logits.softmax(-1))

    # -- checkpointing ------------------------------------------------------------------------
    def state(self):
        return {"prompts": self.stacked().detach().cpu(), "log_w": self.log_w.clone(),
                "birth_ids": list(self.birth_ids), "num_births": self.num_births}

    def load_state(self, state):
        self.prompts = nn.ParameterList([nn.Parameter(p.clone().to(self.device)) for p in state["prompts"]])
        self.log_w = state["log_w"].clone()
        self.birth_ids, self.num_births = list(state["birth_ids"]), state["num_births"]


def per_prompt_losses(logits, labels):
    """Mean cross-entropy of each of K prompts: logits [K, B, C], labels [B] -> [K]."""
    K, B, C = logits.shape
    return F.cross_entropy(logits.reshape(K * B, C), labels.repeat(K), reduction="none").view(K, B).mean(1)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def run_tests():
    t0 = time.time()
    torch.manual_seed(0)
    # The plan's test: three prompts, losses [0.5, 1.0, 2.0] -> weight moves to the first.
    pool = FLHPromptPool(prompt_length=4, embed_dim=8, alpha=1.0)
    for _ in range(3):
        pool.birth_prompt()
    before = pool.weights
    pool.update_weights([0.5, 1.0, 2.0])
    after = pool.weights
    assert after[0] > before[0] and after[2] < before[2] and max(range(3), key=after.__getitem__) == 0
    expected = [math.exp(-l) for l in (0.5, 1.0, 2.0)]
    assert all(abs(a - e / sum(expected)) < 1e-12 for a, e in zip(after, expected))
    print(f"  ok: plan's test: weights {[round(w, 3) for w in before]} -> {[round(w, 3) for w in after]}")

    # Exact birth arithmetic: newcomer 1/t, the others scaled by (1 - 1/t), after an update.
    pool = FLHPromptPool(4, 8, alpha=0.5)
    for t in range(1, 8):
        old = pool.weights
        pool.birth_prompt()
        w = pool.weights
        assert abs(w[-1] - 1 / t) < 1e-12 and all(abs(a - b * (1 - 1 / t)) < 1e-12 for a, b in zip(w, old))
        assert abs(sum(w) - 1) < 1e-12
        pool.update_weights(torch.rand(len(pool)) * 3)
    print("  ok: the t-th newcomer gets exactly 1/t and the others shrink by (1 - 1/t), t = 1..7")

    # Stability: 10,000 updates with losses up to 20 (alpha 1) never give NaN or lose the normalisation.
    for _ in range(10_000):
        pool.update_weights(torch.rand(len(pool)) * 20)
    w = torch.tensor(pool.weights)
    assert torch.isfinite(pool.log_w).all() and torch.isfinite(w).all() and abs(w.sum() - 1) < 1e-9
    print(f"  ok: 10,000 updates with losses in [0, 20]: weights finite, sum = {w.sum():.12f}")

    # FLH2: after 1,000 births at most 2 log2(1000) + 4 prompts live, and the newest always does.
    pool = FLHPromptPool(2, 2, prune="flh2")
    most = 0
    for t in range(1, 1001):
        pool.birth_prompt()
        pool.update_weights(torch.rand(len(pool)))
        assert pool.birth_ids[-1] == t and abs(sum(pool.weights) - 1) < 1e-9
        most = max(most, len(pool))
    bound = 2 * math.log2(1000) + 4
    assert len(pool) <= bound and most <= bound, (len(pool), most)
    print(f"  ok: FLH2 keeps {len(pool)} of 1000 prompts alive (at most {most}; bound {bound:.1f}), newest never pruned")

    # A cap keeps the heaviest; the newcomer is always added.
    pool = FLHPromptPool(2, 2, max_prompts=3, alpha=1.0)
    for t in range(1, 4):
        pool.birth_prompt()
    pool.update_weights([0.0, 5.0, 1.0])     # expert 2 (born second) becomes lightest
    pool.birth_prompt()
    assert pool.birth_ids == [1, 3, 4] and abs(sum(pool.weights) - 1) < 1e-12
    print("  ok: max_prompts=3 drops the lightest prompt at the 4th birth")

    # Selection modes.
    pool = FLHPromptPool(3, 4, alpha=1.0)
    for _ in range(3):
        pool.birth_prompt()
    pool.update_weights([1.0, 0.0, 2.0])
    w = torch.tensor(pool.weights, dtype=torch.float32)
    manual = sum(wi * p for wi, p in zip(w, pool.prompts))
    assert torch.allclose(pool.get_prompt("weighted_sum"), manual, atol=1e-7)
    assert pool.get_prompt("top_k") is pool.prompts[1]
    draws = torch.zeros(3)
    for _ in range(4000):
        p = pool.get_prompt("sample")
        draws[[i for i, q in enumerate(pool.prompts) if q is p][0]] += 1
    assert (draws / 4000 - w).abs().max() < 0.03, (draws / 4000, w)
    print(f"  ok: weighted_sum = sum w_i p_i; top_k = heaviest; sample frequencies {(draws / 4000).tolist()} ~ w")

    # get_all_losses: one batched no-grad pass equals per-prompt forwards; mixture is a distribution.
    model, tok = load_backbone("random:tiny-bert")
    pool = FLHPromptPool(5, model.embed_dim, init_std=0.5)
    for _ in range(4):
        pool.birth_prompt()
    enc = tok(["good", "bad movie", "an utterly forgettable sequel"], padding=True, return_tensors="pt")
    batch = {**enc, "labels": torch.tensor([1, 0, 0])}
    losses, logits = pool.get_all_losses(model, batch)
    for k, p in enumerate(pool.prompts):
        ref = F.cross_entropy(forward_with_prompt(model, enc, p), batch["labels"])
        assert abs(losses[k] - ref) < 1e-5
    assert not losses.requires_grad and logits.shape == (4, 3, 2)
    mix = pool.mixture_probs(logits)
    assert torch.allclose(mix.sum(-1), torch.ones(3), atol=1e-6)
    print("  ok: get_all_losses (one batched pass) equals per-prompt cross-entropy; mixture rows sum to 1")

    # Checkpoint round trip.
    clone = FLHPromptPool(5, model.embed_dim)
    clone.load_state(pool.state())
    assert torch.equal(clone.stacked(), pool.stacked()) and clone.weights == pool.weights
    assert clone.birth_ids == pool.birth_ids and clone.num_births == pool.num_births
    print(f"stage 4 checks passed in {time.time() - t0:.1f}s")


def build_parser():
    p = common.Parser(description="Stage 4: simulate FLH weights on synthetic losses (no model).")
    p.add_argument("--alpha", type=common.nonneg_float, default=1.0, help="FLH learning rate alpha (default: 1.0)")
    p.add_argument("--birth-interval", type=common.positive_int, default=10, help="steps between births (default: 10)")
    p.add_argument("--change-every", type=common.positive_int, default=40, help="steps between rule changes (default: 40)")
    p.add_argument("--steps", type=common.positive_int, default=160, help="steps to simulate (default: 160)")
    p.add_argument("--prune", choices=["none", "flh2"], default="flh2", help="pruning rule (default: flh2)")
    common.add_common_args(p, run_name="pool")
    return p


def main(args):
    """Experts born after the latest change have loss 0.3, older ones 1.0: watch the weight move."""
    if args.test:
        return run_tests()
    pool = FLHPromptPool(1, 1, alpha=args.alpha, prune=args.prune)
    for step in range(args.steps):
        if step % args.birth_interval == 0:
            pool.birth_prompt()
        born = [(j - 1) * args.birth_interval for j in pool.birth_ids]
        change = step - step % args.change_every
        pool.update_weights([0.3 if b >= change else 1.0 for b in born])
        if step % args.birth_interval == args.birth_interval - 1:
            cells = " ".join(f"{b:>4}:{w:.2f}" for b, w in zip(born, pool.weights))
            print(f"step {step:4d} (rules since {change:4d})  born:weight  {cells}")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
