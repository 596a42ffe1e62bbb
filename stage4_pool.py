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

A floor that lets an old expert come back (Fixed Share; Herbster & Warmuth 1998). With `share` > 0,
after every update the weights are mixed with the uniform distribution over the K live experts:

  share     w_i <- (1 - share) w_i + share / K.

Without it (share = 0, the plan's FLH and the default), an expert that was worse by a gap g for n
batches has lost alpha g n of log-weight and needs about as many batches to earn it back, however
large alpha is: a memory of an old regime cannot win when that regime comes back. With the floor
no weight falls below share / K, so a returning expert that is better by g takes over within about
ln(K / share) / (alpha g) batches (K = 8, share = 0.01, alpha = 1, g = 0.4: 17 batches).

Three weighting rules on the same pool (`weighting`; each keeps O(K) numbers, and share > 0 for the
last two). With v the loss-updated, normalised weights of a step:
  flh          as above: births at 1/t, then  w = (1 - share) v + share / K.
  fixed_share  Fixed Share (Herbster & Warmuth, "Tracking the best expert", 1998): no 1/t; a newcomer
               enters at the floor's level, w_new = share / K (the others scaled by 1 - share / K),
               and earns the rest; then  w = (1 - share) v + share / K. Adamskiy, Koolen, Chernov and
               Vovk ("A closer look at adaptive regret", JMLR 2016) show FLH's restarts reduce to it.
  mpp          Mixing Past Posteriors with a decaying past (Bousquet & Warmuth, JMLR 2002): keep u,
               a running mix of earlier posteriors, and mix towards it instead of towards uniform:
                   w = (1 - share) v + share u,   then   u <- decay u + (1 - decay) v.
               The floor then favours experts that were good before: the case of a rule that comes
               back. Newcomers enter w and u at share / K, as in Fixed Share.

Pruning. Every expert costs a forward pass per step, so the pool is kept small:
  flh2      (Hazan & Seshadhri's FLH2) the expert of birth index j = r 2^k (r odd) lives for
            2^(k+2) + 1 births, then is removed and the rest renormalised. Births 1, 2, 3 ...
            survive for 5, 9, 5, 17, 5, 9, 5, 33 ... births: O(log T) experts, recent ones dense,
            old ones sparse. It prunes by age, not merit, and can remove the expert that holds
            the weight.
  diverse   at most `max_prompts` experts: when a birth would exceed the cap, find the two experts
            whose recent predictions are most alike (mean Jensen-Shannon divergence of their
            predictive distributions over the batches both saw among their last `window`) and
            remove the lighter of them. Never the live (newest, trainable) prompt, never the
            current leader. Redundant copies go first; distinct memories stay.
  reservoir at most `max_prompts` experts, judged on the whole past instead of the last batches:
            stage 5 keeps a reservoir, a uniform sample of R past examples with the labels they had
            then, and scores every expert on it (losses L_ir). The pool's loss on the past is
            sum_r min_i L_ir: each example answered by the expert best on it. The expert whose removal
            raises that least goes,
                victim = argmin_i  sum_r ( min_{j != i} L_jr - min_j L_jr ),
            never the live prompt, never the leader. The only good memory of a stretch of the past,
            however long ago and however few its examples, costs a lot to remove and stays; a
            redundant copy costs almost nothing. (`diverse` can remove every expert of an old regime:
            experts that learned little predict alike, near uniform, on any inputs.)

Prediction. `get_prompt('weighted_sum')` gives the plan's prompt sum_i w_i p_i; FLH's own
prediction is the mixture sum_i w_i softmax(f(x; p_i)), which `get_all_losses` makes possible from
the same batched pass that gives the losses (it returns the logits too).

Run `python stage4_pool.py` for a small simulation, `--test` for the arithmetic checks.
"""

import math
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from torch import nn

import common
from stage3_backbone import forward_with_prompt, forward_with_prompts, load_backbone

PRUNING = ["none", "flh2", "diverse", "reservoir"]
WEIGHTINGS = ["flh", "fixed_share", "mpp"]
setting = common.setting


@dataclass(frozen=True)
class PoolSettings(common.Settings):
    """How the pool weights and prunes its experts: the one place these settings and their defaults
    live (stage 5 extends it with how the prompts learn)."""

    alpha: float = setting(0.1, common.nonneg_float, "FLH learning rate alpha in w_i <- w_i exp(-alpha l_i)")
    share: float = setting(
        0.0,
        common.unit_float,
        "Fixed Share floor: w <- (1 - share) w + share / K after each update; 0 = plain FLH",
    )
    weighting: str = setting(
        "flh",
        choices=WEIGHTINGS,
        help="flh (newcomer 1/t, floor share/K) | fixed_share (newcomer at the floor) | mpp (mixing past "
        "posteriors: the floor mixes towards a decaying mix of earlier weights)",
    )
    mpp_decay: float = setting(
        0.9, common.unit_float, "mpp: u <- decay u + (1 - decay) v, the past mix the floor goes to"
    )
    prune: str = setting(
        "none",
        choices=PRUNING,
        help="FLH pool pruning: none | flh2 (by age) | diverse (the most alike pair on recent batches) | "
        "reservoir (the expert the pool misses least on a sample of the whole past); the last two "
        "need --max-prompts",
    )
    max_prompts: int = setting(
        0, common.nonneg_int, "cap on FLH's prompts (and on detect's stored ones); 0 = none"
    )
    merge_window: int = setting(
        10, common.positive_int, "recent batches whose predictions decide which experts are alike"
    )


def flh2_lifetime(j):
    """Births that expert j = r 2^k (r odd) lives for: 2^(k+2) + 1."""
    k = (j & -j).bit_length() - 1
    return 2 ** (k + 2) + 1


def mean_js(a, b):
    """Mean Jensen-Shannon divergence (bits) between two experts' predictions on the batches both
    saw: a, b are {step: probabilities [B, C]}. None when they share no batch."""
    steps = sorted(set(a) & set(b))
    if not steps:
        return None
    p, q = np.concatenate([a[t] for t in steps]), np.concatenate([b[t] for t in steps])
    with np.errstate(invalid="ignore"):  # identical rows can round to sqrt(-1e-17): nan, read as 0
        return float((np.nan_to_num(jensenshannon(p, q, base=2, axis=-1)) ** 2).mean())


class FLHPromptPool(nn.Module):
    """Soft prompts [P, D] with FLH weights, a Fixed Share floor and pruning (see the docstring above)."""

    def __init__(self, prompt_length, embed_dim, settings=PoolSettings(), init_std=0.02, device="cpu"):
        super().__init__()
        s = settings  # each value checked by its declaration; here what two settings say together
        if s.weighting != "flh" and s.share <= 0:
            raise common.UserError(f"--weighting {s.weighting} mixes by the floor: give --share > 0")
        if s.prune in ("diverse", "reservoir") and not s.max_prompts:
            raise common.UserError(f"--prune {s.prune} needs a cap: give --max-prompts")
        self.settings, self.weighting, self.decay = s, s.weighting, s.mpp_decay
        self.log_u = torch.zeros(0, dtype=torch.float64)  # mpp: the running mix of past posteriors
        self.prompt_length, self.embed_dim = prompt_length, embed_dim
        self.alpha, self.share = s.alpha, s.share
        self.prune, self.max_prompts, self.init_std = s.prune, s.max_prompts or None, init_std
        self.device = torch.device(device)  # where prompts live; weights stay on the CPU in float64
        self.prompts = nn.ParameterList()
        self.log_w = torch.zeros(0, dtype=torch.float64)
        self.birth_ids = []  # the birth index t of each live prompt (1-based, ever increasing)
        self.num_births = 0
        self.window = s.merge_window  # batches of predictions kept per expert for `diverse`
        self.recent = {}  # birth id -> deque of (step, probabilities [B, C] as float32 numpy)
        self.born_at = {}  # birth id -> the step it first predicted at

    def __len__(self):
        return len(self.prompts)

    @property
    def weights(self):
        return self.log_w.exp().tolist()

    def entropy(self):
        """-sum w log w of the current weights (0 for one prompt, log K for uniform)."""
        return float(-(self.log_w.exp() * self.log_w).sum())

    def remove(self, keep):
        """Keep the prompts at indices `keep`, renormalise; returns the removed Parameters."""
        removed = [p for i, p in enumerate(self.prompts) if i not in keep]
        for i, j in enumerate(self.birth_ids):
            if i not in keep:
                self.recent.pop(j, None)
                self.born_at.pop(j, None)
        self.prompts = nn.ParameterList([self.prompts[i] for i in keep])
        self.birth_ids = [self.birth_ids[i] for i in keep]
        self.log_w = self.log_w[keep] - self.log_w[keep].logsumexp(0)
        if len(self.log_u):
            self.log_u = self.log_u[keep] - self.log_u[keep].logsumexp(0)
        return removed

    def record(self, step, logits):
        """Remember each expert's predictive distribution on this batch (logits [K, B, C]), for `diverse`,
        and the step each expert first predicted at: its birth step."""
        probs = logits.detach().float().softmax(-1).cpu().numpy()
        for j, p in zip(self.birth_ids, probs):
            self.born_at.setdefault(j, step)
            self.recent.setdefault(j, deque(maxlen=self.window)).append((step, p))

    def most_alike(self, candidates):
        """(a, b) with the lowest mean JS divergence of recent predictions, among pairs with at
        least one member in `candidates`; None if no pair shares a batch."""
        best = None
        for a in range(len(self)):
            for b in range(a + 1, len(self)):
                if a in candidates or b in candidates:
                    js = mean_js(
                        dict(self.recent.get(self.birth_ids[a], ())),
                        dict(self.recent.get(self.birth_ids[b], ())),
                    )
                    if js is not None and (best is None or js < best[0]):
                        best = (js, a, b)
        return best and best[1:]

    def diverse_victim(self):
        """The index `diverse` removes: the lighter removable expert of the most alike pair (the live
        prompt, the newest, and the leader are never removable); the lightest removable one when no
        pair has shared a batch yet."""
        removable = self.removable()
        if not removable:
            return None
        pair = self.most_alike(removable)
        choices = [i for i in (pair or removable) if i in removable]
        return min(choices, key=lambda i: self.log_w[i].item())

    def removable(self):
        """Indices pruning may remove: all but the leader and the live (newest) prompt."""
        leader = int(self.log_w.argmax())
        return [i for i in range(len(self)) if i not in (leader, len(self) - 1)]

    def reservoir_victim(self, losses):
        """The index `reservoir` removes, given every expert's loss on each reservoir example (losses
        [K, R]): the removable expert whose removal raises sum_r min_i L_ir the least, the lighter on
        a tie (the lightest removable one when the reservoir is empty)."""
        best = losses.min(0).values

        def cost(i):  # what the pool's loss on the past would rise by without expert i
            others = torch.cat([losses[:i], losses[i + 1 :]])
            return float((others.min(0).values - best).sum()) if losses.shape[1] else 0.0

        return min(self.removable(), key=lambda i: (cost(i), self.log_w[i].item()), default=None)

    def birth_prompt(self, init=None, probe=None):
        """Birth t: prune (FLH2 / cap / diverse / reservoir), then w_i *= 1 - 1/t and w_new = 1/t. The
        newcomer is `init` copied, or random. `reservoir` needs `probe`: a function giving every
        expert's per-example losses [K, R] on the reservoir, called only when the cap is reached.
        Returns (the new Parameter, the removed Parameters) so an optimiser can follow."""
        t = self.num_births + 1
        removed = []
        if self.prune == "flh2":
            keep = [i for i, j in enumerate(self.birth_ids) if t < j + flh2_lifetime(j)]
            if len(keep) < len(self):
                removed += self.remove(keep)
        elif self.prune in ("diverse", "reservoir"):
            full = len(self) >= self.max_prompts
            losses = (
                (probe() if probe else torch.zeros(len(self), 0))
                if self.prune == "reservoir" and full
                else None
            )
            while len(self) >= self.max_prompts:
                victim = self.diverse_victim() if self.prune == "diverse" else self.reservoir_victim(losses)
                if victim is None:
                    break
                keep = [i for i in range(len(self)) if i != victim]
                removed += self.remove(keep)
                losses = None if losses is None else losses[keep]
        if self.prune not in ("diverse", "reservoir") and self.max_prompts and len(self) >= self.max_prompts:
            order = sorted(range(len(self)), key=lambda i: -self.log_w[i].item())
            removed += self.remove(sorted(order[: self.max_prompts - 1]))
        if init is None:  # a random start, at the scale of the backbone's word embeddings
            init = torch.randn(self.prompt_length, self.embed_dim) * self.init_std
        prompt = nn.Parameter(init.detach().clone().to(self.device))
        self.prompts.append(prompt)
        # FLH's birth in log space. The survivors sum to 1 (pruning renormalises), so after
        # w_i <- (1 - a) w_i  and  w_new = a  they sum to 1 again; a = 1/t for FLH, the floor
        # share / K for Fixed Share and MPP (K counts the newcomer). The first expert gets all.
        old = len(self.log_w)  # the experts before this birth (the newcomer's prompt is in already)
        a = 1 / t if self.weighting == "flh" else self.share / (old + 1)
        shrink = math.log1p(-a) if old else 0.0  # log(1 - a)
        log_a = -math.log(t) if self.weighting == "flh" else math.log(a)  # -log t: FLH's logs bit for bit
        newcomer = torch.tensor([log_a if old else 0.0], dtype=torch.float64)
        self.log_w = torch.cat([self.log_w + shrink, newcomer])
        if self.weighting == "mpp":  # the past mix welcomes the newcomer the same way
            self.log_u = torch.cat([self.log_u + shrink, newcomer])
        self.birth_ids.append(t)  # the birth index j, which FLH2's lifetime and the logs use
        self.num_births = t
        return prompt, removed

    def update_weights(self, losses):
        """w_i <- w_i exp(-alpha l_i), renormalised; then the floor w_i <- (1 - share) w_i + share / K.
        Both in log space: log((1 - s) w + s / K) = logaddexp(log(1 - s) + log w, log(s / K))."""
        losses = torch.as_tensor(losses, dtype=torch.float64).cpu()  # fp64: weights of 1e-300 stay exact
        self.log_w = self.log_w - self.alpha * losses  # log w_i - alpha l_i: the exponential update
        self.log_w = self.log_w - self.log_w.logsumexp(0)  # divide by sum_j w_j exp(-alpha l_j)
        if self.share > 0 and self.weighting == "mpp":
            v = self.log_w  # w = (1 - share) v + share u, then u <- decay u + (1 - decay) v
            self.log_w = torch.logaddexp(v + math.log1p(-self.share), self.log_u + math.log(self.share))
            past = self.log_u + math.log(self.decay) if self.decay > 0 else torch.full_like(v, -math.inf)
            self.log_u = torch.logaddexp(past, v + math.log1p(-self.decay))
        elif self.share > 0:  # share = 0 leaves the plan's FLH bit for bit
            floor = torch.full_like(self.log_w, math.log(self.share / len(self)))  # log(share / K)
            # log((1 - share) w_i + share / K): no weight falls below share / K, so any can come back
            self.log_w = torch.logaddexp(self.log_w + math.log1p(-self.share), floor)

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

    @torch.inference_mode()
    def get_all_losses(self, model, batch, prompts=None):
        """Every prompt's (or the given prompts') mean cross-entropy on the batch from one batched
        no-grad pass. Returns (losses [K], logits [K, B, C])."""
        prompts = self.stacked() if prompts is None else prompts
        if len(prompts) == 0:
            return torch.zeros(0, device=self.device), torch.zeros(
                0, len(batch["labels"]), model.head.out_features, device=self.device
            )
        logits = forward_with_prompts(model, batch, prompts)
        return per_prompt_losses(logits, batch["labels"]), logits

    def mixture_probs(self, logits, experts=None):
        """FLH's prediction sum_i w_i softmax(logits_i): [B, C] from logits [K, B, C]; or, given the
        indices of some `experts` (logits [len(experts), B, C]), their mixture renormalised."""
        w = self.log_w.exp() if experts is None else self.log_w[experts].softmax(0)
        return torch.einsum("k,kbc->bc", w.to(logits.device, logits.dtype), logits.softmax(-1))

    def heaviest(self, epsilon):
        """The fewest experts that hold at least 1 - epsilon of the weight, heaviest first (indices).
        Their renormalised mixture p_S is the full mixture p to within epsilon in every class: with
        W >= 1 - epsilon their weight and p_R the rest's mixture, p = W p_S + (1 - W) p_R, so
        p - p_S = (1 - W)(p_R - p_S), each entry in [-(1 - W), 1 - W]. A pool whose weight sits on a
        few experts then predicts at the cost of those few."""
        w = self.log_w.exp()
        order = w.argsort(descending=True, stable=True)
        n = int((w[order].cumsum(0) < 1 - epsilon).sum()) + 1
        return order[: min(n, len(w))].tolist()

    # -- checkpointing ------------------------------------------------------------------------
    def state(self):
        return {
            "prompts": self.stacked().detach().cpu(),
            "log_w": self.log_w.clone(),
            "log_u": self.log_u.clone(),
            "birth_ids": list(self.birth_ids),
            "num_births": self.num_births,
            "recent": {j: list(d) for j, d in self.recent.items()},
            "born_at": dict(self.born_at),
        }

    def save(self, folder):
        """The pool in `folder`: pool.safetensors (its whole state; common.save_state, no pickle) and
        pool.json (readable: the settings, and each expert's birth index, birth step and weight)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        common.save_state(folder / "pool.safetensors", self.state())
        settings = dict(prompt_length=self.prompt_length, embed_dim=self.embed_dim, **asdict(self.settings))
        common.write_json(folder / "pool.json", {"settings": settings, "experts": self.experts()})

    def load(self, folder):
        """Load what `save` wrote (the settings come from the constructor; the state from the file)."""
        self.load_state(common.load_state(Path(folder) / "pool.safetensors"))
        return self

    def load_state(self, state):
        self.prompts = nn.ParameterList([nn.Parameter(p.clone().to(self.device)) for p in state["prompts"]])
        self.log_w = state["log_w"].clone()
        self.log_u = state.get("log_u", torch.zeros(0, dtype=torch.float64)).clone()
        self.birth_ids, self.num_births = list(state["birth_ids"]), state["num_births"]
        self.recent = {j: deque(d, maxlen=self.window) for j, d in state.get("recent", {}).items()}
        self.born_at = dict(state.get("born_at", {}))

    def experts(self):
        """Who is in the pool: birth index, birth step (None if it never predicted) and weight of each."""
        return [
            {"expert": j, "born_at": self.born_at.get(j), "weight": w}
            for j, w in zip(self.birth_ids, self.weights)
        ]


def per_prompt_losses(logits, labels):
    """Mean cross-entropy of each of K prompts: logits [K, B, C], labels [B] -> [K]."""
    K, B, C = logits.shape
    return F.cross_entropy(logits.reshape(K * B, C), labels.repeat(K), reduction="none").view(K, B).mean(1)


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def test_plan():
    """The plan's test: three prompts, losses [0.5, 1.0, 2.0] -> weight moves to the first."""
    pool = FLHPromptPool(4, 8, PoolSettings(alpha=1.0))
    for _ in range(3):
        pool.birth_prompt()
    before = pool.weights
    pool.update_weights([0.5, 1.0, 2.0])
    after = pool.weights
    assert after[0] > before[0] and after[2] < before[2] and max(range(3), key=after.__getitem__) == 0
    expected = [math.exp(-loss) for loss in (0.5, 1.0, 2.0)]
    assert all(abs(a - e / sum(expected)) < 1e-12 for a, e in zip(after, expected))
    print(f"  ok: plan's test: weights {[round(w, 3) for w in before]} -> {[round(w, 3) for w in after]}")


def test_birth_arithmetic():
    """Exact birth arithmetic: newcomer 1/t, the others scaled by (1 - 1/t), after an update."""
    pool = FLHPromptPool(4, 8, PoolSettings(alpha=0.5))
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


def test_flh2():
    """FLH2: after 1,000 births at most 2 log2(1000) + 4 prompts live, and the newest always does."""
    pool = FLHPromptPool(2, 2, PoolSettings(prune="flh2"))
    most = 0
    for t in range(1, 1001):
        pool.birth_prompt()
        pool.update_weights(torch.rand(len(pool)))
        assert pool.birth_ids[-1] == t and abs(sum(pool.weights) - 1) < 1e-9
        most = max(most, len(pool))
    bound = 2 * math.log2(1000) + 4
    assert len(pool) <= bound and most <= bound, (len(pool), most)
    print(
        f"  ok: FLH2 keeps {len(pool)} of 1000 prompts alive (at most {most}; bound {bound:.1f}), "
        "newest never pruned"
    )


def test_fixed_share():
    """Fixed Share against a hand computation: weights [0.7, 0.2, 0.1], losses [1, 0, 2], alpha 1, share 0.1:
    v = w e^-l / sum = [0.7/e, 0.2, 0.1/e^2] / Z, then 0.9 v + 0.1 / 3."""
    pool = FLHPromptPool(2, 2, PoolSettings(alpha=1.0, share=0.1))
    for _ in range(3):
        pool.birth_prompt()
    pool.log_w = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64).log()
    pool.update_weights([1.0, 0.0, 2.0])
    v = [0.7 / math.e, 0.2, 0.1 / math.e**2]
    hand = [0.9 * x / sum(v) + 0.1 / 3 for x in v]
    assert all(abs(a - b) < 1e-12 for a, b in zip(pool.weights, hand)), (pool.weights, hand)
    for _ in range(1000):  # the floor holds however bad an expert's losses are
        pool.update_weights([0.0, 50.0, 0.0])
    assert min(pool.weights) >= 0.1 / 3 - 1e-12 and abs(sum(pool.weights) - 1) < 1e-12
    # share = 0 is the plan's FLH exactly: the same weights, bit for bit, as without the argument.
    a, b = (
        FLHPromptPool(2, 2, PoolSettings(alpha=0.5)),
        FLHPromptPool(2, 2, PoolSettings(alpha=0.5, share=0.0)),
    )
    g = torch.Generator().manual_seed(0)
    for t in range(30):
        if t % 5 == 0:
            a.birth_prompt(), b.birth_prompt()
        losses = torch.rand(len(a), generator=g) * 3
        a.update_weights(losses), b.update_weights(losses)
    assert torch.equal(a.log_w, b.log_w)
    print(
        f"  ok: Fixed Share equals the hand computation {[round(w, 4) for w in hand]}, keeps every weight "
        ">= share/K, and share=0 is bit-identical to plain FLH"
    )


def test_weightings():
    """Fixed Share and MPP against hand computations (share 0.1, alpha 1, decay 0.5)."""
    fs, mpp = (
        FLHPromptPool(2, 2, PoolSettings(alpha=1.0, share=0.1, weighting=r, mpp_decay=0.5))
        for r in ("fixed_share", "mpp")
    )
    for pool in (fs, mpp):
        pool.birth_prompt(), pool.birth_prompt()
    w = [1 - 0.1 / 2, 0.1 / 2]  # the newcomer enters at the floor share / K = 0.05
    assert all(abs(a - b) < 1e-12 for a, b in zip(fs.weights, w)), fs.weights
    for pool in (fs, mpp):
        pool.update_weights([1.0, 0.0])
    v = [w[0] / math.e, w[1]]
    v = [x / sum(v) for x in v]
    assert all(abs(a - (0.9 * x + 0.1 / 2)) < 1e-12 for a, x in zip(fs.weights, v)), fs.weights
    u = w  # MPP's past mix starts as the weights at birth
    hand = [0.9 * x + 0.1 * y for x, y in zip(v, u)]
    assert all(abs(a - b) < 1e-12 for a, b in zip(mpp.weights, hand)), (mpp.weights, hand)
    u = [0.5 * y + 0.5 * x for x, y in zip(v, u)]
    mpp.birth_prompt()  # a third expert: w and u scaled by 1 - 0.1/3, the newcomer at 0.1/3
    hand, u = [x * (1 - 0.1 / 3) for x in hand] + [0.1 / 3], [y * (1 - 0.1 / 3) for y in u] + [0.1 / 3]
    mpp.update_weights([0.0, 2.0, 1.0])
    v = [hand[0], hand[1] / math.e**2, hand[2] / math.e]
    v = [x / sum(v) for x in v]
    hand = [0.9 * x + 0.1 * y for x, y in zip(v, u)]
    assert all(abs(a - b) < 1e-12 for a, b in zip(mpp.weights, hand)), (mpp.weights, hand)
    assert all(
        abs(a - b) < 1e-12
        for a, b in zip(mpp.log_u.exp().tolist(), [0.5 * y + 0.5 * x for x, y in zip(v, u)])
    )
    for rule in ("fixed_share", "mpp"):
        try:
            FLHPromptPool(2, 2, PoolSettings(share=0.0, weighting=rule))
            raise AssertionError(f"{rule} accepted share 0")
        except common.UserError:
            pass
    print(
        "  ok: Fixed Share (newcomer at share/K) and Mixing Past Posteriors (floor towards the decayed "
        "past mix) equal hand computations to 1e-12, births included"
    )


def test_diverse():
    """diverse: of two identical experts the redundant (lighter) one goes; never the leader or the live
    prompt."""
    pool = FLHPromptPool(2, 2, PoolSettings(prune="diverse", max_prompts=4, merge_window=3))
    for _ in range(4):
        pool.birth_prompt()
    pool.log_w = torch.tensor([0.1, 0.5, 0.15, 0.25], dtype=torch.float64).log()
    g = torch.Generator().manual_seed(1)
    for step in range(3):
        logits = torch.randn(4, 6, 2, generator=g) * 3
        logits[2] = logits[0]  # experts 1 and 3 (birth ids) predict the same: one is redundant
        pool.record(step, logits)
    pool.birth_prompt()
    assert pool.birth_ids == [2, 3, 4, 5], pool.birth_ids  # id 1 (0.10) was lighter than its twin id 3 (0.15)
    # The leader (id 2) and the live prompt (id 4, the newest before the birth) predict the same;
    # neither may go, so the next most alike removable pair decides.
    pool = FLHPromptPool(2, 2, PoolSettings(prune="diverse", max_prompts=4, merge_window=3))
    for _ in range(4):
        pool.birth_prompt()
    pool.log_w = torch.tensor([0.2, 0.5, 0.05, 0.25], dtype=torch.float64).log()
    for step in range(3):
        logits = torch.randn(4, 6, 2, generator=g) * 3
        logits[3] = logits[1]  # leader == live: the most alike pair, both protected
        logits[2] = logits[0] + 0.1  # the next most alike pair: ids 1 and 3; id 3 is lighter
        pool.record(step, logits)
    pool.birth_prompt()
    assert pool.birth_ids == [1, 2, 4, 5] and abs(sum(pool.weights) - 1) < 1e-12, pool.birth_ids
    assert 3 not in pool.recent
    for trial in range(200):  # random weights and predictions: leader and live always survive
        pool = FLHPromptPool(2, 2, PoolSettings(prune="diverse", max_prompts=3, merge_window=2))
        for t in range(1, 9):
            before_leader = pool.birth_ids[int(pool.log_w.argmax())] if len(pool) else None
            live = pool.birth_ids[-1] if len(pool) else None
            pool.birth_prompt()
            assert len(pool) <= 3 and {before_leader, live} - {None} <= set(pool.birth_ids), (trial, t)
            for step in range(2):
                pool.record(10 * t + step, torch.randn(len(pool), 4, 2, generator=g))
                pool.update_weights(torch.rand(len(pool), generator=g) * 4)
    print(
        "  ok: diverse removes the redundant one of two identical experts, and never the leader or the "
        "live prompt"
    )


def test_reservoir():
    """reservoir: the expert whose removal raises the pool's best loss on the past the least goes, however
    heavy; the lighter on a tie; never the leader or the live prompt; the probe runs only at the cap."""
    pool, calls = FLHPromptPool(2, 2, PoolSettings(prune="reservoir", max_prompts=5)), []
    for _ in range(5):
        pool.birth_prompt(probe=lambda: calls.append(1))
    assert not calls, "the probe ran below the cap"
    pool.log_w = torch.tensor([0.05, 0.3, 0.1, 0.4, 0.15], dtype=torch.float64).log()
    losses = torch.tensor(  # [K=5 experts, R=4 examples]
        [[0.1, 3.0, 3.0, 3.0],  # id 1: best on example 0 (cost 0.3), light
         [0.4, 2.9, 2.9, 0.9],  # id 2: heavy, second best on 0 and 3 (cost 0)
         [3.0, 0.2, 0.3, 3.0],  # id 3: one of two experts of examples 1-2 (cost 0.1 + 0.1)
         [3.0, 0.3, 0.4, 3.0],  # id 4: the leader
         [3.0, 3.0, 3.0, 0.8]]  # id 5: the live prompt
    )  # fmt: skip
    assert pool.reservoir_victim(losses) == 1  # index 1: id 2, heavy but redundant
    pool.birth_prompt(probe=lambda: losses)
    assert pool.birth_ids == [1, 3, 4, 5, 6], pool.birth_ids
    costs = torch.tensor([[0.1, 3.0], [3.0, 0.1], [0.5, 0.5], [0.5, 0.5], [3.0, 3.0]])  # ids 4, 5 tie at 0
    pool.log_w = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25], dtype=torch.float64).log()  # leader: id 4
    pool.birth_prompt(probe=lambda: costs)  # removable: ids 1, 3, 5; id 5 (cost 0) goes
    assert pool.birth_ids == [1, 3, 4, 6, 7], pool.birth_ids
    pool.birth_prompt()  # no reservoir yet: the lightest removable one goes
    assert len(pool) == 5 and 4 in pool.birth_ids and 7 in pool.birth_ids
    print(
        "  ok: reservoir removes the expert that costs the pool least on the past (heavy or not), never "
        "the leader or the live prompt"
    )


def test_cap():
    """A cap keeps the heaviest; the newcomer is always added."""
    pool = FLHPromptPool(2, 2, PoolSettings(max_prompts=3, alpha=1.0))
    for t in range(1, 4):
        pool.birth_prompt()
    pool.update_weights([0.0, 5.0, 1.0])  # expert 2 (born second) becomes lightest
    pool.birth_prompt()
    assert pool.birth_ids == [1, 3, 4] and abs(sum(pool.weights) - 1) < 1e-12
    print("  ok: max_prompts=3 drops the lightest prompt at the 4th birth")


def test_selection():
    """Selection modes."""
    pool = FLHPromptPool(3, 4, PoolSettings(alpha=1.0))
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
    print(
        "  ok: weighted_sum = sum w_i p_i; top_k = heaviest; sample frequencies "
        f"{(draws / 4000).tolist()} ~ w"
    )


def test_batched_losses_and_save():
    """get_all_losses: one batched no-grad pass equals per-prompt forwards; mixture is a distribution."""
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

    # Save to a folder (safetensors + JSON) and load: everything comes back exactly.
    pool.record(7, logits)
    pool.update_weights(losses)
    pool.birth_prompt()
    with tempfile.TemporaryDirectory() as tmp:
        pool.save(tmp)
        clone = FLHPromptPool(5, model.embed_dim).load(tmp)
        saved = common.read_json(Path(tmp) / "pool.json")
    assert torch.equal(clone.stacked(), pool.stacked()) and torch.equal(clone.log_w, pool.log_w)
    assert clone.birth_ids == pool.birth_ids == [1, 2, 3, 4, 5] and clone.num_births == pool.num_births
    assert clone.born_at == pool.born_at == {1: 7, 2: 7, 3: 7, 4: 7}  # the newest has not predicted yet
    assert all(
        np.array_equal(a[1], b[1]) for j in pool.recent for a, b in zip(clone.recent[j], pool.recent[j])
    )
    assert saved["experts"] == pool.experts() and saved["settings"]["embed_dim"] == model.embed_dim
    print("  ok: save/load through a folder keeps prompts, log-weights, births (index, step), predictions")


def test_heaviest():
    """The heaviest experts holding >= 1 - epsilon, and the bound on their mixture."""
    pool = FLHPromptPool(4, 8)
    for _ in range(4):
        pool.birth_prompt()
    pool.log_w = torch.tensor([0.15, 0.5, 0.05, 0.3], dtype=torch.float64).log()
    assert (
        pool.heaviest(0.1) == [1, 3, 0] and pool.heaviest(0.25) == [1, 3] and pool.heaviest(0) == [1, 3, 0, 2]
    )
    logits = torch.randn(4, 64, 3) * 3
    for eps in (0.0, 0.1, 0.25, 0.6):
        keep = pool.heaviest(eps)
        gap = (pool.mixture_probs(logits[keep], keep) - pool.mixture_probs(logits)).abs().max().item()
        held = 1 - sum(pool.weights[k] for k in keep)
        assert gap <= held + 1e-6 and held <= eps + 1e-12, (eps, gap, held)  # 1e-6: float32 sums
    print(
        "  ok: the heaviest experts holding >= 1 - epsilon; their mixture is within epsilon of the full one"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


def build_parser():
    p = common.Parser(description="Stage 4: simulate FLH weights on synthetic losses (no model).")
    p.add_argument(
        "--births-every", type=common.positive_int, default=10, help="steps between births (default: 10)"
    )
    p.add_argument(
        "--change-every",
        type=common.positive_int,
        default=40,
        help="steps between rule changes (default: 40)",
    )
    p.add_argument(
        "--simulate", type=common.positive_int, default=160, help="steps to simulate (default: 160)"
    )
    common.add_settings(p, PoolSettings, alpha=1.0, prune="flh2")  # the simulation's own values
    common.add_common_args(p, run_name="pool")
    return p


def main(args):
    """Experts born after the latest change have loss 0.3, older ones 1.0: watch the weight move
    (with --share, also watch an old expert's weight stay above the floor)."""
    if args.test:
        return run_tests()
    if args.prune in ("diverse", "reservoir"):
        raise common.UserError(f"--prune {args.prune} judges experts by their predictions: none here")
    pool = FLHPromptPool(1, 1, common.settings(PoolSettings, args))
    for step in range(args.simulate):
        if step % args.births_every == 0:
            pool.birth_prompt()
        born = [(j - 1) * args.births_every for j in pool.birth_ids]
        change = step - step % args.change_every
        pool.update_weights([0.3 if b >= change else 1.0 for b in born])
        if step % args.births_every == args.births_every - 1:
            cells = " ".join(f"{b:>4}:{w:.2f}" for b, w in zip(born, pool.weights))
            print(f"step {step:4d} (rules since {change:4d})  born:weight  {cells}")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
