"""What a step costs: our prompt tuning against HF PEFT, FLH's pool, and the per-prompt loss pass.

    python bench.py --quick        # the README's "Performance" table (pip install peft for the comparison)

Everything is timed *side by side* in one process: the functions being compared alternate pass by
pass (A B B A A B ...), and each gets the median of its passes, so a slow spell of a shared machine
falls on all of them alike. Ratios, not seconds, are the result. Rows per backbone and precision:
  single-prompt step   ours (stage 3's prompt after [CLS], stage 5's train_step) and HF PEFT's
                       prompt tuning on the same frozen encoder, read out the same way;
  forward GFLOP/s      the achieved rate against a matrix product's (the machine's practical peak);
  FLH steps            20 births without pruning, with FLH2, with FLH2 + a loss batch, and the
                       snapshot pool under the diverse cap of 8 (stage 5), each against one prompt;
  loss pass            K prompts' losses three ways: the reference's loop padded to 128 tokens, a
                       loop of forwards, one batched pass (stage 3), and batched on a loss batch.
bf16 rows are timed only where the device multiplies bf16 natively (AVX512-BF16/AMX CPUs, recent
GPUs); elsewhere bf16 is emulated and slow, so they are skipped, and the table says so. The rows
with a loss batch (the settings a real run uses) are timed in the fastest precision there is.
Run `--test` for the checks (the alternation; every row on a tiny model, where peft is installed).
"""

import contextlib
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import assets
import common
from stage2_stream import TextStream, batch_rows
from stage3_backbone import forward_with_prompt, forward_with_prompts, load_backbone, text_budget
from stage5_train import FLHLearner, FLHSettings, to_device, train_step


def timed(fn, batches, device, rounds=1):
    """Seconds per call of fn(batch): the median over `rounds` passes of the mean over the batches,
    after one untimed warm-up call."""
    return timed_side_by_side([fn], batches, device, rounds)[0]


def timed_side_by_side(fns, batches, device, rounds=3):
    """timed() for several functions whose passes alternate (A B A B ...), so that a slow spell of
    the machine falls on all of them alike: one median per function."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn(batches[0])
    sync()
    passes = [[] for _ in fns]
    for r in range(rounds):
        for i in range(len(fns)) if r % 2 == 0 else reversed(range(len(fns))):
            t0 = time.perf_counter()
            for b in batches:
                fns[i](b)
            sync()
            passes[i].append((time.perf_counter() - t0) / len(batches))
    return [statistics.median(p) for p in passes]


@contextlib.contextmanager
def precision(model, name):
    """Run the block with the backbone in `name` precision ("fp32" or "bf16"), then restore it."""
    before, model.precision = model.precision, name
    try:
        yield
    finally:
        model.precision = before


def grown_flh(model, prompt_length, births, **kw):
    """An FLH learner right after `births` births (pruning by birth index or by the cap needs no
    training in between to reach the pool size a real run has)."""
    learner = FLHLearner(model, prompt_length, 1e-2, FLHSettings(birth_interval=10**9, **kw))
    for _ in range(births):
        learner.birth()
    return learner


SNAPSHOT_WEIGHTS = {
    "live": "weight on the live prompt",  # within a regime: the others at the floor share / K
    "even": "weight spread evenly",  # right after a shift: every expert predicts every example
}


def snapshot_step(model, P, K, loss_batch, weight, share=0.01, epsilon=0.05):
    """The step of FLH that remembers (snapshot experts, diverse cap K, Fixed Share floor, every
    example predicted with epsilon 0.05) on a pool of K experts whose weights are reset before
    every step to `weight`: 'live' (all but the floor on the live prompt) or 'even' (uniform)."""
    learner = grown_flh(
        model,
        P,
        K,
        train_mode="snapshot",
        prune="diverse",
        max_prompts=max(K, 2),
        loss_batch=loss_batch,
        share=share,
        alpha=8.0,
        mixture_epsilon=epsilon,
    )
    w = torch.full((K,), 1 / K, dtype=torch.float64)
    if weight == "live":
        w = share / K + (1 - share) * torch.nn.functional.one_hot(torch.tensor(K - 1), K).double()

    def step(batch):
        learner.pool.log_w = w.log()
        return learner.step(batch)

    return step


def single_step(model, prompt_length, lr=1e-2):
    """Our single-prompt step on a fresh prompt: (a step function, the prompt)."""
    prompt = torch.nn.Parameter(torch.randn(prompt_length, model.embed_dim, device=model.device) * 0.02)
    optimizer = torch.optim.AdamW([prompt], lr=lr)
    return (lambda batch: train_step(model, prompt, optimizer, batch)), prompt


def peft_single_step(model, prompt_length, lr=1e-2):
    """HF PEFT prompt tuning on the same frozen encoder, read out like ours: a step function."""
    try:
        from peft import PromptTuningConfig, TaskType, get_peft_model
    except ImportError:
        raise common.UserError("the benchmark compares with HF PEFT: pip install peft") from None
    cfg = PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=prompt_length)
    peft_model = get_peft_model(copy.deepcopy(model.encoder), cfg)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)

    def step(batch):
        with model.autocast():  # PEFT puts the virtual tokens before [CLS]; we read the text only
            h = peft_model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        u = (h[:, prompt_length:].float() * m).sum(1) / m.sum(1)
        loss = F.cross_entropy(model.head(model.temperature * F.normalize(u, dim=-1)), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def matmul_peak(device, dtype, n=2048, reps=5):
    """FLOP/s of an n x n matrix product: the machine's practical peak for this dtype."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / timed(lambda _: a @ b, [None] * reps, device)


class Rows(list):
    """The table's rows for one backbone on one device: add() keeps each time under its key, so that
    a later row can be a ratio to an earlier one (`versus`)."""

    def __init__(self, backbone, device):
        super().__init__()
        self.backbone, self.device, self.seconds = backbone, device, {}

    def add(self, key, what, seconds, versus=None, **extra):
        self.seconds[key] = seconds
        ratio = seconds / self.seconds[versus] if versus else None
        self.append(
            {
                "backbone": self.backbone,
                "device": self.device.type,
                "what": what,
                "seconds": seconds,
                "key": key,
                "ratio": ratio,
                "versus": versus,
                **extra,
            }
        )


def bench_backbone(name, device, quick, loss_batch, P=10, B=16, K=20, bf16=None):
    """The table's rows for one backbone on one device: dicts with what, seconds and a ratio to `versus`."""
    model, tok = load_backbone(name, device=device)
    batches = text_batches(model, tok, B, 3 if quick else 10)
    bf16 = common.fast_bf16(device) if bf16 is None else bf16
    rows = Rows(name, device)
    for prec in ("fp32", "bf16") if bf16 else ("fp32",):
        with precision(model, prec):
            single_rows(rows, model, batches, P, B, prec)
            if quick and name != "minilm":
                continue  # the FLH rows on a 110M model take minutes; the full benchmark has them
            flh_rows(rows, model, batches, P, prec, prec == ("bf16" if bf16 else "fp32"), loss_batch)
            if prec == "fp32":
                loss_pass_rows(model, batches, device, P, K, loss_batch, bf16, rows.add)
    return list(rows)


def single_rows(rows, model, batches, P, B, prec):
    """Our single-prompt step against HF PEFT's, alternated; the forward pass's GFLOP/s against the
    matrix-product peak."""
    from torch.utils.flop_counter import FlopCounterMode

    device = model.device
    ours_step, prompt = single_step(model, P)
    ours, theirs = timed_side_by_side([ours_step, peft_single_step(model, P)], batches, device, rounds=5)
    rows.seconds[f"peft_{prec}"] = theirs
    rows.add(f"single_{prec}", f"single-prompt step, ours ({prec})", ours, f"peft_{prec}")
    rows.add(f"peft_{prec}", f"single-prompt step, HF PEFT prompt tuning ({prec})", theirs)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward_with_prompt(model, batches[0], prompt)
    flops = counter.get_total_flops() / batches[0]["input_ids"].shape[0] * B
    with torch.no_grad():
        seconds = timed(lambda b: forward_with_prompt(model, b, prompt), batches, device)
    peak = matmul_peak(device, torch.float32 if prec == "fp32" else torch.bfloat16)
    tokens = sum(b["attention_mask"].shape[1] + P for b in batches) / len(batches) * B
    rows.add(
        f"gflops_{prec}",
        f"forward pass, achieved GFLOP/s ({prec})",
        seconds,
        gflops=flops / seconds / 1e9,
        peak_gflops=peak / 1e9,
        tokens_per_s=tokens / rows.seconds[f"single_{prec}"],
    )
    rows[-1].update(ratio=flops / seconds / peak, versus="matmul peak")


def flh_rows(rows, model, batches, P, prec, fastest, loss_batch):
    """FLH steps after 20 births, unpruned and with FLH2, and where `fastest` (the precision a real
    run uses here) with the loss batch, and the snapshot pool of FLH that remembers."""
    setups = [
        ("flh_none", "FLH step, 20 births, no pruning", dict(prune="none")),
        ("flh_flh2", "FLH step, 20 births, FLH2", dict(prune="flh2")),
    ]
    if fastest:
        setups += [
            (
                "flh_fast",
                f"FLH step, 20 births, FLH2 + loss batch {loss_batch}",
                dict(prune="flh2", loss_batch=loss_batch),
            )
        ]
    for key, what, kw in setups:
        learner = grown_flh(model, P, 20, **kw)
        seconds = timed(learner.step, batches, model.device)
        rows.add(f"{key}_{prec}", f"{what} ({prec}, K={len(learner.pool)})", seconds, f"single_{prec}")
    if fastest:
        snapshot_rows(rows, model, batches, P, prec, loss_batch)


def snapshot_rows(rows, model, batches, P, prec, loss_batch, K=8):
    """The snapshot FLH steps timed beside a single-prompt step (passes alternating, so that a slow
    spell of the machine falls on all alike), and the part a single step does not have: the K - 1
    frozen experts' pass over the loss batch, alone. A step costs at least single + that pass."""
    frozen = torch.randn(K - 1, P, model.embed_dim, device=model.device) * 0.02

    @torch.inference_mode()
    def frozen_pass(batch):
        return forward_with_prompts(model, batch_rows(batch, 0, loss_batch), frozen)

    fns = [single_step(model, P)[0], frozen_pass]
    fns += [snapshot_step(model, P, K, loss_batch, weight) for weight in SNAPSHOT_WEIGHTS]
    single, alone, *steps = timed_side_by_side(fns, batches, model.device, rounds=5)
    rows.add(f"single_beside_{prec}", f"single-prompt step, timed beside the snapshot rows ({prec})", single)
    versus = f"single_beside_{prec}"
    what = f"the {K - 1} frozen experts' pass over the loss batch ({loss_batch}), alone ({prec})"
    rows.add(f"frozen_pass_{prec}", what, alone, versus)
    for weight, seconds in zip(SNAPSHOT_WEIGHTS, steps):
        rows.add(
            f"flh_snapshot_{weight}_{prec}",
            f"snapshot FLH step, every example predicted, cap {K} + loss batch {loss_batch}, "
            f"{SNAPSHOT_WEIGHTS[weight]} ({prec})",
            seconds,
            versus,
        )


def loss_pass_rows(model, batches, device, P, K, loss_batch, bf16, add):
    """Rows (through `add`) for the per-prompt loss pass over K prompts, three ways (and batched
    bf16 on a loss batch)."""
    prompts = torch.randn(K, P, model.embed_dim, device=device) * 0.02
    with torch.no_grad():
        pad = min(128, text_budget(model, P))  # the reference pads every text to 128 tokens
        padded = [
            {k: F.pad(b[k], (0, pad - b[k].shape[1])) for k in ("input_ids", "attention_mask")}
            for b in batches
        ]
        loop = lambda b: [forward_with_prompt(model, b, p) for p in prompts]  # noqa: E731
        add(
            "pass_reference",
            f"loss pass, {K} prompts: loop, padded to 128 (reference)",
            timed(loop, padded, device),
        )
        add(
            "pass_loop",
            f"loss pass, {K} prompts: loop of forwards",
            timed(loop, batches, device),
            "pass_reference",
        )
        add(
            "pass_batched",
            f"loss pass, {K} prompts: one batched pass",
            timed(lambda b: forward_with_prompts(model, b, prompts), batches, device),
            "pass_reference",
        )
        sub = [{k: v[:loss_batch] for k, v in b.items() if torch.is_tensor(v)} for b in batches]
        fastest = "bf16" if bf16 else "fp32"
        with precision(model, fastest):
            add(
                "pass_fast",
                f"loss pass, {K} prompts: batched, {fastest}, loss batch {loss_batch}",
                timed(lambda b: forward_with_prompts(model, b, prompts), sub, device),
                "pass_reference",
            )


def bench(args):
    """The README's performance table, printed and written to <out>/<run-name>/bench.json."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    torch.manual_seed(args.seed)
    rows = [
        r
        for d in devices
        for name in common.progress(["minilm", "random:bert-base"], desc=f"bench {d.type}")
        for r in bench_backbone(name, d, args.quick, args.loss_batch)
    ]
    print(f"{'backbone':<17}{'what':<66}{'s/step':>8}{'ratio':>8}  versus")
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}"
        extra = f"  ({r['gflops']:.0f} of {r['peak_gflops']:.0f} GFLOP/s)" if "gflops" in r else ""
        print(f"{r['backbone']:<17}{r['what']:<66}{r['seconds']:8.3f}{ratio:>8}  {r['versus'] or ''}{extra}")
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": common.cpu_name(),
        "cpu_bf16": common.fast_bf16(torch.device("cpu")),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "quick": args.quick,
    }
    if not meta["cpu_bf16"]:
        print(
            "this CPU has no native bf16 (AVX512-BF16 or AMX): its bf16 rows were skipped (emulated "
            "bf16 is slow)"
        )
    out = common.run_dir(args.out, args.run_name)
    common.write_json(out / "bench.json", {"machine": meta, "rows": rows})
    print(f"-> {out / 'bench.json'}" + ("" if meta["gpu"] else "; no GPU here, so no GPU rows"))


# How an FLH step's cost grows: one setting varied at a time around the quick preset's (K=8 experts,
# batch 16, prompt 10), the loss batch fixed at 8.
SCALING = {
    "pool size K": ("K", (1, 2, 4, 8, 16)),
    "batch size": ("B", (8, 16, 32)),
    "prompt length": ("P", (5, 10, 20)),
}
BASE = dict(K=8, B=16, P=10)


def text_batches(model, tok, B, n):
    stream = TextStream(assets.load_text_data("rt"), tok, batch_size=B, flip_every_n=None, seed=0)
    return [to_device(stream.batch(s), model.device) for s in range(1, n + 1)]


def image_batches(B, n):
    import stage10_vision

    args = stage10_vision.build_parser().parse_args(["--batch-size", str(B)])
    stream = stage10_vision.build_stream(common.fill_from_preset(args, stage10_vision.PRESETS["quick"]))
    return [stream.batch(s) for s in range(1, n + 1)]


def scaling_rows(domain, model, make_batches, loss_batch, quick):
    """Seconds per step of one prompt and of snapshot FLH (weight on the live prompt, and spread
    evenly), side by side, for every setting of SCALING."""
    rows = []
    for axis, (key, values) in SCALING.items():
        for value in common.progress(values, desc=f"{domain}: {axis}"):
            c = {**BASE, key: value}
            batches = make_batches(c["B"], 2 if quick else 4)
            prompt = torch.nn.Parameter(torch.randn(c["P"], model.embed_dim, device=model.device) * 0.02)
            optimizer = torch.optim.AdamW([prompt], lr=1e-2)
            fns = [lambda b: train_step(model, prompt, optimizer, b)]
            fns += [snapshot_step(model, c["P"], c["K"], loss_batch, w) for w in SNAPSHOT_WEIGHTS]
            single, live, even = timed_side_by_side(fns, batches, model.device, rounds=3)
            rows.append(
                {
                    "domain": domain,
                    "axis": axis,
                    "value": value,
                    **c,
                    "single": single,
                    "flh_live": live,
                    "flh_even": even,
                    "precision": model.precision,
                }
            )
    return rows


def plot_scaling(rows, meta, loss_batch, path):
    """scaling.png: for text and images, seconds per step against K, batch and prompt length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), squeeze=False)
    for i, domain in enumerate(("text", "images")):
        for j, axis in enumerate(SCALING):
            ax, sel = axes[i][j], [r for r in rows if r["domain"] == domain and r["axis"] == axis]
            x = [r["value"] for r in sel]
            for key, label, style in (
                ("single", "one prompt", "k-o"),
                ("flh_live", "FLH, weight on the live prompt", "C0-s"),
                ("flh_even", "FLH, weight spread evenly", "C1-^"),
            ):
                ax.plot(x, [r[key] for r in sel], style, label=label)
            for r in sel:
                ax.annotate(
                    f"{r['flh_live'] / r['single']:.1f}x",
                    (r["value"], r["flh_live"]),
                    textcoords="offset points",
                    xytext=(4, -12),
                    fontsize=8,
                    color="C0",
                )
            ax.set(
                xlabel=axis,
                ylabel="seconds per step",
                title=f"{domain} ({sel[0]['precision']})",
                xticks=x,
                ylim=(0, None),
            )
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        f"What a snapshot FLH step costs (loss batch {loss_batch}, epsilon 0.05; others at "
        f"K={BASE['K']}, B={BASE['B']}, P={BASE['P']}); {meta['cpu']}, {meta['threads']} threads",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def scaling(args):
    """scaling.json and scaling.png: the FLH step's seconds against K, batch and prompt length,
    beside the single prompt's, for text (minilm, rt) and images (dinov2-small, Fashion-MNIST)."""
    import stage10_vision
    from stage3_backbone import choose_precision

    torch.manual_seed(args.seed)
    model, tok = load_backbone("minilm")
    choose_precision(model, text_batches(model, tok, 16, 1)[0], "auto")
    rows = scaling_rows(
        "text", model, lambda B, n: text_batches(model, tok, B, n), args.loss_batch, args.quick
    )
    preset = stage10_vision.PRESETS["quick"]
    vit = stage10_vision.load_vision_backbone(preset["backbone"], preset["image_size"])
    choose_precision(vit, image_batches(16, 1)[0], "auto")
    rows += scaling_rows("images", vit, image_batches, args.loss_batch, args.quick)
    out = common.run_dir(args.out, args.run_name)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": common.cpu_name()}
    common.write_json(out / "scaling.json", {"machine": meta, "loss_batch": args.loss_batch, "rows": rows})
    plot_scaling(rows, meta, args.loss_batch, out / "scaling.png")
    print(f"-> {out / 'scaling.json'}, {out / 'scaling.png'}")


def run_tests():
    t0 = time.time()
    calls = []
    assert timed_side_by_side(
        [lambda b: calls.append("a"), lambda b: calls.append("b")], [0], torch.device("cpu"), 3
    ) and calls == ["a", "b", "a", "b", "b", "a", "a", "b"], calls  # warm-ups, then alternating passes
    print("  ok: timed_side_by_side warms each function up once, then alternates A B, B A, A B")
    try:
        import peft  # noqa: F401  (the comparison's library; not a dependency)
    except ImportError:
        print("  skipped: the table's rows (needs peft, installed only for benchmarking)")
    else:
        for bf16 in (True, False):  # with native bf16, and as on a CPU without it
            rows = bench_backbone(
                "random:tiny-bert", torch.device("cpu"), quick=False, loss_batch=4, B=8, K=4, bf16=bf16
            )
            keys = {r["key"] for r in rows}
            precs = ("fp32", "bf16") if bf16 else ("fp32",)
            want = {f"{k}_{p}" for k in ("single", "peft", "gflops", "flh_none", "flh_flh2") for p in precs}
            want |= {"pass_reference", "pass_loop", "pass_batched", "pass_fast"}
            want |= {f"{k}_{precs[-1]}" for k in ("flh_fast", "single_beside", "frozen_pass")}
            want |= {f"flh_snapshot_{w}_{precs[-1]}" for w in SNAPSHOT_WEIGHTS}
            assert keys == want, keys ^ want
            assert all(r["seconds"] > 0 and (r["ratio"] is None or r["ratio"] > 0) for r in rows)
        print(
            "  ok: every row on random:tiny-bert with a positive time and ratio; without native bf16 "
            f"only the {len(keys)} fp32 rows"
        )
    print(f"bench checks passed in {time.time() - t0:.1f}s")


def build_parser():
    p = common.Parser(description="Time our steps side by side with HF PEFT's (the README's 'Performance').")
    p.add_argument("--quick", action="store_true", help="fewer repeats, FLH rows on minilm only")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="instead of the table: how an FLH step's time grows with the pool size, the batch size and "
        "the prompt length, against one prompt's, for text and images (scaling.json, scaling.png)",
    )
    p.add_argument(
        "--loss-batch",
        type=common.positive_int,
        default=8,
        help="the loss batch of the fast FLH and snapshot rows (default: 8)",
    )
    common.add_common_args(p, run_name="bench")
    return p


def main(args):
    if args.test:
        return run_tests()
    scaling(args) if args.scaling else bench(args)


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
