"""What an online service needs from a trained run, and nothing it does not.

exports/{run}/
- items.parquet: one row per catalogue item: its source key, its fused vector and one vector
  per branch (float32), the model's provenance in the file metadata.
- index.faiss: the FAISS index over the fused item vectors, written by FAISS itself; row r is
  item_idx r + 1 (items.parquet is in that order). The recommend stage searches this very file.
- user_encoder.pt2: the user side as a `torch.export` program: (U, max_len) int64 left-padded
  item indices (0 = padding, else item_idx from items.parquet; max_len is in the metadata of
  items.parquet, any U) -> (U, B*d) user vectors, where the inner product with an item's
  fused vector is the model's fused score. It holds the item vector
  table and the branch sequence encoders; the IMT and the frozen features stay behind (the
  table already is their output), so it is small and needs neither this repository nor the
  feature files.

Why torch.export and not TorchScript: TorchScript is deprecated in PyTorch 2.x; torch.export
is its successor, records the graph with a dynamic user dimension, and its archive holds a
serialised graph (JSON) plus plain tensors as raw bytes. PyTorch still documents
`torch.export.load` as using pickle (the small example-input record, read weights-only first),
so load exports only from a store you trust, as with any model file.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import torch

from pipeline.config import to_dict
from pipeline.io import atomic_path, write_table
from pipeline.models.base import SequentialRecommender
from pipeline.models.odmt import UserEncoder
from pipeline.scoring import IndexConfig, build_index

ITEMS_FILE, INDEX_FILE, ENCODER_FILE = "items.parquet", "index.faiss", "user_encoder.pt2"


def user_encoder(model: SequentialRecommender, max_len: int) -> UserEncoder:
    """The model's user side over its item table, on the CPU, for export and the recommend stage."""
    return UserEncoder(model, max_len).cpu().eval()


def export_encoder(encoder: UserEncoder, path: Path) -> None:
    """Save ``encoder`` as a torch.export program with a dynamic number of users."""
    example = torch.zeros(2, encoder.max_len, dtype=torch.long)
    example[:, -1] = 1
    users = torch.export.Dim("users", min=1)
    with torch.no_grad():
        program = torch.export.export(encoder, (example,), dynamic_shapes={"sequences": {0: users}})
    for node in program.graph.nodes:  # traces name this checkout's absolute path: another clone would write other bytes
        node.meta.pop("stack_trace", None)
    # Through a file object: given a path, the archive's records are named after it (the random
    # temp name), and equal programs would not give equal files.
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.export.save(program, f)


def items_schema(branches: list[str], branch_dim: int) -> pa.Schema:
    """item_idx order (= index row + 1); `vector` is the fused vector (the branch vectors side
    by side: <user vector, vector> = the fused score), then one column per branch when there
    are several (<user vector slice * B, branch vector> = that branch's own score)."""
    fields = [
        pa.field("item_idx", pa.int32(), nullable=False),
        pa.field("item_key", pa.string(), nullable=False),
        pa.field("vector", pa.list_(pa.float32(), len(branches) * branch_dim), nullable=False),
    ]
    if len(branches) > 1:
        fields += [pa.field(f"vector_{name}", pa.list_(pa.float32(), branch_dim), nullable=False) for name in branches]
    return pa.schema(fields)


def export_run(
    encoder: UserEncoder, branches: list[str], item_keys: list[str], index_config: IndexConfig, out_dir: Path, provenance: dict
) -> dict:
    """Write items.parquet, index.faiss and user_encoder.pt2 into ``out_dir``; return the file
    sizes in bytes. ``item_keys[i]`` is the key of item_idx i + 1."""
    vectors = encoder.item_table[1:].numpy()  # (N, B*d), item_idx 1..N
    if len(item_keys) != len(vectors):
        raise ValueError(f"the model has {len(vectors)} items, items.parquet {len(item_keys)}: rerun the train stage")
    d = encoder.branch_dim
    columns = {
        "item_idx": pa.array(np.arange(1, len(vectors) + 1, dtype=np.int32)),
        "item_key": pa.array(item_keys, pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
    }
    if len(branches) > 1:
        for b, name in enumerate(branches):
            part = np.ascontiguousarray(vectors[:, b * d : (b + 1) * d])
            columns[f"vector_{name}"] = pa.FixedSizeListArray.from_arrays(pa.array(part.ravel()), d)
    metadata = {
        **provenance,
        "branches": branches,
        "branch_dim": d,
        "max_len": encoder.max_len,
        "index": to_dict(index_config),
        "user_encoder": f"{ENCODER_FILE}: torch.export program, (U, {encoder.max_len}) int64 item_idx of the last "
        f"{encoder.max_len} history items, left-padded with 0 -> (U, {vectors.shape[1]}) float32 user vectors",
    }
    out_dir = Path(out_dir)
    write_table(pa.table(columns), out_dir / ITEMS_FILE, items_schema(branches, d), metadata)
    index = build_index(vectors, index_config)
    with atomic_path(out_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    export_encoder(encoder, out_dir / ENCODER_FILE)
    return {name: (out_dir / name).stat().st_size for name in (ITEMS_FILE, INDEX_FILE, ENCODER_FILE)}
