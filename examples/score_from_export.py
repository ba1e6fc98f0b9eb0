"""Recommend from an export alone: what a service needs is onnxruntime, faiss, numpy and
pyarrow; neither PyTorch nor pickle nor any code of this repository.

    python examples/score_from_export.py exports/odmt-s1 histories.json [--k 10] [--keep-history]

histories.json: {"user key": ["item key", ... oldest first], ...} in the source's keys.
Prints {"user key": [["item key", score], ... best first], ...} as JSON. Item keys the export
does not know are skipped (and counted on stderr); a user with none left gets an empty list.
Before scoring it checks that the three files belong together: items.parquet records the
SHA-256 of index.faiss and of the model that user_encoder.onnx was exported from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import onnxruntime
import pyarrow.parquet as pq


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Export:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        items = pq.read_table(folder / "items.parquet", columns=["item_idx", "item_key", "vector"])
        schema = pq.read_schema(folder / "items.parquet")
        metadata = {k.decode(): json.loads(v) for k, v in schema.metadata.items() if k != b"ARROW:schema"}
        dim = schema.field("vector").type.list_size
        self.max_len = int(metadata["max_len"])
        self.keys = ["", *items.column("item_key").to_pylist()]  # position = item_idx; 0 = padding
        self.index_of = {key: idx for idx, key in enumerate(self.keys) if idx}
        self.index = faiss.read_index(str(folder / "index.faiss"))  # row r = item_idx r + 1
        try:
            self.encoder = onnxruntime.InferenceSession(folder / "user_encoder.onnx", providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own Exception subclasses (InvalidProtobuf, Fail, ...)
            raise SystemExit(f"{folder / 'user_encoder.onnx'}: not a loadable ONNX model ({err}): export the run again") from None
        problems = []
        if (self.index.ntotal, self.index.d) != (items.num_rows, dim):
            problems.append(f"index.faiss is {self.index.ntotal} x {self.index.d}, items.parquet {items.num_rows} x {dim}")
        if not np.isfinite(items.column("vector").combine_chunks().flatten().to_numpy()).all():
            problems.append("items.parquet holds NaN or infinite vector values")
        if sha256(folder / "index.faiss") != metadata["index_sha256"]:
            problems.append("index.faiss is not the one items.parquet was written with")
        if self.encoder.get_modelmeta().custom_metadata_map.get("model_sha256") != metadata["model_sha256"]:
            problems.append("user_encoder.onnx was exported from another model than items.parquet")
        if problems:
            raise SystemExit(f"{folder}: {'; '.join(problems)}: export the run again")

    def recommend(self, histories: dict[str, list[str]], k: int, exclude_history: bool = True) -> tuple[dict, int]:
        """Top k (item key, score) per user, and the number of unknown item keys skipped."""
        known = {user: [self.index_of[i] for i in items if i in self.index_of] for user, items in histories.items()}
        skipped = sum(len(items) for items in histories.values()) - sum(len(items) for items in known.values())
        users = [user for user, items in known.items() if items]
        inputs = np.zeros((len(users), self.max_len), dtype=np.int64)  # left-padded, last max_len items
        for row, user in enumerate(users):
            tail = known[user][-self.max_len :]
            inputs[row, self.max_len - len(tail) :] = tail
        out = {user: [] for user in histories}
        if not users:
            return out, skipped
        (queries,) = self.encoder.run(["user_vectors"], {"sequences": inputs})
        longest = max(len(known[u]) for u in users) if exclude_history else 0
        scores, rows = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k + longest, self.index.ntotal))
        for user, user_scores, user_rows in zip(users, scores, rows):
            seen = set(known[user]) if exclude_history else set()
            best = [(int(r) + 1, float(s)) for r, s in zip(user_rows, user_scores) if r >= 0 and int(r) + 1 not in seen]
            out[user] = [(self.keys[item], score) for item, score in best[:k]]
        return out, skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an export folder, e.g. exports/odmt-s1")
    parser.add_argument("histories", help="JSON file: user key -> item keys, oldest first")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--keep-history", action="store_true", help="allow items already in the history")
    args = parser.parse_args()
    histories = json.loads(Path(args.histories).read_text())
    recommendations, skipped = Export(args.export).recommend(histories, args.k, not args.keep_history)
    print(f"{len(histories)} users, {skipped} unknown item keys skipped", file=sys.stderr)
    json.dump(recommendations, sys.stdout)


if __name__ == "__main__":
    main()
