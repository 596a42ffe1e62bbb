"""Stage 3: a frozen text encoder that reads a soft prompt, for one prompt or K at once.

Prompt tuning (Lester et al., 2021) keeps every weight of a pretrained model fixed and learns only
P vectors p_1..p_P in the model's input-embedding space. We place them right after [CLS]:

    inputs_embeds = [ E[CLS], p_1, ..., p_P, E[w_1], ..., E[w_L-1] ],   mask = [1, 1...1, m_1..m_L-1]

so BERT's pooler still reads [CLS] (the plan's public reference read the first *prompt* token
instead). BERT then adds its position embeddings, so P + L must fit its position table.

Read-out. A frozen, seeded random head maps a sentence vector h to C logits; it is the same for
every method, so nothing but the prompts can adapt to a label flip. Two ways to get h:
  cls   h = pooler(state of [CLS])            BERT's pretrained way (default for BERT models)
  mean  h = tau * u / |u|,  u = mean of the text tokens' last states (prompt excluded)
        a cosine classifier, the way sentence-transformers models such as MiniLM were trained
        (default for `minilm`: there, with prompt 10, batch 16 and lr 1e-2, it reached about 0.70
        prequential accuracy over steps 200-300 where the [CLS] read-out reached 0.60).

K prompts at once. FLH needs every expert's loss on every batch. Instead of K forward passes we
stack the K prompted copies of the batch into one [K*B, 1+P+L-1, D] input (chunked to bound
memory) and get logits [K, B, C] from one call. The word embeddings are looked up once.

A backbone wrapper offers three methods, and stages 4-9 use nothing else: `embed(batch)` (the
unprompted input), `read(emb, mask, prompts)` (logits with one prompt per row) and `query(batch)`
(the frozen sentence embedding, for mini-L2P). Stage 10's vision model offers the same three, so the pool,
the learners and the metrics run on images unchanged.

Run `python stage3_backbone.py` to load a backbone and time a forward, `--test` for the checks
(shapes; gradients reach the prompt only; batched == looped; too-long inputs fail clearly).
"""

import functools
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import assets
import common
from stage2_stream import StreamSettings, load_tokenizer


class FrozenBackbone(nn.Module):
    """What every frozen backbone wrapper shares (stage 10's ViT too): an `encoder` with a config, a
    `head`, and `precision` ("fp32" or "bf16", the encoder then runs under autocast)."""

    @property
    def device(self):
        """Where the frozen weights (and so the prompts) live."""
        return self.head.weight.device

    @property
    def embed_dim(self):
        return self.encoder.config.hidden_size

    def autocast(self):
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.precision == "bf16")


class FrozenTextClassifier(FrozenBackbone):
    """A frozen encoder + a frozen random linear head, reading [CLS] or the mean of the text."""

    def __init__(self, encoder, num_labels=2, pooling="mean", head_seed=0, temperature=20.0):
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise common.UserError(f"unknown pooling {pooling!r}; choose cls or mean")
        self.encoder, self.pooling, self.temperature = encoder, pooling, temperature
        self.precision = "fp32"  # or "bf16": the encoder then runs under autocast (head, prompts stay fp32)
        hidden = encoder.config.hidden_size
        self.head = nn.Linear(hidden, num_labels)
        g = torch.Generator().manual_seed(head_seed)  # the same head for every method and seed
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_labels, hidden, generator=g) * 0.02)
            self.head.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def encode(self, **inputs):
        """The encoder's output (last_hidden_state, pooler_output) in fp32, under the chosen precision."""
        with self.autocast():
            h = self.encoder(**inputs)
        return h.last_hidden_state.float(), None if h.pooler_output is None else h.pooler_output.float()

    # The three methods every backbone wrapper offers (stage 10's vision model too); the functions
    # below and stages 4-9 use nothing else of it.
    def embed(self, batch):
        """A batch's unprompted input: (word embeddings [B, L, D] of [CLS] w_1 ..., mask [B, L])."""
        return self.encoder.get_input_embeddings()(batch["input_ids"]), batch["attention_mask"]

    def read(self, emb, mask, prompts):
        """Logits [N, C] of N rows, row n read with its own prompt [N, P, D]: the core of every forward."""
        N, P, D = prompts.shape
        if P + emb.shape[1] > self.max_positions:
            raise common.UserError(
                f"prompt ({P}) + text ({emb.shape[1]}) tokens exceed the backbone's position "
                f"table ({self.max_positions}); lower --max-length or --prompt-length"
            )
        if N > 1 and self.device.type == "cpu":  # rows of like length together, padding trimmed
            order, chunks = length_chunks(mask)
            out = torch.cat([self.read_rows(emb[i, :L], mask[i, :L], prompts[i]) for i, L in chunks])
            return out[order.argsort()]
        return self.read_rows(emb, mask, prompts)

    def read_rows(self, emb, mask, prompts):
        """`read` for rows as they come: one encoder call over [N, 1+P+L-1] tokens."""
        N, P, D = prompts.shape
        ones = mask.new_ones(N, P)
        x = torch.cat([emb[:, :1], prompts.to(emb.dtype), emb[:, 1:]], 1)  # [N, 1+P+L-1, D]
        hidden, pooler = self.encode(
            inputs_embeds=x, attention_mask=torch.cat([mask[:, :1], ones, mask[:, 1:]], 1)
        )
        if self.pooling == "cls":
            pooled = pooler if pooler is not None else hidden[:, 0]
        else:
            text = (
                torch.cat([mask[:, :1], ones * 0, mask[:, 1:]], 1).unsqueeze(-1).to(hidden.dtype)
            )  # no prompt
            u = (hidden * text).sum(1) / text.sum(1)
            pooled = self.temperature * F.normalize(u, dim=-1)
        return self.head(pooled)

    @torch.no_grad()
    def query(self, batch):
        """The backbone's own sentence embedding of the plain input, no prompt: [B, D] (mini-L2P's
        query). Mean-pooling models (MiniLM was trained so) give the masked mean of the token
        states, the others the [CLS] state."""
        hidden, _ = self.encode(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if self.pooling != "mean":
            return hidden[:, 0]
        m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1)

    @property
    def max_positions(self):
        return self.encoder.config.max_position_embeddings


def length_chunks(mask, max_chunks=4, min_rows=4):
    """Rows sorted by length (longest first) and cut into at most `max_chunks` chunks of at least
    `min_rows` rows: (order [N], [(row indices, L)]) where L is the chunk's longest row. A batch is
    padded to its longest sentence, and on rt 43% of its tokens are padding; a chunk trimmed to its
    own longest row computes the same logits (padding is masked out of attention and of the
    read-out) on fewer tokens. Only trailing all-padding columns go, so positions never move."""
    N = mask.shape[0]
    lengths = mask.shape[1] - (mask.flip(1) == 0).cumprod(1).sum(1)  # up to the last real token
    order = lengths.sort(descending=True, stable=True).indices
    n = min(max_chunks, max(1, N // min_rows))
    return order, [(i, int(lengths[i[0]])) for i in order.tensor_split(n)]


def use_fast_attention(encoder, device):
    """On a CPU, the plain (eager) attention: torch's fused CPU attention is as fast forward but its
    backward under bf16 autocast took 0.13 s of a 0.29 s MiniLM training step (batch 16, torch 2.14,
    measured); eager attention made the step 0.17 s. On a GPU the fused kernels stay."""
    if torch.device(device).type == "cpu" and hasattr(encoder, "set_attn_implementation"):
        encoder.set_attn_implementation("eager")
    return encoder


def load_backbone(name="minilm", num_labels=2, pooling=None, head_seed=0, device="cpu"):
    """Backbone name -> (FrozenTextClassifier on `device`, tokenizer). pooling None = the default."""
    from transformers import AutoModel, PretrainedConfig

    source, _, default_pooling = assets.resolve_text_backbone(name)
    if isinstance(source, PretrainedConfig):
        with torch.random.fork_rng():  # random weights, but the same ones every time
            torch.manual_seed(head_seed)
            encoder = AutoModel.from_config(source)
    else:
        encoder = assets.from_pretrained(AutoModel, source, "backbone")
    model = FrozenTextClassifier(
        use_fast_attention(encoder, device), num_labels, pooling or default_pooling, head_seed
    )
    return model.to(device), load_tokenizer(name)


def text_budget(model, prompt_length):
    """How many text tokens ([CLS] and [SEP] included) fit beside a prompt of this length."""
    budget = model.max_positions - prompt_length
    if budget < 3:
        raise common.UserError(
            f"a prompt of {prompt_length} tokens leaves no room for text in the "
            f"backbone's {model.max_positions} positions; lower --prompt-length"
        )
    return budget


def forward_with_prompts(model, batch, prompts, max_rows=512):
    """Logits [K, B, C] of the batch under each of K prompts [K, P, D], in chunks of <= max_rows rows."""
    emb, mask = model.embed(batch)  # [B, L, D], looked up once
    K, B = prompts.shape[0], emb.shape[0]
    per_chunk = max(1, max_rows // B)
    out = []
    for k0 in range(0, K, per_chunk):
        p = prompts[k0 : k0 + per_chunk]
        k = p.shape[0]
        rows = model.read(emb.repeat(k, 1, 1), mask.repeat(k, 1), p.repeat_interleave(B, 0))
        out.append(rows.view(k, B, -1))
    return torch.cat(out, 0)


def forward_with_example_prompts(model, batch, prompts):
    """Logits [B, C] when example b gets its own prompt prompts[b] ([B, P, D]); for mini-L2P."""
    emb, mask = model.embed(batch)
    return model.read(emb, mask, prompts)


def forward_with_prompt(model, batch, prompt):
    """Logits [B, C] of the batch under one prompt [P, D]."""
    return forward_with_prompts(model, batch, prompt[None])[0]


def choose_precision(model, batch, name, prompt_length=10):
    """Set and return the backbone's precision: `name`, or for 'auto' the faster of fp32 and bf16
    for one training step of a prompt on `batch` here (common.resolve_precision measures and keeps
    the answer). Text and vision backbones alike: it uses only embed() and read()."""

    def step_seconds(precision):
        before, model.precision = model.precision, precision
        prompt = nn.Parameter(torch.zeros(prompt_length, model.embed_dim, device=model.device))
        emb, mask = model.embed(batch)
        seconds = common.warm_seconds(
            lambda: model.read(emb, mask, prompt.expand(len(emb), -1, -1)).logsumexp(-1).sum().backward()
        )
        model.precision = before
        return seconds

    config = model.encoder.config
    what = f"{type(model.encoder).__name__} {config.hidden_size}x{config.num_hidden_layers}"
    model.precision = common.resolve_precision(name, model.device, what, step_seconds)
    return model.precision


def count_params(module):
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in module.parameters()) - trainable


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _tiny():
    """For the checks: random tiny-bert with the [CLS] read-out, a padded batch of two and a prompt."""
    torch.manual_seed(0)
    model, tok = load_backbone("random:tiny-bert", pooling="cls")
    enc = tok(
        ["a fine film .", "dull and far too long , with nothing to say"], padding=True, return_tensors="pt"
    )
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return model, tok, batch, nn.Parameter(torch.randn(5, model.embed_dim) * 0.02)


def test_prompt_gradient():
    """Logits [B, C]; the gradient reaches the prompt and no backbone parameter."""
    model, _, batch, prompt = _tiny()
    logits = forward_with_prompt(model, batch, prompt)
    assert logits.shape == (2, 2), logits.shape
    logits.logsumexp(-1).sum().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0, "no gradient reached the prompt"
    assert all(p.grad is None and not p.requires_grad for p in model.parameters()), (
        "a backbone weight has a gradient"
    )
    print("  ok: logits [B, C]; the gradient reaches the prompt and no backbone parameter")


def test_cls_first():
    """[CLS] stays first: the prompt sits at positions 1..P, and the pooler reads position 0."""
    model, tok, batch, prompt = _tiny()
    seen = {}
    hook = model.encoder.embeddings.register_forward_hook(
        lambda m, a, kw, out: seen.update(x=kw["inputs_embeds"]), with_kwargs=True
    )
    forward_with_prompt(model, batch, prompt.detach())
    hook.remove()
    cls = model.encoder.get_input_embeddings().weight[tok.cls_token_id]
    assert torch.equal(seen["x"][0, 0], cls) and torch.equal(seen["x"][0, 1:6], prompt.detach())
    print("  ok: the input is [CLS], prompt, text")


def test_batched_prompts():
    """K prompts in one pass (in chunks) equal K passes; the mean read-out ignores padding."""
    model, tok, batch, prompt = _tiny()
    D = model.embed_dim
    for pooling in ("cls", "mean"):
        model.pooling = pooling
        prompts = torch.randn(7, 5, D) * 0.5
        batched = forward_with_prompts(model, batch, prompts, max_rows=6)  # chunks of 3 prompts
        looped = torch.stack([forward_with_prompt(model, batch, p) for p in prompts])
        diff = (batched - looped).abs().max().item()
        assert batched.shape == (7, 2, 2) and diff < 1e-5, (pooling, diff)
        print(
            f"  ok: batched K=7 (in chunks) equals looped, pooling={pooling}, max |diff| = {diff:.1e}; "
            "per-example prompts too"
        )
        per_example = forward_with_example_prompts(model, batch, prompts[[3, 5]])
        assert torch.allclose(per_example, torch.stack([looped[3, 0], looped[5, 1]]), atol=1e-5)
    # mean read-out ignores padding: a padded row gives the same logits as the row alone
    alone = tok(["a fine film ."], return_tensors="pt")
    a = forward_with_prompt(model, alone, prompt.detach())
    b = forward_with_prompt(model, batch, prompt.detach())[:1]
    assert (a - b).abs().max() < 1e-5, "padding changed the mean read-out"


def test_too_long():
    """Too long for the position table (tiny-bert has 128): a clear error, never an index error."""
    model, tok, _, prompt = _tiny()
    long_ids = torch.full((1, 125), 1000)
    long_ids[0, 0] = tok.cls_token_id
    try:
        forward_with_prompt(
            model, {"input_ids": long_ids, "attention_mask": torch.ones_like(long_ids)}, prompt
        )
        raise AssertionError("a too-long input was accepted")
    except common.UserError as e:
        assert "position table" in str(e)
    assert text_budget(model, 5) == 123
    print("  ok: prompt + text beyond the position table fails with a clear message")


@functools.cache
def _minilm():
    return load_backbone("minilm")


def test_minilm_frozen():
    """The real embedded backbone: frozen, eval mode, and the default read-out is the mean."""
    mini, _ = _minilm()
    tr, fr = count_params(mini)
    assert mini.pooling == "mean" and tr == 0 and fr > 22_000_000 and not mini.training
    print(f"  ok: minilm loads frozen ({fr:,} parameters), read-out 'mean'")


def test_bf16():
    """bf16 autocast: the encoder really runs in bf16 (logits change) and stays close to fp32."""
    mini, tok = _minilm()
    enc = tok(["a fine film .", "dull and far too long"], padding=True, return_tensors="pt")
    p = torch.randn(5, mini.embed_dim) * 0.02
    full = forward_with_prompt(mini, enc, p)
    mini.precision = "bf16"
    half = forward_with_prompt(mini, enc, p)
    mini.precision = "fp32"
    diff = (full - half).abs().max().item()
    assert half.dtype == torch.float32 and 0 < diff < 0.05 * full.abs().max().item(), diff
    print(
        f"  ok: bf16 autocast changes the logits by at most {diff:.1e} (of up to "
        f"{full.abs().max():.2f}), output fp32"
    )


def test_length_chunks():
    """Rows of like length in chunks, each trimmed to its longest row: the same logits and gradients."""
    mini, tok = _minilm()
    texts = [
        "fine .",
        "a long , winding and in the end rather pointless story about nothing",
        "ok",
        "good fun",
    ]
    enc = tok(texts * 3, padding=True, return_tensors="pt")
    emb, mask = mini.embed(enc)
    order, chunks = length_chunks(mask, max_chunks=4, min_rows=2)
    assert [L for _, L in chunks] == sorted((L for _, L in chunks), reverse=True) and chunks[-1][
        1
    ] < mask.shape[1]
    p = nn.Parameter(torch.randn(5, mini.embed_dim) * 0.02)
    rows = p.expand(len(emb), -1, -1)
    whole = mini.read_rows(emb, mask, rows)
    g_whole = torch.autograd.grad(whole.logsumexp(-1).sum(), p)[0]
    chunked = mini.read(emb, mask, rows)
    g_chunked = torch.autograd.grad(chunked.logsumexp(-1).sum(), p)[0]
    assert (whole - chunked).abs().max() < 1e-5 and (g_whole - g_chunked).abs().max() < 1e-5
    print(
        f"  ok: rows in {len(chunks)} length chunks (trimmed to {[L for _, L in chunks]} of "
        f"{mask.shape[1]} tokens) give the unchunked logits and gradients"
    )


def test_precision_auto():
    """--precision auto measures (here: a stand-in measurement), keeps the answer, and says it."""
    saved_cache = common.CACHE
    with tempfile.TemporaryDirectory() as tmp:
        common.CACHE = Path(tmp)
        try:
            calls = []
            slow_bf16 = {"fp32": 0.2, "bf16": 0.4}
            measure = lambda p: calls.append(p) or slow_bf16[p]  # noqa: E731
            bf16_claimed = common.fast_bf16(torch.device("cpu"))
            got = common.resolve_precision("auto", torch.device("cpu"), "test model", measure)
            assert got == "fp32" and calls == (["fp32", "bf16"] * 3 if bf16_claimed else [])
            again = common.resolve_precision("auto", torch.device("cpu"), "test model", lambda p: 1 / 0)
            assert again == "fp32", "the kept answer was not used"
            if bf16_claimed:
                fast = common.resolve_precision(
                    "auto", torch.device("cpu"), "other", {"fp32": 2, "bf16": 1}.get
                )
                assert fast == "bf16"
            assert common.resolve_precision("bf16", torch.device("cpu"), "x", lambda p: 1 / 0) == "bf16"
        finally:
            common.CACHE = saved_cache
    print(
        "  ok: --precision auto takes the faster of fp32 and bf16 as measured (bf16 2x slower: fp32), "
        "measures once per CPU, torch and model"
    )


def run_tests():
    common.run_checks(sys.modules[__name__])


@dataclass(frozen=True)
class ModelSettings(common.Settings):
    """The frozen backbone and the prompt's length, each declared once."""

    backbone: str = common.setting(
        "minilm", help="minilm (embedded) | random:tiny-bert | random:bert-base | hub id | folder"
    )
    pooling: str = common.setting(
        None,
        choices=["cls", "mean"],
        help="read-out: [CLS] via the pooler, or mean of text tokens (default: mean for minilm, else cls)",
    )
    prompt_length: int = common.setting(10, common.positive_int, "soft tokens per prompt")
    precision: str = common.setting(
        "auto",
        choices=["auto", "fp32", "bf16"],
        help="encoder arithmetic: bf16 autocast or fp32; auto = the faster of the two, measured once on "
        "this machine where bf16 is native, else fp32",
    )


def build_parser():
    p = common.Parser(description="Stage 3: load a frozen backbone and time a prompted forward pass.")
    common.add_settings(p, ModelSettings)
    p.add_argument(
        "--experts", type=common.positive_int, default=8, help="K prompts in the batched pass (default: 8)"
    )
    common.add_settings(p, StreamSettings, only=("batch_size",))
    common.add_common_args(p, run_name="backbone")
    return p


def main(args):
    if args.test:
        return run_tests()
    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    model, tok = load_backbone(args.backbone, pooling=args.pooling, device=device)
    tr, fr = count_params(model)
    print(
        f"{args.backbone}: {fr:,} frozen parameters, {tr} trainable; read-out {model.pooling}; "
        f"prompt {args.prompt_length} x {model.embed_dim} = {args.prompt_length * model.embed_dim:,} "
        "trainable"
    )
    texts = ["a gripping, beautifully acted film ."] * args.batch_size
    enc = {k: v.to(device) for k, v in tok(texts, return_tensors="pt").items()}
    print(f"  precision: {choose_precision(model, enc, args.precision, args.prompt_length)}")
    prompts = torch.randn(args.experts, args.prompt_length, model.embed_dim, device=device) * 0.02
    with torch.no_grad():
        for name, fn in [
            ("one prompt", lambda: forward_with_prompt(model, enc, prompts[0])),
            (f"{args.experts} prompts batched", lambda: forward_with_prompts(model, enc, prompts)),
        ]:
            fn()
            t = time.perf_counter()
            out = fn()
            print(f"  {name}: logits {tuple(out.shape)} in {time.perf_counter() - t:.3f}s")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
