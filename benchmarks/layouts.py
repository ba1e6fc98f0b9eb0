"""The single-file feature layout of checkouts before the feature store, read and compared.

    python benchmarks/layouts.py OLD.parquet STORE_DIR       # the same features, bit for bit?
    python benchmarks/layouts.py OLD.parquet STORE_DIR --convert   # write OLD.parquet as a store first

Before the store (up to eb01d8e), each feature stage wrote one Parquet file: one row per item,
`item_idx`, `tokens` (a fixed-size list of T x D float16), `mask` (T booleans), `present`, and the
provenance as metadata. Those outputs need no migration (DVC reruns the stages); this reads them
so that a store can be compared with the file the earlier code made from the same input
(benchmarks/features.py --baseline-worktree, and by hand on the embedded data), and converts one
into a store (`--convert`: keyed by its values, not by the encoder input).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.features.store import TokenFeatures, load_token_features, write_token_features  # noqa: E402
from pipeline.io import read_metadata  # noqa: E402

BLOCK = 1024  # items read at a time


def single_file_blocks(path: str | Path) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(item_idx, tokens (n, T, D) float16, mask (n, T), present (n,)) of an old feature file, in file order."""
    meta = read_metadata(path)
    num_tokens, dim = int(meta["num_tokens"]), int(meta["dim"])
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BLOCK, columns=["item_idx", "tokens", "mask", "present"]):
        n = batch.num_rows
        yield (batch.column("item_idx").to_numpy(),
               batch.column("tokens").flatten().to_numpy().reshape(n, num_tokens, dim),
               batch.column("mask").flatten().to_numpy(zero_copy_only=False).reshape(n, num_tokens),
               batch.column("present").to_numpy(zero_copy_only=False))


def read_single_file(path: str | Path) -> TokenFeatures:
    """All of an old feature file, as the store's loader gives a store (row 0 = padding)."""
    meta = read_metadata(path)
    n, num_tokens, dim = pq.read_metadata(path).num_rows, int(meta["num_tokens"]), int(meta["dim"])
    tokens = np.zeros((n + 1, num_tokens, dim), dtype=np.float16)
    mask = np.zeros((n + 1, num_tokens), dtype=bool)
    mask[:, 0] = True
    present = np.zeros(n + 1, dtype=bool)
    for idx, block_tokens, block_mask, block_present in single_file_blocks(path):
        tokens[idx], mask[idx], present[idx] = block_tokens, block_mask, block_present
    return TokenFeatures(torch.from_numpy(tokens), torch.from_numpy(mask), torch.from_numpy(present), meta)


def convert(path: str | Path, folder: str | Path) -> None:
    """An old feature file (rows in item order) as a store, part by part."""
    meta = {k: v for k, v in read_metadata(path).items() if k not in ("counts", "device")}
    write_token_features(folder, ((tokens, mask, present) for _, tokens, mask, present in single_file_blocks(path)), meta)


def compare(old: TokenFeatures, new: TokenFeatures) -> dict:
    """Whether two loads hold the same features bit for bit, and the provenance both record."""
    same = {"tokens": torch.equal(old.tokens.view(torch.int16), new.tokens.view(torch.int16)),
            "mask": torch.equal(old.mask, new.mask), "present": torch.equal(old.present, new.present)}
    provenance = ("modality", "encoder", "weights", "num_tokens", "dim", "preprocessing", "pooled_only", "counts")
    differing = sorted(k for k in provenance if old.metadata.get(k) != new.metadata.get(k))
    return {"items": old.num_items, "bit_identical": all(same.values()), **same, "metadata_differing": differing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", type=Path, help="a feature file of the single-file layout")
    parser.add_argument("store", type=Path, help="a feature store folder")
    parser.add_argument("--convert", action="store_true", help="write OLD as a store at STORE first")
    args = parser.parse_args()
    if args.convert:
        convert(args.old, args.store)
    result = compare(read_single_file(args.old), load_token_features(args.store))
    print(json.dumps(result))
    sys.exit(0 if result["bit_identical"] else 1)


if __name__ == "__main__":
    main()
