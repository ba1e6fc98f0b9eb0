"""What an online service needs from a trained run, and nothing it does not.

exports/{run}/
- items.parquet: one row per catalogue item: its source key, its fused vector and one vector
  per branch (float32); in the file metadata the model's provenance, the SHA-256 of the
  model.pt it was exported from (`model_sha256`) and of the two files beside it.
- index.faiss: the FAISS index over the fused item vectors, written by FAISS itself; row r is
  item_idx r + 1 (items.parquet is in that order). The recommend stage searches this very file.
- user_encoder.onnx: the user side as an ONNX model: input `sequences`, (U, max_len) int64
  left-padded item indices (0 = padding, else item_idx from items.parquet; max_len is in the
  metadata of both files, any U) -> output `user_vectors`, (U, B*d) float32, whose inner
  product with an item's fused vector is the model's fused score. It holds the item vector
  table and the branch sequence encoders; the IMT and the frozen features stay behind (the
  table already is their output), so it is small and needs neither this repository nor the
  feature files. Its metadata holds `model_sha256` too.

Why ONNX: the file is a protobuf graph plus raw tensors, with nothing to unpickle, so loading a
pulled export cannot run code (torch.export archives still use pickle for a record); and
ONNX Runtime serves it from Python, C++, Java or Triton without PyTorch.

`open_index` is the recommend stage's way in: it checks the three files against each other
and against the model before searching (rows, dimension, fingerprints, finite vectors).
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import onnx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.config import to_dict
from pipeline.io import atomic_path, file_sha256, read_metadata, write_table
from pipeline.models.base import SequentialRecommender
from pipeline.models.odmt import UserEncoder
from pipeline.scoring import IndexConfig, build_index

ITEMS_FILE, INDEX_FILE, ENCODER_FILE = "items.parquet", "index.faiss", "user_encoder.onnx"
OPSET = 18  # ONNX Runtime 1.14+ runs it


class ExportMismatch(ValueError):
    """An export whose files do not belong together or to the model beside them."""


def user_encoder(model: SequentialRecommender, max_len: int) -> UserEncoder:
    """The model's user side over its item table, on the CPU, for export and the recommend stage."""
    return UserEncoder(model, max_len).cpu().eval()


def export_encoder(encoder: UserEncoder, path: Path, model_sha256: str) -> None:
    """Save ``encoder`` as an ONNX model with a dynamic number of users."""
    example = torch.zeros(2, encoder.max_len, dtype=torch.long)
    example[:, -1] = 1
    users = torch.export.Dim("users", min=1)
    with torch.no_grad():
        program = torch.onnx.export(
            encoder,
            (example,),
            input_names=["sequences"],
            output_names=["user_vectors"],
            dynamic_shapes={"sequences": {0: users}},
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    graph = program.model_proto
    for node in graph.graph.node:  # source lines and module paths of this checkout: other clones would write other bytes
        del node.metadata_props[:]
    onnx.helper.set_model_props(graph, {"model_sha256": model_sha256, "max_len": str(encoder.max_len)})
    with atomic_path(path) as tmp:
        onnx.save_model(graph, str(tmp))


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
    encoder: UserEncoder,
    branches: list[str],
    item_keys: list[str],
    index_config: IndexConfig,
    out_dir: Path,
    provenance: dict,
    model_sha256: str,
) -> dict:
    """Write index.faiss, user_encoder.onnx and items.parquet (last: it records the other two's
    fingerprints) into ``out_dir``; return the file sizes in bytes. ``item_keys[i]`` is the key
    of item_idx i + 1; ``model_sha256`` the fingerprint of the model.pt exported."""
    vectors = encoder.item_table[1:].numpy()  # (N, B*d), item_idx 1..N
    if len(item_keys) != len(vectors):
        raise ValueError(f"the model has {len(vectors)} items, items.parquet {len(item_keys)}: rerun the train stage")
    out_dir = Path(out_dir)
    index = build_index(vectors, index_config)
    with atomic_path(out_dir / INDEX_FILE) as tmp:
        faiss.write_index(index, str(tmp))
    export_encoder(encoder, out_dir / ENCODER_FILE, model_sha256)
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
        "model_sha256": model_sha256,
        "index_sha256": file_sha256(out_dir / INDEX_FILE),
        "user_encoder_sha256": file_sha256(out_dir / ENCODER_FILE),
        "user_encoder": f"{ENCODER_FILE}: ONNX, input sequences (U, {encoder.max_len}) int64 item_idx of the last "
        f"{encoder.max_len} history items, left-padded with 0 -> output user_vectors (U, {vectors.shape[1]}) float32",
    }
    write_table(pa.table(columns), out_dir / ITEMS_FILE, items_schema(branches, d), metadata)
    return {name: (out_dir / name).stat().st_size for name in (ITEMS_FILE, INDEX_FILE, ENCODER_FILE)}


def open_index(folder: Path, model_path: Path, num_items: int, vector_dim: int) -> faiss.Index:
    """The export's FAISS index, after checking that it has one row per item of the model
    (``num_items``) of ``vector_dim`` dimensions and that items.parquet, which was written with
    it, records this index's and ``model_path``'s fingerprints."""
    folder, rerun = Path(folder), f"rerun `dvc repro export@{Path(folder).name}`"
    items_path, index_path = folder / ITEMS_FILE, folder / INDEX_FILE
    for path in (items_path, index_path):
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found; {rerun}")
    try:
        rows, metadata = pq.read_metadata(items_path).num_rows, read_metadata(items_path)
    except (OSError, pa.ArrowException) as err:
        raise ExportMismatch(f"{items_path}: not a readable Parquet file ({err}); {rerun}") from None
    try:
        index = faiss.read_index(str(index_path))
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise ExportMismatch(f"{index_path}: not a readable FAISS index ({reason}); {rerun}") from None
    problems = []
    if index.ntotal != num_items or rows != num_items:
        problems.append(f"{index.ntotal} index rows and {rows} in {ITEMS_FILE}, the model has {num_items} items")
    if index.d != vector_dim:
        problems.append(f"{index.d}-dimensional index, the model's vectors have {vector_dim}")
    if metadata.get("index_sha256") != file_sha256(index_path):
        problems.append(f"{INDEX_FILE} is not the one {ITEMS_FILE} was written with")
    if metadata.get("model_sha256") != file_sha256(model_path):
        problems.append(f"exported from another model than {model_path}")
    if not problems:
        vectors = pq.read_table(items_path, columns=["vector"]).column("vector").combine_chunks().flatten()
        if bad := len(vectors) - pc.sum(pc.is_finite(vectors)).as_py():
            problems.append(f"{ITEMS_FILE} holds {bad} NaN or infinite vector values")
    if problems:
        raise ExportMismatch(f"{folder}: {'; '.join(problems)}: {rerun}")
    return index
