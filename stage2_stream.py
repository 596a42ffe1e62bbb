"""Stage 2: an endless stream of batches whose rules change at known steps.

A learner that keeps up with change needs change it can be measured against. The stream cycles
through a labelled text set forever (reshuffled on every pass, from the seed) and changes its
rules on a schedule:

  label flips     labels are inverted, y -> 1 - y, in every odd block of `flip_every_n` steps;
  domain change   with several domains, the stream shows domain (s // steps_per_domain) mod D.

Step s is the 0-based batch index. Its *regime* counts the change points c in (0, s], where the
change points are the multiples of `flip_every_n` and of `steps_per_domain`. So with flips every
1000 steps, steps 0..999 are regime 0, and step 1000, the first batch that carries flipped labels,
is regime 1. (The public reference flipped its labels one batch *late*: its logged regime
changed at step 1000, its labels at step 1001.)

Regimes recur. The *concept* of a batch says which distinct rule is active: with flips alone it is
regime % 2 (original or flipped labels), with domains alone the domain's index, with both
2 * domain + flipped. A learner is never told the regime or the concept (only the oracle of stage 6
is); the metrics of stage 7 use it to tell a first-time shift from a recurring one.

Every batch is a pure function of (seed, step): the k-th batch a domain serves holds the examples
at positions kB .. kB+B-1 of that domain's endless sequence of seeded permutations. Resuming a run
is therefore just asking for the next step, and several methods can see the same batches in the
same order without sharing an iterator. Texts are tokenised once; a batch is padded only to its
longest row.

Run `python stage2_stream.py` to print a few batches, `--test` for the checks (5,000 batches of
the embedded Rotten Tomatoes sentences; the flip lands exactly at step 1000; the domain of the
multi-domain stream really changes).
"""

import functools
import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

import assets
import common


def load_tokenizer(backbone):
    """The tokenizer that goes with a backbone name (see assets.resolve_text_backbone)."""
    from transformers import AutoTokenizer

    _, tokenizer_source, _ = assets.resolve_text_backbone(backbone)
    return assets.from_pretrained(AutoTokenizer, tokenizer_source, "backbone")


def pad_rows(rows, pad_id):
    """Token id lists -> (input_ids, attention_mask) [B, longest row], padded on the right."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, ids in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        attention_mask[r, : len(ids)] = 1
    return input_ids, attention_mask


def encode_texts(tokenizer, texts, max_length):
    """New texts as a batch, tokenised and padded exactly as the stream does it (no labels)."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    input_ids, attention_mask = pad_rows(ids, tokenizer.pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batch_rows(batch, start=0, stop=None):
    """Examples start..stop-1 of a batch: every tensor sliced along its first dimension."""
    return {k: v[start:stop] if torch.is_tensor(v) else v for k, v in batch.items()}


class TextStream:
    """Endless batches {input_ids, attention_mask, labels, index, step, regime, concept, domain, flipped}.

    domains: {name: (texts, labels)}; several domains rotate every `steps_per_domain` steps
    (None merges them into one). flip_every_n: None for no flips."""

    def __init__(
        self,
        domains,
        tokenizer,
        batch_size=16,
        max_length=128,
        flip_every_n=1000,
        steps_per_domain=None,
        seed=0,
    ):
        if steps_per_domain is None and len(domains) > 1:
            merged = (
                [t for ts, _ in domains.values() for t in ts],
                [y for _, ys in domains.values() for y in ys],
            )
            domains = {"+".join(domains): merged}
        self.names = list(domains)
        self.texts = [list(domains[d][0]) for d in self.names]
        self.labels = [torch.tensor(domains[d][1], dtype=torch.long) for d in self.names]
        # Tokenise once; truncation keeps [CLS] ... [SEP] within max_length.
        self.ids = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] for t in self.texts]
        self.pad_id = tokenizer.pad_token_id
        self.batch_size, self.seed = batch_size, seed
        self.flip_every_n = flip_every_n
        self.steps_per_domain = steps_per_domain if len(self.names) > 1 else None
        self._perms = {}

    def regime(self, step):
        """Number of change points in (0, step]."""
        a, b = self.flip_every_n, self.steps_per_domain
        if a and b:
            return step // a + step // b - step // math.lcm(a, b)
        return step // (a or b) if (a or b) else 0

    def _perm(self, d, epoch):
        """The seeded order of domain d's examples on its `epoch`-th pass."""
        if (d, epoch) not in self._perms:
            if len(self._perms) > 16:
                self._perms.clear()
            rng = np.random.default_rng([self.seed, d, epoch])
            self._perms[(d, epoch)] = rng.permutation(len(self.ids[d]))
        return self._perms[(d, epoch)]

    def batch(self, step):
        """The batch at `step` (random access: no state is consumed)."""
        if self.steps_per_domain:
            spd, n_dom = self.steps_per_domain, len(self.names)
            d = (step // spd) % n_dom
            k = (step // (spd * n_dom)) * spd + step % spd  # steps domain d has served before
        else:
            d, k = 0, step
        n = len(self.ids[d])
        positions = range(k * self.batch_size, (k + 1) * self.batch_size)
        index = torch.tensor([int(self._perm(d, p // n)[p % n]) for p in positions])
        input_ids, attention_mask = pad_rows([self.ids[d][i] for i in index], self.pad_id)
        flipped = bool(self.flip_every_n) and (step // self.flip_every_n) % 2 == 1
        labels = self.labels[d][index]
        concept = 2 * d + flipped if self.flip_every_n else d
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": 1 - labels if flipped else labels,
            "index": index,
            "step": step,
            "regime": self.regime(step),
            "concept": concept,
            "domain": self.names[d],
            "flipped": flipped,
        }

    def iterate(self, start=0):
        """Batches start, start+1, ... forever."""
        step = start
        while True:
            yield self.batch(step)
            step += 1


# ----------------------------------------------------------------------------------------------
# Flags shared by every text stage
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamSettings(common.Settings):
    """The stream's settings, each declared once (stage 8's presets fill some of them)."""

    dataset: str = common.setting(
        "rt",
        help="rt (embedded Rotten Tomatoes sentences) | imdb | multidomain (VADER: amazon, movies, nyt, "
        "tweets) | sst2 (hub) | your own: a .csv or .jsonl file, a save_to_disk folder or a hub dataset "
        "name (rotten_tomatoes, glue/sst2)",
    )
    text_column: str = common.setting(None, help="your data's text column (default: 'text', else 'sentence')")
    label_column: str = common.setting(
        None, help="your data's label column, 0/1 or two names (default: 'label')"
    )
    domain_column: str = common.setting(
        None, help="your data's domain column: several domains take turns (default: 'domain' if there is one)"
    )
    batch_size: int = common.setting(16, common.positive_int, "examples per batch")
    max_length: int = common.setting(
        128, common.positive_int, "max text tokens per example incl. [CLS]/[SEP]"
    )
    flip_interval: int = common.setting(
        None,
        common.positive_int,
        "steps between label flips (default: 1000 for single-domain data, none for multi-domain data)",
    )
    no_flip: bool = common.setting(False, help="never flip labels")
    steps_per_domain: int = common.setting(
        1000, common.positive_int, "steps per domain when the data has several"
    )


def build_stream(args, tokenizer, max_length=None):
    """A TextStream from parsed flags (max_length may be lowered to fit a prompt in)."""
    if args.no_flip and args.flip_interval:
        raise common.UserError("--no-flip and --flip-interval contradict each other: give one")
    domains = assets.load_text_data(args.dataset, args.text_column, args.label_column, args.domain_column)
    smallest = min(len(texts) for texts, _ in domains.values())
    if args.batch_size > smallest:
        raise common.UserError(
            f"--batch-size {args.batch_size} is larger than the data ({smallest} examples)"
        )
    flip = args.flip_interval or (1000 if len(domains) == 1 else None)
    return TextStream(
        domains,
        tokenizer,
        batch_size=args.batch_size,
        max_length=max_length or args.max_length,
        flip_every_n=None if args.no_flip else flip,
        steps_per_domain=args.steps_per_domain,
        seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
@functools.cache
def _rt():
    """For the checks: the tokenizer, the embedded rt data, and its first 5000 batches (flips every 1000)."""
    tok, rt = load_tokenizer("minilm"), assets.load_text_data("rt")
    stream = TextStream(rt, tok, batch_size=16, flip_every_n=1000, seed=0)
    return tok, rt, stream, [b for _, b in zip(range(5000), stream.iterate())]


def test_label_flips():
    """Labels flip exactly at every flip interval; each batch is padded to its longest row only."""
    _, rt, _, batches = _rt()
    texts, labels = rt["rt"]
    for s in (999, 1000, 1001):
        b = batches[s]
        i = int(b["index"][0])
        print(
            f"  step {s}: regime {b['regime']} flipped={b['flipped']} label {int(b['labels'][0])} "
            f"(original {labels[i]}): {texts[i][:60]!r}"
        )
    for b in batches:
        s, orig = b["step"], torch.tensor([labels[i] for i in b["index"]])
        flipped = (s // 1000) % 2 == 1
        assert b["regime"] == s // 1000 and b["concept"] == (s // 1000) % 2, (s, b["regime"], b["concept"])
        assert torch.equal(b["labels"], 1 - orig if flipped else orig), f"labels wrong at step {s}"
        assert b["input_ids"].shape == b["attention_mask"].shape
        # padded only to the longest row: some row is full length, and no column is all padding
        assert (
            b["attention_mask"][:, -1].any() and b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]
        )
    assert batches[999]["regime"] == 0 and batches[1000]["regime"] == 1, "flip is not exactly at step 1000"
    print("  ok: labels flip exactly at steps 1000, 2000, ...; regimes 0..4 over 5000 steps")


def test_cycling():
    """5000 x 16 examples is ~9.4 passes over 8,530; each pass covers every example once, and each
    pass is a fresh shuffle."""
    tok, rt, stream, batches = _rt()
    n = len(rt["rt"][0])
    order = torch.cat([b["index"] for b in batches])
    assert len(order) > 9 * n
    for e in range(9):
        assert sorted(order[e * n : (e + 1) * n].tolist()) == list(range(n)), f"pass {e} is not a permutation"
    assert not torch.equal(order[:n], order[n : 2 * n]), "passes are not reshuffled"
    assert torch.equal(stream.batch(4321)["input_ids"], batches[4321]["input_ids"]), "random access differs"
    other = TextStream(rt, tok, batch_size=16, seed=1)
    assert not torch.equal(other.batch(0)["index"], batches[0]["index"]), "seed is ignored"
    print(f"  ok: 5000 batches cycle through {n} sentences {len(order) / n:.1f} times, reshuffled each pass")


def test_domains():
    """The batch's tokens come from the domain it claims, which changes at each boundary; with flips
    too, concept = 2 * domain + flipped."""
    tok, md = _rt()[0], assets.load_text_data("multidomain")
    ms = TextStream(md, tok, batch_size=8, flip_every_n=None, steps_per_domain=50, seed=0)
    seen = []
    for s in range(0, 450, 1):
        b = ms.batch(s)
        want = assets.VADER_DOMAINS[(s // 50) % 4]
        assert b["domain"] == want and b["regime"] == s // 50 and b["concept"] == (s // 50) % 4, (
            s,
            b["domain"],
            want,
        )
        if s % 50 in (0, 49):
            dt, dl = md[want]
            fresh = tok([dt[i] for i in b["index"]], truncation=True, max_length=128)["input_ids"]
            for r, ids in enumerate(fresh):
                assert b["input_ids"][r, : len(ids)].tolist() == ids, f"batch {s} is not from {want}"
            assert b["labels"].tolist() == [dl[i] for i in b["index"]]
            seen.append(b["domain"])
    assert seen[:4] == ["amazon", "amazon", "movies", "movies"]
    # a domain resumes where it left off: amazon's 2nd visit continues its own order
    assert ms.batch(200)["index"].tolist() != ms.batch(0)["index"].tolist()
    print("  ok: multidomain changes domain at every 50-step boundary and batches hold that domain's texts")
    both = TextStream(md, tok, batch_size=2, flip_every_n=30, steps_per_domain=50, seed=0)
    steps = (0, 30, 50, 60, 100, 120, 200, 240)  # flips at 30, 60, 90, ...; domains change at 50, 100, ...
    concepts = [both.batch(s)["concept"] for s in steps]
    assert concepts == [0, 1, 3, 2, 5, 4, 0, 0], concepts
    print("  ok: concept = 2 * domain + flipped with both flips and domains; it recurs when the rules do")


def test_own_data():
    """Your own data: CSV, JSONL and save_to_disk give the batches the same rows give in memory;
    hub names take the same path; bad files end in one clear line."""
    import csv
    import json
    import os
    import tempfile

    tok, rt = _rt()[0], _rt()[1]["rt"]
    from pathlib import Path
    from unittest import mock

    import datasets

    datasets.disable_progress_bars()
    texts, labels = rt[0][:300], rt[1][:300]
    domains = [assets.VADER_DOMAINS[i % 2] for i in range(300)]  # two domains, interleaved

    def same_batches(loaded, want, **kw):
        a, b = (TextStream(d, tok, batch_size=8, flip_every_n=7, seed=5, **kw) for d in (loaded, want))
        for s in (0, 6, 7, 40, 123):
            x, y = a.batch(s), b.batch(s)
            assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "labels", "index")), s
            assert (x["regime"], x["concept"], x["domain"]) == (y["regime"], y["concept"], y["domain"])

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "mine.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["id", "review", "stars"])
            w.writerows([i, t, y] for i, (t, y) in enumerate(zip(texts, labels)))
        with open(tmp / "mine.jsonl", "w", encoding="utf-8") as f:
            f.writelines(
                json.dumps({"text": t, "label": y, "domain": d}) + "\n"
                for t, y, d in zip(texts, labels, domains)
            )
        datasets.Dataset.from_dict({"sentence": texts, "label": labels}).save_to_disk(str(tmp / "saved"))
        want = {"mine": (texts, labels)}
        csv_data = assets.load_text_data(str(tmp / "mine.csv"), text_column="review", label_column="stars")
        same_batches(csv_data, want)
        same_batches(assets.load_text_data(str(tmp / "saved")), {"saved": (texts, labels)})
        jl = assets.load_text_data(str(tmp / "mine.jsonl"))
        by_domain = {
            d: ([t for t, e in zip(texts, domains) if e == d], [y for y, e in zip(labels, domains) if e == d])
            for d in assets.VADER_DOMAINS[:2]
        }
        assert list(jl) == list(by_domain) and jl == by_domain
        same_batches(jl, by_domain, steps_per_domain=10)
        print(
            "  ok: a CSV file (named columns), a JSONL file (with a domain column) and a save_to_disk "
            "folder give the batches their rows give"
        )

        # two label names map in sorted order; hub names go through datasets.load_dataset
        with open(tmp / "named.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(
                [["text", "label"], ["fine", "positive"], ["awful", "negative"], ["ok", "positive"]]
            )
        assert assets.load_text_data(str(tmp / "named.csv")) == {
            "named": (["fine", "awful", "ok"], [1, 0, 1])
        }
        hub = datasets.Dataset.from_dict(
            {"sentence": texts[:20], "label": labels[:20], "idx": list(range(20))}
        )
        calls = []

        def fake_load(*a, **kw):
            calls.append(a)
            if a == ("glue", "sst2"):
                return hub
            raise FileNotFoundError(f"no dataset {a}")

        with (
            mock.patch.object(datasets, "load_dataset", fake_load),
            mock.patch.object(assets, "hub_reachable", lambda: True),
        ):
            assert assets.load_text_data("glue/sst2") == {"sst2": (texts[:20], labels[:20])}
            assert calls == [("glue/sst2",), ("glue", "sst2")], calls
            err = common.user_error(lambda: assets.load_text_data("rotten_tomatoes"))
            assert err.startswith("could not load 'rotten_tomatoes' from the hub"), err
        with (
            mock.patch.object(assets, "hub_reachable", lambda: False),
            mock.patch.dict(os.environ, {"HF_HUB_OFFLINE": ""}),
        ):
            err = common.user_error(lambda: assets.load_text_data("rotten_tomatoes"))
            assert "the hub cannot be reached" in err, err
        print(
            "  ok: two label names map to 0/1 in sorted order; 'glue/sst2' loads dataset glue, config sst2; "
            "an unreachable hub is one line at once"
        )

        # what a user gets wrong ends in one line that says what to do
        (tmp / "empty.csv").write_text("")
        (tmp / "header.csv").write_text("text,label\n")
        (tmp / "bad.jsonl").write_text('{"text": "a", "label": 1}\nnot json\n')
        with open(tmp / "three.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["text", "label"], ["a", "0"], ["b", "1"], ["c", "2"]])
        for args, kw, start in [
            (tmp / "mine.csv", {}, "no 'text' or 'sentence' column; its columns: id, review, stars"),
            (
                tmp / "mine.csv",
                {"text_column": "review", "label_column": "nope"},
                "no column 'nope' (--label-column)",
            ),
            (tmp / "empty.csv", {}, "is empty"),
            (tmp / "header.csv", {}, "holds no rows"),
            (tmp / "bad.jsonl", {}, "line 2 is not JSON"),
            (tmp / "three.csv", {}, "labels must be binary (0/1 or two names); found 3: '0', '1', '2'"),
            (tmp / "missing.csv", {}, "no file"),
            (tmp / "mine.tsv", {}, "unknown dataset"),
        ]:
            err = common.user_error(lambda: assets.load_text_data(str(args), **kw))
            assert start in err and "\n" not in err, (args, err)
    print(
        "  ok: a missing column, an empty file, a bad JSON line, three labels, a missing file: one line each"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


def build_parser():
    p = common.Parser(description="Stage 2: print a few batches of the changing stream.")
    common.add_settings(p, StreamSettings)
    p.add_argument(
        "--tokenizer", default="minilm", help="the tokenizer of this backbone (stage 3) (default: minilm)"
    )
    p.add_argument(
        "--show", type=common.positive_int, default=3, help="how many batches to print (default: 3)"
    )
    p.add_argument("--start", type=common.nonneg_int, default=0, help="first step to print (default: 0)")
    common.add_common_args(p, run_name="stream")
    return p


def main(args):
    if args.test:
        return run_tests()
    tok = load_tokenizer(args.tokenizer)
    stream = build_stream(args, tok)
    for s in range(args.start, args.start + args.show):
        b = stream.batch(s)
        print(
            f"step {s} regime {b['regime']} domain {b['domain']} flipped={b['flipped']} "
            f"shape {tuple(b['input_ids'].shape)}"
        )
        for ids, y in zip(b["input_ids"][:3], b["labels"][:3]):
            print(f"  label {int(y)}: {tok.decode(ids, skip_special_tokens=True)[:70]}")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
