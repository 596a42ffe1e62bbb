"""Stage 6: the baselines FLH has to beat, and the bounds that make its result readable.

The plan's three, behind the same interface as FLH:
  single      one prompt, trained on every batch. It must *unlearn* after every change of rules.
  random      K prompts made at the start; each batch draws one uniformly at random, predicts with
              it and trains it. No weights, no memory of which prompt suits which regime.
  similarity  mini-L2P (Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022):
              K prompts with learned keys k_j. The query q(x) is the frozen backbone's own sentence
              embedding of x without any prompt (mean-pooled for MiniLM, [CLS] for BERT and ViT).
              The keys start at K of the first batch's queries, spread out by k-means++ (so that
              the keys cover the inputs instead of one key taking every example). Example x uses
              prompt j*(x) = argmax_j cos(q, k_j),
                  loss = CE(f(x; p_j*), y) - 0.1 * cos(q(x), k_j*),
              which trains the selected prompts and pulls their keys towards their queries.
              Selection looks only at the input, so when labels flip on the *same* inputs it keeps
              picking the same prompts, which must unlearn like the single prompt.

Three more that bound the question "does FLH's memory help when a regime comes back?":
  oracle      one prompt per concept, *told* the concept of each batch (stage 2): it never has to
              unlearn anything and resumes each concept where it left it. The upper bound of memory.
  reset       one prompt, re-initialised (and its Adam state cleared) at every regime change, which
              it is told: relearning from scratch, the lower bound of what any memory must beat.
  leader      FLH's snapshot pool (stage 5), but predicting with the single expert of lowest mean
              loss over the last `leader_window` batches instead of FLH's weighted mixture: does
              FLH's weighting matter, or only keeping the snapshots?
  detect      what a practitioner would build: one prompt, a drift detector (river's ADWIN) on its
              loss, and at an alarm the stored prompt or a fresh one that does best on the next few
              batches (RCD, ECPF in MOA); see DetectLearner.
Plus `flh_sum`: FLH with the plan's weighted-sum training and otherwise the same settings as `flh`.

Every method, FLH included (stage 5), is a *learner*: `step(batch)` predicts on the batch with the
parameters it has, then learns from the batch's labels, and returns one log row; `state_dict()` /
`load_state_dict()` hold everything a checkpoint needs. The runner of stage 8 treats them alike.
`make_learner(method, model, args)` builds any of them from parsed flags.

Run `python stage6_baselines.py --method similarity` for a short run, `--test` for the checks.
"""

import functools
import itertools
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import assets
import common
import runs
from stage2_stream import StreamSettings, TextStream, encode_texts
from stage3_backbone import (
    ModelSettings,
    forward_with_example_prompts,
    forward_with_prompt,
    forward_with_prompts,
    load_backbone,
    text_budget,
)
from stage4_pool import per_prompt_losses
from stage5_train import (
    WEIGHT_DECAY,
    FLHLearner,
    FLHSettings,
    RunSettings,
    accuracy,
    base_row,
    fresh_run,
    prepare,
    r6,
    train_step,
)

METHODS = ["flh", "flh_sum", "single", "reset", "oracle", "leader", "detect", "random", "similarity"]


@dataclass(frozen=True)
class BaselineSettings(common.Settings):
    """The baselines' own settings, each declared once (they share FLH's where they use a pool)."""

    num_prompts: int = common.setting(10, common.positive_int, "pool size K of random and similarity")
    leader_window: int = common.setting(
        10, common.positive_int, "leader: batches over which the expert of lowest mean loss is chosen"
    )
    detect_delta: float = common.setting(  # ADWIN's own default
        0.002, common.probability, "detect: ADWIN's confidence delta (smaller: fewer, surer alarms)"
    )
    detect_probe: int = common.setting(
        5, common.positive_int, "detect: batches after an alarm on which the stored and fresh prompts compete"
    )


class PromptLearner:
    """Shared parts: a list of trainable tensors, one AdamW over them, checkpointing."""

    def __init__(self, model, params, lr):
        self.model, self.params = model, params
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)

    def state_dict(self):
        return {
            "params": [p.detach().cpu().clone() for p in self.params],
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state):
        with torch.no_grad():
            for p, saved in zip(self.params, state["params"]):
                p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])


@torch.no_grad()
def prompt_predicts(model, batch, prompt, who):
    """One prompt's class probabilities [B, C], and who produced them (`who`, weight 1) per example."""
    probs = forward_with_prompt(model, batch, prompt).softmax(-1)
    return probs, [[{**who, "weight": 1.0}]] * len(probs)


def new_prompt(model, prompt_length, std=0.02):
    return nn.Parameter(torch.randn(prompt_length, model.embed_dim).to(model.device) * std)


def kmeans_pp(x, k):
    """k rows of x chosen by k-means++ seeding in cosine distance: the first uniformly, each next one
    with probability proportional to its squared distance from the nearest chosen (torch's RNG)."""
    x = F.normalize(x, dim=-1)
    chosen = [int(torch.randint(len(x), (1,)))]
    for _ in range(k - 1):
        d = (1 - (x @ x[chosen].T).max(1).values).clamp_min(0) ** 2
        chosen.append(int(torch.multinomial(d, 1)) if d.sum() > 0 else int(torch.randint(len(x), (1,))))
    return x[chosen]


class SingleLearner(PromptLearner):
    name = "single"

    def __init__(self, model, prompt_length, lr):
        self.prompt = new_prompt(model, prompt_length)
        super().__init__(model, [self.prompt], lr)

    def step(self, batch):
        loss, logits = train_step(self.model, self.prompt, self.optimizer, batch)
        return {**base_row(batch, loss, logits), "num_prompts": 1}

    def predict(self, batch):
        """The prompt's class probabilities [B, C] for unlabelled texts (see FLHLearner.predict)."""
        return prompt_predicts(self.model, batch, self.prompt, {"expert": "prompt"})


class ResetLearner(SingleLearner):
    """One prompt, re-initialised with fresh Adam state whenever the regime changes (it is told)."""

    name = "reset"

    def __init__(self, model, prompt_length, lr):
        super().__init__(model, prompt_length, lr)
        self.regime = None

    def step(self, batch):
        if self.regime is not None and batch["regime"] != self.regime:
            with torch.no_grad():
                self.prompt.copy_(new_prompt(self.model, self.prompt.shape[0]))
            self.optimizer.state.pop(self.prompt, None)
        self.regime = batch["regime"]
        return super().step(batch)

    def state_dict(self):
        return {**super().state_dict(), "regime": self.regime}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.regime = state["regime"]


class DetectLearner(SingleLearner):
    """Detect the drift, then reuse a stored prompt: the baseline a practitioner would reach for.

    One live prompt learns as `single` does; river's ADWIN (Bifet & Gavalda, "Learning from
    time-changing data with adaptive windowing", SDM 2007) watches its per-batch loss. At an alarm
    the live prompt is stored (at most `max_prompts`, the oldest dropped first; 0: no cap), and for
    the next `probe` batches every stored prompt and one fresh prompt are scored on each batch,
    untrained, while the live prompt goes on predicting and learning. Then the lowest mean loss over
    those batches wins: a stored prompt (the rule came back) or the fresh one (a new rule: no
    unlearning) continues as the live prompt with a fresh optimiser state, or the live prompt itself
    goes on.
    This is the pattern of MOA's recurring-concept learners, RCD (Goncalves & de Barros, 2013) and
    ECPF (Anderson, Koh & Dobbie, 2016): a pool of models indexed by drift alarms, the stored or a
    new one chosen on the data after the alarm. Its memory is explicit and its switches are hard;
    FLH's are soft and need no detector."""

    name = "detect"

    def __init__(self, model, prompt_length, lr, max_prompts, probe, delta):
        super().__init__(model, prompt_length, lr)
        self.max_prompts, self.probe, self.delta = max_prompts, probe, delta
        self.stored, self.stored_at = [], []  # frozen prompts, and the step each was stored at
        self.candidates, self.probe_losses = None, []  # during a probe: fresh + stored, their losses
        self.losses = []  # the live prompt's losses since the detector was last (re)started
        self.detector = self.new_detector()

    def new_detector(self, losses=()):
        """ADWIN over the given losses (a resumed run replays them: the detector's state exactly)."""
        from river import drift

        detector = drift.ADWIN(delta=self.delta, clock=1)  # check at every batch, not every 32nd
        for x in losses:
            detector.update(x)
        return detector

    def step(self, batch):
        row = {}
        if self.candidates is not None:  # score the candidates before anything learns from the batch
            with torch.no_grad():
                logits = forward_with_prompts(self.model, batch, torch.stack(self.candidates))
            self.probe_losses.append(per_prompt_losses(logits, batch["labels"]).tolist())
        loss, logits = train_step(self.model, self.prompt, self.optimizer, batch)
        self.losses.append(loss)
        self.detector.update(loss)
        if self.candidates is not None:
            self.probe_losses[-1].append(loss)  # the live prompt's, last
            if len(self.probe_losses) == self.probe:
                row["switched_to"] = self.choose()
        elif self.detector.drift_detected:
            self.store(batch["step"])
            row["alarm"] = True
        return {**base_row(batch, loss, logits), **row, "num_prompts": 1 + len(self.stored)}

    def store(self, step):
        """An alarm: keep the live prompt, and start a probe of the fresh prompt and the stored ones."""
        self.stored.append(self.prompt.detach().clone())
        self.stored_at.append(step)
        if self.max_prompts and len(self.stored) > self.max_prompts:
            self.stored.pop(0), self.stored_at.pop(0)
        self.candidates = [new_prompt(self.model, self.prompt.shape[0]).detach(), *self.stored]
        self.probe_losses = []

    def choose(self):
        """The end of a probe: the lowest mean loss continues as the live prompt. Returns its name."""
        means = torch.tensor(self.probe_losses).mean(0).tolist()  # [fresh, stored..., live]
        best = min(range(len(means)), key=means.__getitem__)
        name = (
            "live"
            if best == len(means) - 1
            else "fresh"
            if best == 0
            else f"stored@{self.stored_at[best - 1]}"
        )
        if name != "live":
            with torch.no_grad():
                self.prompt.copy_(self.candidates[best])
            self.optimizer.state.pop(self.prompt, None)
        self.candidates, self.probe_losses, self.losses = None, [], []
        self.detector = self.new_detector()
        return name

    def state_dict(self):
        return {
            **super().state_dict(),
            "stored": list(self.stored),
            "stored_at": list(self.stored_at),
            "candidates": None if self.candidates is None else list(self.candidates),
            "probe_losses": [list(x) for x in self.probe_losses],
            "losses": list(self.losses),
        }

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.stored, self.stored_at = [t.clone() for t in state["stored"]], list(state["stored_at"])
        self.candidates = None if state["candidates"] is None else [t.clone() for t in state["candidates"]]
        self.probe_losses, self.losses = [list(x) for x in state["probe_losses"]], list(state["losses"])
        self.detector = self.new_detector(self.losses)


class OracleLearner(PromptLearner):
    """One prompt per concept, told the concept of every batch; a concept's prompt is made when the
    concept first appears and trains only on its batches."""

    name = "oracle"

    def __init__(self, model, prompt_length, lr):
        self.model, self.params, self.prompt_length, self.concepts = model, [], prompt_length, []
        self.optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr, weight_decay=WEIGHT_DECAY)

    def prompt_for(self, concept):
        if concept not in self.concepts:
            if not self.concepts:
                self.optimizer.param_groups.clear()  # the placeholder that AdamW needed to exist
            self.concepts.append(concept)
            self.params.append(new_prompt(self.model, self.prompt_length))
            self.optimizer.add_param_group({"params": [self.params[-1]]})
        return self.params[self.concepts.index(concept)]

    def step(self, batch):
        loss, logits = train_step(self.model, self.prompt_for(batch["concept"]), self.optimizer, batch)
        return {**base_row(batch, loss, logits), "num_prompts": len(self.params)}

    def predict(self, batch):
        raise common.UserError(
            "the oracle is told each batch's concept; new texts have none: predict with another method"
        )

    def state_dict(self):
        return {**super().state_dict(), "concepts": list(self.concepts)}

    def load_state_dict(self, state):
        for c in state["concepts"]:
            with torch.random.fork_rng():  # the values come from the checkpoint; keep the RNG as saved
                self.prompt_for(c)
        super().load_state_dict(state)


class LeaderLearner(FLHLearner):
    """FLH's snapshot pool, predicting with the expert of lowest mean loss over its last `window`
    batches (chosen before the batch's labels are seen; experts without a loss yet are skipped,
    and at the very start the live prompt predicts)."""

    name = "leader"

    def __init__(self, model, prompt_length, lr, settings, leader_window):
        super().__init__(model, prompt_length, lr, replace(settings, train_mode="snapshot"))
        self.window, self.history = leader_window, {}  # birth id -> deque of its recent losses

    def leader(self):
        """Index of the expert of lowest mean recent loss (the live prompt while none has a loss yet)."""
        ids = self.pool.birth_ids
        scored = [k for k, j in enumerate(ids) if self.history.get(j)]
        if not scored:
            return len(ids) - 1
        return min(scored, key=lambda k: sum(self.history[ids[k]]) / len(self.history[ids[k]]))

    def step(self, batch):
        row = super().step(batch)  # trains the pool exactly as FLH does and logs the mixture too
        ids, losses = self.pool.birth_ids, row["expert_losses"]
        k = self.leader()
        logits, y = self.expert_logits_everywhere(k, batch), batch["labels"]  # on every example
        self.history = {j: self.history.get(j, deque(maxlen=self.window)) for j in ids}
        for j, loss in zip(ids, losses):
            self.history[j].append(loss)
        return {
            **row,
            "loss": r6(F.cross_entropy(logits, y)),
            "acc": r6(accuracy(logits, y)),
            "leader": ids[k],
        }

    def state_dict(self):
        return {**super().state_dict(), "history": {j: list(h) for j, h in self.history.items()}}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.history = {j: deque(h, maxlen=self.window) for j, h in state["history"].items()}

    def predict(self, batch):
        """The next batch's leader predicts alone (the one `step` would choose)."""
        k = self.leader()
        expert = {key: v for key, v in self.pool.experts()[k].items() if key != "weight"}
        return prompt_predicts(self.model, batch, self.pool.prompts[k], expert)


class RandomPoolLearner(PromptLearner):
    """K prompts; each batch draws one uniformly (from torch's global RNG, which checkpoints keep)."""

    name = "random"

    def __init__(self, model, prompt_length, num_prompts, lr):
        self.prompts = [new_prompt(model, prompt_length) for _ in range(num_prompts)]
        super().__init__(model, self.prompts, lr)

    def draw(self):
        return int(torch.randint(len(self.prompts), (1,)))

    def step(self, batch):
        j = self.draw()
        # AdamW skips parameters whose grad is None, so only the drawn prompt moves.
        loss, logits = train_step(self.model, self.prompts[j], self.optimizer, batch)
        return {**base_row(batch, loss, logits), "num_prompts": len(self.prompts), "selected": j}

    @torch.no_grad()
    def predict(self, batch):
        """What a random draw predicts on average: the mean of the K prompts' probabilities."""
        probs = torch.stack([prompt_predicts(self.model, batch, p, {})[0] for p in self.prompts]).mean(0)
        who = [{"expert": f"prompt {i}", "weight": 1 / len(self.prompts)} for i in range(len(self.prompts))]
        return probs, [who] * len(probs)


class SimilarityLearner(PromptLearner):
    """mini-L2P: per-example prompt chosen by cosine similarity of the sentence query to learned keys."""

    name = "similarity"

    def __init__(self, model, prompt_length, num_prompts, lr, key_weight=0.1):
        self.prompts = [new_prompt(model, prompt_length) for _ in range(num_prompts)]
        self.keys = [nn.Parameter(torch.zeros(model.embed_dim).to(model.device)) for _ in range(num_prompts)]
        self.key_weight = key_weight
        super().__init__(model, self.prompts + self.keys, lr)

    def init_keys(self, q):
        """Keys = K of the first batch's queries, spread out by k-means++ (all-zero keys: not yet set)."""
        if all(not k.any() for k in self.keys):
            with torch.no_grad():
                for k, row in zip(self.keys, kmeans_pp(q, len(self.keys))):
                    k.copy_(row)

    def select(self, q):
        """Index of the nearest key for each query, and the (differentiable) similarities [B, K]."""
        sim = F.cosine_similarity(q[:, None], torch.stack(self.keys)[None], dim=-1)
        return sim.argmax(1), sim

    def step(self, batch):
        q = self.model.query(batch)  # the frozen sentence embedding, no prompt
        self.init_keys(q)
        idx, sim = self.select(q)
        logits = forward_with_example_prompts(self.model, batch, torch.stack(self.prompts)[idx])
        ce = F.cross_entropy(logits, batch["labels"])
        loss = ce - self.key_weight * sim.gather(1, idx[:, None]).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        counts = torch.bincount(idx, minlength=len(self.prompts)).tolist()
        return {
            **base_row(batch, ce.item(), logits.detach()),
            "num_prompts": len(self.prompts),
            "selected": counts,
        }

    @torch.no_grad()
    def predict(self, batch):
        """Each text's nearest key picks its prompt, as in `step` (the keys must have been set)."""
        idx, _ = self.select(self.model.query(batch))
        probs = forward_with_example_prompts(self.model, batch, torch.stack(self.prompts)[idx]).softmax(-1)
        return probs, [[{"expert": f"prompt {int(i)}", "weight": 1.0}] for i in idx]


def make_learner(method, model, args):
    """Any method as a learner, from parsed flags (prompt_length, lr, num_prompts, leader_window and
    FLH's flags of stage 5)."""
    P, lr, flh = args.prompt_length, args.lr, common.settings(FLHSettings, args)
    if method in ("flh", "flh_sum"):
        learner = FLHLearner(
            model, P, lr, replace(flh, train_mode="weighted_sum") if method == "flh_sum" else flh
        )
        learner.name = method
        return learner
    if method == "leader":
        return LeaderLearner(model, P, lr, flh, args.leader_window)
    if method in ("single", "reset", "oracle"):
        return {"single": SingleLearner, "reset": ResetLearner, "oracle": OracleLearner}[method](model, P, lr)
    if method == "detect":
        return DetectLearner(model, P, lr, args.max_prompts, args.detect_probe, args.detect_delta)
    if method == "random":
        return RandomPoolLearner(model, P, args.num_prompts, lr)
    if method == "similarity":
        return SimilarityLearner(model, P, args.num_prompts, lr)
    raise common.UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def load_learner(folder, device="auto"):
    """(learner, tokenizer, max_length, about) from a folder written by runs.save_learner: the frozen
    backbone is loaded as the run had it, the learner made and its state loaded. An edited or
    damaged pair of files is refused in one line: learner.json must hold the method, the steps and
    the settings, and the state must fit the learner they make (shapes, finite values)."""
    import argparse

    path = folder / "learner.json"
    if not path.exists():
        held = sorted(p.parent.parent.name for p in folder.glob("*/pool/learner.json"))
        raise common.UserError(
            f"{folder} holds no saved learner (learner.json)"
            + (f"; it holds {', '.join(held)}: choose one with --method" if held else "")
        )
    about = common.read_json(path)
    if not (
        isinstance(about, dict)
        and about.get("method") in METHODS
        and isinstance(about.get("steps"), int)
        and isinstance(about.get("config"), dict)
    ):
        raise common.UserError(f"{path} must hold a known 'method', an integer 'steps' and a 'config' object")
    if "image_size" in about["config"]:
        raise common.UserError(f"{folder} is a vision run; only text runs predict from the command line")
    state = common.load_state(folder / "learner.safetensors")
    try:
        args = argparse.Namespace(**about["config"])
        model, tok = load_backbone(args.backbone, pooling=args.pooling, device=common.resolve_device(device))
        model.precision = args.precision
        runs.check_state(state, (args.prompt_length, model.embed_dim), "learner.safetensors")
        learner = make_learner(about["method"], model, args)
        learner.load_state_dict(state)
        max_length = min(args.max_length, text_budget(model, args.prompt_length))
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError, OSError) as e:
        why = " ".join(str(e).split())[:150]
        raise common.UserError(
            f"{folder}: learner.json and learner.safetensors do not make a {about['method']} learner "
            f"({type(e).__name__}: {why}): edited or damaged"
        ) from None
    return learner, tok, max_length, about


def file_lines(path):
    """The non-blank lines of a UTF-8 text file (a byte-order mark is skipped), one at a time: memory
    stays bounded whatever the file's size. A byte that is not UTF-8 ends it with one line naming it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").removeprefix("\ufeff" if n == 1 else "").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise common.UserError(
                    f"--file {path} line {n}: byte {e.start} is not UTF-8 (save it as UTF-8)"
                )
            if line.strip():
                yield line


def classify(args, batch_size=64):
    """Stage 8's --predict: classify new texts with what a run learned, and say which experts answered. The
    texts go through in batches of `batch_size` (a file of any length in bounded memory); returns
    the class probabilities [N, C]."""
    folder = Path(args.predict)
    if not (folder / "learner.json").exists() and (folder / "pool").is_dir():
        folder = folder / "pool"  # a method's folder
    elif not (folder / "learner.json").exists() and (folder / args.method / "pool").is_dir():
        folder = folder / args.method / "pool"  # a run's folder: --method picks (default flh)
    if args.file and not Path(args.file).is_file():
        raise common.UserError(f"--file: no file {args.file}")
    total = len(args.text or []) + (
        sum(1 for _ in file_lines(args.file)) if args.file else 0
    )  # checked first
    if not total:
        raise common.UserError("--predict needs texts: give --text (several times if you like) or --file")
    learner, tok, max_length, about = load_learner(folder, args.device)
    cfg = about["config"]
    last = about["steps"] - 1
    flipped = bool(cfg.get("flip_interval")) and not cfg.get("no_flip") and (last // cfg["flip_interval"]) % 2
    print(
        f"{about['method']} from {folder}, after {about['steps']} steps"
        + (": its last regime flips the labels, so label 1 here is the data's label 0" if flipped else "")
    )
    texts = itertools.chain(args.text or [], file_lines(args.file) if args.file else [])
    device, out, bar = learner.model.device, [], common.progress(total=total, desc="predict", unit="text")
    while batch := list(itertools.islice(texts, batch_size)):
        encoded = encode_texts(tok, batch, max_length)
        probs, who = learner.predict({k: v.to(device) for k, v in encoded.items()})
        show_predictions(batch, probs, who)
        out.append(probs.cpu())
        bar.update(len(batch))
    bar.close()
    return torch.cat(out)


def show_predictions(texts, probs, who):
    """Each text's label and probability, and the experts that answered (the heaviest four)."""
    for text, p, experts in zip(texts, probs.tolist(), who):
        label = max(range(len(p)), key=p.__getitem__)
        print(f"label {label}  p={p[label]:.3f}  {text[:70]!r}")
        top = sorted(experts, key=lambda e: -e["weight"])
        shown = [
            (f"expert {e['expert']}" if isinstance(e["expert"], int) else e["expert"])
            + (f" (born at step {e['born_at']})" if e.get("born_at") is not None else "")
            + f" w={e['weight']:.3f}"
            for e in top[:4]
        ]
        rest = len(top) - len(shown)
        print(
            "    by "
            + ", ".join(shown)
            + (f" and {rest} more of weight {sum(e['weight'] for e in top[4:]):.3f}" if rest else "")
        )


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def test_args(**kw):
    """Parsed flags for make_learner in the checks: stage 5's FLH defaults, overridden by kw."""
    import argparse

    return argparse.Namespace(
        **{
            **asdict(FLHSettings()),
            **asdict(BaselineSettings()),
            "prompt_length": 8,
            "lr": 3e-2,
            "num_prompts": 2,
            "leader_window": 10,
            **kw,
        }
    )


@functools.cache
def _minilm_rt():
    """For the checks: the embedded MiniLM, its tokenizer, the rt texts and labels, and streams of
    them without flips and with flips every 3 steps."""
    model, tok = load_backbone("minilm")
    texts, labels = assets.load_text_data("rt")["rt"]
    stream = TextStream({"rt": (texts, labels)}, tok, batch_size=8, max_length=64, flip_every_n=None)
    flips = TextStream({"rt": (texts, labels)}, tok, batch_size=8, max_length=64, flip_every_n=3)
    return model, tok, texts, labels, stream, flips


def _fixed_80(labels):
    """80 sentences, 40 of each class (the file is sorted by label)."""
    return [i for i, y in enumerate(labels) if y == 1][:40] + [i for i, y in enumerate(labels) if y == 0][:40]


def test_learns_fixed_labels():
    """Every learner learns a fixed-label stream over 80 sentences, so that 100 batches of 8 pass over
    each 10 times."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    pick = _fixed_80(labels)
    small = TextStream(
        {"rt": ([texts[i] for i in pick], [labels[i] for i in pick])},
        tok,
        batch_size=8,
        max_length=64,
        flip_every_n=None,
    )
    for method in ("single", "random", "similarity", "leader"):
        torch.manual_seed(0)
        learner = make_learner(method, model, test_args(train_mode="snapshot", birth_interval=25))
        rows = [learner.step(small.batch(s)) for s in range(100)]
        late = sum(r["acc"] for r in rows[50:]) / 50
        assert late > 0.6, (method, late)  # 400 examples: 0.6 is 4 standard errors above chance
        print(
            f"  ok: {method} learns a fixed-label stream: prequential accuracy over steps 50-99 = {late:.2f}"
        )


def test_saved_learner_predicts():
    """A learner saved after 13 steps (runs.save_learner: safetensors + JSON) and loaded back
    (load_learner) predicts batch 13 with the loss the learner itself reports at step 13, where it
    predicts before it learns; for every method --predict serves (oracle and reset are told the regime)."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    config = dict(backbone="minilm", pooling=model.pooling, precision=model.precision, max_length=64)
    args = test_args(**config, train_mode="snapshot", birth_interval=5, max_prompts=3, share=0.01)
    batch = flips.batch(13)
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("flh", "flh_sum", "single", "leader", "similarity"):
            torch.manual_seed(0)
            learner = make_learner(method, model, args)
            for s in range(13):
                learner.step(flips.batch(s))
            runs.save_learner(learner, Path(tmp) / method, vars(args), 13)
            loaded, tok, max_length, about = load_learner(Path(tmp) / method, "cpu")
            probs, who = loaded.predict(encode_texts(tok, [texts[i] for i in batch["index"]], max_length))
            ce, logged = F.nll_loss(probs.log(), batch["labels"]).item(), learner.step(batch)["loss"]
            assert abs(ce - logged) <= 2e-6 * abs(logged), (method, ce, logged)
            assert about["steps"] == 13 and len(who) == 8 and abs(sum(e["weight"] for e in who[0]) - 1) < 1e-9
    print("  ok: flh, flh_sum, single, leader, similarity: saved, loaded back, batch 13's loss as logged")


def test_detect():
    """Detect: ADWIN (checked at every batch) fires on a jump of the loss; after an alarm the probe hands a
    new rule to a fresh prompt and an old rule back to the prompt stored when it ended."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    pick = _fixed_80(labels)
    few = {"rt": ([texts[i] for i in pick], [labels[i] for i in pick])}
    back = TextStream(few, tok, batch_size=8, max_length=64, flip_every_n=100)  # flipped in 100..199
    detect = make_learner("detect", model, test_args())
    watch = detect.new_detector()
    fired = []
    for t, x in enumerate([0.4, 0.5] * 50 + [1.2, 1.3] * 20):
        watch.update(x)
        fired += [t] if watch.drift_detected else []
    assert fired and 100 <= fired[0] < 120, fired
    rows = [detect.step(back.batch(t)) for t in range(100)]  # learns rule 0 as `single` does
    detect.store(99)  # an alarm at the flip (forced here, so that the check does not wait for ADWIN)
    rows = [detect.step(back.batch(t)) for t in range(100, 105)]
    assert rows[-1]["switched_to"] == "fresh", rows[-1]  # rule 1 is new: nothing stored knows it
    detect.store(104)
    rows = [detect.step(back.batch(t)) for t in range(200, 202)]
    with tempfile.TemporaryDirectory() as tmp:  # mid-probe, through a state file
        common.save_state(Path(tmp) / "d.safetensors", detect.state_dict())
        twin = make_learner("detect", model, test_args())
        twin.load_state_dict(common.load_state(Path(tmp) / "d.safetensors"))
    rows = [detect.step(back.batch(t)) for t in range(202, 205)]
    assert [twin.step(back.batch(t)) for t in range(202, 205)] == rows, (
        "the reloaded learner went another way"
    )
    assert rows[-1]["switched_to"] == "stored@99", rows[-1]  # rule 0 is back: its prompt, stored at 99
    print(
        f"  ok: detect: ADWIN fires {fired[0] - 100} batches after a loss jump; after a forced alarm a "
        "fresh prompt takes the new rule, the prompt stored at step 99 takes rule 0 back; resumes exactly"
    )


def test_oracle():
    """Oracle: one prompt per concept; a concept's prompt does not move while the other concept is on."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    torch.manual_seed(0)
    oracle = make_learner("oracle", model, test_args())
    for s in range(3):
        oracle.step(flips.batch(s))
    first = oracle.params[0].detach().clone()
    for s in range(3, 6):
        row = oracle.step(flips.batch(s))
    assert (
        oracle.concepts == [0, 1]
        and torch.equal(oracle.params[0].detach(), first)
        and row["num_prompts"] == 2
    )
    oracle.step(flips.batch(6))
    assert not torch.equal(oracle.params[0].detach(), first) and len(oracle.params) == 2
    print(
        "  ok: oracle keeps one prompt per concept; concept 0's prompt rests while concept 1 is on, "
        "then resumes"
    )


def test_reset():
    """Reset: at every regime change the prompt is re-drawn and its Adam state starts again."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    torch.manual_seed(0)
    reset = make_learner("reset", model, test_args())
    for s in range(3):
        reset.step(flips.batch(s))
    before, steps_before = reset.prompt.detach().clone(), int(reset.optimizer.state[reset.prompt]["step"])
    reset.step(flips.batch(3))
    assert steps_before == 3 and int(reset.optimizer.state[reset.prompt]["step"]) == 1
    assert (reset.prompt.detach() - before).abs().max() > 0.01 and reset.prompt.detach().std() < 0.05
    print("  ok: reset re-draws its prompt and clears its Adam state at the regime change (step 3)")


def test_leader():
    """Leader: predicts with the expert of lowest mean loss over its last window of batches."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    torch.manual_seed(0)
    leader = make_learner("leader", model, test_args(birth_interval=2, leader_window=3))
    seen = {}
    for s in range(8):
        b = stream.batch(s)
        row = leader.step(b)
        ids = leader.pool.birth_ids
        means = {j: sum(seen[j][-3:]) / len(seen[j][-3:]) for j in ids if seen.get(j)}
        want = min(means, key=means.get) if means else ids[-1]
        k = ids.index(want)
        logits = leader.last_expert_logits[k]
        assert row["leader"] == want and row["acc"] == r6(accuracy(logits, b["labels"])), (
            s,
            row["leader"],
            want,
        )
        for j, loss in zip(ids, row["expert_losses"]):
            seen.setdefault(j, []).append(loss)
    print("  ok: leader predicts with the expert of lowest mean loss over its last 3 batches")


def test_random_uniform():
    """Random selection is uniform: 10 prompts, 5,000 draws, every count within 15% of 500."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    torch.manual_seed(0)
    learner = RandomPoolLearner(model, 2, 10, 1e-3)
    counts = torch.bincount(torch.tensor([learner.draw() for _ in range(5000)]), minlength=10)
    assert ((counts - 500).abs() < 75).all(), counts
    print(f"  ok: random draws are uniform: counts {counts.tolist()}")


def test_similarity():
    """Similarity: keys start at K distinct queries of the first batch; it picks the nearest key, and the
    keys move towards their queries."""
    model, tok, texts, labels, stream, flips = _minilm_rt()
    torch.manual_seed(0)
    learner = SimilarityLearner(model, prompt_length=4, num_prompts=4, lr=5e-2)
    batch = stream.batch(0)
    q = model.query(batch)
    learner.step(batch)
    qn = F.normalize(q, dim=-1)
    for k in learner.keys:  # one Adam step moved each key by at most about lr
        assert (qn - k.detach()).abs().max(1).values.min() < 0.06
    assert len({int((qn - k.detach()).abs().sum(1).argmin()) for k in learner.keys}) == 4
    idx, _ = learner.select(q)
    for b in range(len(q)):
        cos = [float(F.cosine_similarity(q[b], k.detach(), dim=0)) for k in learner.keys]
        assert int(idx[b]) == max(range(4), key=cos.__getitem__)
    before = F.cosine_similarity(q, torch.stack(learner.keys)[idx].detach(), dim=-1).mean()
    for _ in range(5):
        learner.step(batch)
    after = F.cosine_similarity(q, torch.stack(learner.keys)[idx].detach(), dim=-1).mean()
    assert after > before + 0.01, (before, after)
    print(
        f"  ok: similarity keys start at 4 distinct queries (k-means++); it picks the nearest key; "
        f"5 steps raise cos(query, its key) {before:.3f} -> {after:.3f}"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


def build_parser():
    p = common.Parser(description="Stage 6: run one baseline on the changing stream (stage 8 runs them all).")
    p.add_argument("--method", choices=METHODS, default="single", help="which learner (default: single)")
    for settings in (StreamSettings, ModelSettings, BaselineSettings, FLHSettings):
        common.add_settings(p, settings)
    common.add_settings(p, RunSettings, lr=1e-2)  # this stage's own learning rate
    common.add_common_args(p, run_name="baseline")
    return p


def main(args):
    if args.test:
        return run_tests()
    model, stream = prepare(args)
    learner = make_learner(args.method, model, args)
    rows = fresh_run(learner, stream, args)[-100:]
    print(
        f"{args.method}: accuracy over the last {len(rows)} steps "
        f"{sum(r['acc'] for r in rows) / len(rows):.3f} "
        f"-> {args.out}/{args.run_name}/log.jsonl"
    )


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
