"""The generic, amazon2018 and hm adapters on small files in each source's real format, through the core."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from pipeline.ingest.adapters.amazon2018 import Amazon2018Options, read_amazon2018
from pipeline.ingest.adapters.base import SourceError
from pipeline.ingest.adapters.generic import GenericOptions, read_generic
from pipeline.ingest.adapters.hm import HMOptions, read_hm
from pipeline.ingest.core import SplitRules, ingest


def make_image(path: Path, fmt: str = "JPEG") -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 3), (200, 30, 10)).save(path, fmt)
    return path.read_bytes()


def unix(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def with_value(frame: pl.DataFrame, column: str, index: int, value: str) -> pl.DataFrame:
    """``frame`` with row ``index`` (0-based) of ``column`` set to ``value``."""
    return frame.with_columns(pl.when(pl.int_range(pl.len()) == index).then(pl.lit(value)).otherwise(pl.col(column)).alias(column))


def image_of(result, key: str) -> bytes | None:
    idx = result.items.filter(pl.col("item_key") == key)["item_idx"][0]
    images = pl.from_arrow(result.images.table())
    return images.filter(pl.col("item_idx") == idx)["image"][0]


# --- generic ---------------------------------------------------------------------------------


def write_generic(root: Path) -> dict[str, bytes]:
    """Users u1, u2 with 5 items each (ISO times), one duplicate row, one unknown item."""
    rows = [("u1", f"i{k}", f"2020-01-0{k}") for k in range(1, 6)]
    rows += [("u2", f"i{k}", f"2020-02-0{k}T12:00:00Z") for k in range(1, 6)]
    rows += [("u2", "i1", "2020-02-01T12:00:00Z"), ("u1", "i9", "2020-01-09")]
    pl.DataFrame(rows, schema=["user", "item", "when"], orient="row").write_csv(root / "inter.csv")
    images = {"i1": make_image(root / "pics" / "one.jpg"), "i2": make_image(root.parent / "elsewhere" / "two.png", "PNG")}
    items = pl.DataFrame(
        {
            "sku": ["i1", "i2", "i3", "i4", "i5"],
            "name": ["One", "Two", "Three", "Four", "Five"],
            "blurb": ["first", "second", None, "", "fifth"],
            "extra": ["red", None, None, "", "blue"],
            "picture": ["one.jpg", str(root.parent / "elsewhere" / "two.png"), "https://example.org/3.jpg", None, "missing.jpg"],
        }
    )
    items.write_csv(root / "things.csv")
    return images


GENERIC = GenericOptions(
    interactions_file="inter.csv",
    user_column="user",
    item_column="item",
    timestamp_column="when",
    items_file="things.csv",
    item_key_column="sku",
    title_column="name",
    text_columns=("blurb", "extra"),
    image_column="picture",
    image_dir="pics",
)


def test_generic_csv_iso_times_images_and_counts(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    images = write_generic(root)
    raw = read_generic(root, GENERIC)
    result = ingest(raw, SplitRules())

    counts = result.report["counts"]
    assert (result.report["users"], result.report["items"], result.report["interactions"]) == (2, 5, 10)
    assert counts["duplicate"] == 1 and counts["unknown_item"] == 1
    assert counts["image_url_only"] == 1 and counts["image_none"] == 1 and counts["image_missing"] == 1
    items = {row["item_key"]: row for row in result.items.iter_rows(named=True)}
    assert items["i1"]["title"] == "One" and items["i1"]["text"] == "first\nred"
    assert items["i3"]["text"] == "" and items["i4"]["text"] == "" and items["i5"]["text"] == "fifth\nblue"
    assert items["i3"]["image_ref"] == "https://example.org/3.jpg" and not items["i3"]["has_image"]
    assert image_of(result, "i1") == images["i1"]
    assert image_of(result, "i2") is None and counts["image_absolute_path"] == 1  # unless allow_absolute_image_paths
    times = result.interactions.filter(pl.col("user_key") == "u2").sort("position")["timestamp"].to_list()
    assert times == [unix(f"2020-02-0{k}T12:00:00") for k in range(1, 6)]
    assert raw.interactions.filter(pl.col("user_key") == "u1")["timestamp"][0] == unix("2020-01-01")


def test_generic_titles_only_the_text_is_the_title(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_generic(root)
    raw = read_generic(root, replace(GENERIC, text_columns=(), image_column=None, image_dir=None))
    items = {row["item_key"]: row for row in ingest(raw, SplitRules()).items.iter_rows(named=True)}
    assert all(row["text"] == "" for row in items.values()) and items["i2"]["title"] == "Two"
    assert not any(row["has_image"] for row in items.values())


def test_generic_parquet_integer_ids_and_unix_seconds(tmp_path):
    pl.DataFrame({"user_id": [7] * 5, "item_id": [10, 2, 3, 4, 5], "timestamp": [50, 40, 30, 20, 10]}).write_parquet(tmp_path / "i.parquet")
    pl.DataFrame({"item_id": [2, 3, 4, 5, 10], "title": list("abcde"), "description": list("vwxyz")}).write_parquet(tmp_path / "m.parquet")
    raw = read_generic(tmp_path, GenericOptions(interactions_file="i.parquet", items_file="m.parquet"))
    result = ingest(raw, SplitRules())
    # integer keys are re-indexed in numeric order (10 last) and the history follows time
    assert result.items["item_key"].to_list() == ["2", "3", "4", "5", "10"]
    assert result.sequences.row(0, named=True)["test_item"] == 5
    assert result.report["counts"]["image_none"] == 5


def test_generic_bad_timestamp_is_dropped_and_counted_with_its_row(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_generic(root)
    frame = pl.read_csv(root / "inter.csv", infer_schema_length=0)
    with_value(frame, "when", 3, "next tuesday").write_csv(root / "inter.csv")
    result = ingest(read_generic(root, GENERIC), SplitRules(min_user_interactions=4))
    assert result.report["counts"]["bad_timestamp"] == 1
    (bad,) = result.report["bad_values"]
    assert (bad["file"].endswith("inter.csv"), bad["column"], bad["rows"], bad["examples"]) == (True, "when", [4], ["'next tuesday'"])
    with pytest.raises(SourceError, match=r"inter\.csv: column 'when' row 4: .*'next tuesday'; 1 of 12 values"):
        ingest(read_generic(root, GENERIC), SplitRules(max_bad_fraction=0.05))


def test_generic_missing_column_and_file(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    write_generic(root)
    pl.read_csv(root / "things.csv").drop("extra").write_csv(root / "things.csv")
    with pytest.raises(SourceError, match=r"things\.csv: missing column\(s\) \['extra'\]"):
        read_generic(root, GENERIC)
    with pytest.raises(SourceError, match=r"nope\.csv: input file not found"):
        read_generic(root, GenericOptions(interactions_file="nope.csv"))
    with pytest.raises(SourceError, match=r"nowhere: image folder not found"):
        read_generic(root, replace(GENERIC, text_columns=("blurb",), image_dir="nowhere"))


# --- amazon2018 ------------------------------------------------------------------------------


def write_lines(path: Path, lines: list[str], gzipped: bool) -> None:
    data = "\n".join(lines).encode()
    path.write_bytes(gzip.compress(data) if gzipped else data)


def write_amazon(root: Path, gzipped: bool) -> dict[str, bytes]:
    reviews = [
        json.dumps({"reviewerID": user, "asin": f"B{k}", "unixReviewTime": 1000 * k + n, "overall": 5.0})
        for n, user in enumerate(["RA", "RB"])
        for k in range(1, 6)
    ]
    reviews.insert(3, "{'reviewerID': 'RC', 'asin': 'B1', 'unixReviewTime': 1}")  # Python literal: not JSON
    reviews += [reviews[0], "", json.dumps({"reviewerID": "RA", "asin": "B404", "unixReviewTime": 9})]
    write_lines(root / "reviews.json" if not gzipped else root / "reviews.json.gz", reviews, gzipped)
    meta = [
        {"asin": "B1", "title": "Brush", "brand": "Acme", "description": ["Soft.", "Wooden handle."], "imageURLHighRes": ["https://x/B1_hi.jpg"]},
        {"asin": "B2", "title": "Paint", "description": "Red paint.", "imageURL": ["https://x/B2_lo.jpg"]},
        {"asin": "B3", "title": "Canvas", "brand": "", "description": [], "imageURLHighRes": ["https://x/B3_hi.jpg", "https://x/B3_b.jpg"],
         "imageURL": ["https://x/B3_lo.jpg"]},
        {"asin": "B4", "title": "Glue", "category": ["Arts", "Glue"]},
        {"asin": "B5", "title": "Tape", "imageURLHighRes": []},
        {"asin": "B1", "title": "Brush (duplicate row)"},
    ]
    lines = [json.dumps(m) for m in meta]
    lines.insert(2, "{'asin': 'B9', 'title': 'old dump'}")
    write_lines(root / ("meta.json.gz" if gzipped else "meta.json"), lines, gzipped)
    return {"B1": make_image(root / "images" / "B1.jpg"), "B4": make_image(root / "images" / "B4.png", "PNG")}


@pytest.mark.parametrize("gzipped", [True, False])
def test_amazon2018_gzipped_or_plain(tmp_path, gzipped):
    images = write_amazon(tmp_path, gzipped)
    ext = ".json.gz" if gzipped else ".json"
    raw = read_amazon2018(tmp_path, Amazon2018Options(reviews_file="reviews" + ext, meta_file="meta" + ext))
    assert raw.dropped == {"unparseable_line": 1, "unparseable_item_line": 1}
    result = ingest(raw, SplitRules())

    counts = result.report["counts"]
    assert (result.report["users"], result.report["items"], result.report["interactions"]) == (2, 5, 10)
    assert counts["duplicate"] == 1 and counts["unknown_item"] == 1 and counts["duplicate_item"] == 1
    assert counts["image_url_only"] == 2 and counts["image_none"] == 1 and result.report["items_with_image"] == 2
    items = {row["item_key"]: row for row in result.items.iter_rows(named=True)}
    assert items["B1"]["title"] == "Brush" and items["B1"]["text"] == "Acme\nSoft.\nWooden handle."
    assert items["B2"]["text"] == "Red paint." and items["B3"]["text"] == ""
    assert items["B3"]["image_ref"] == "https://x/B3_hi.jpg" and items["B2"]["image_ref"] == "https://x/B2_lo.jpg"
    assert image_of(result, "B1") == images["B1"] and image_of(result, "B4") == images["B4"]
    assert image_of(result, "B5") is None
    history = result.interactions.filter(pl.col("user_key") == "RB").sort("position")["timestamp"].to_list()
    assert history == [1001, 2001, 3001, 4001, 5001]


def test_amazon2018_wrong_type_names_line_and_field(tmp_path):
    reviews = [{"reviewerID": "A", "asin": "B1", "unixReviewTime": 5}, {"reviewerID": "A", "asin": "B2", "unixReviewTime": "last week"}]
    write_lines(tmp_path / "r.json", [json.dumps(r) for r in reviews], False)
    write_lines(tmp_path / "m.json", [json.dumps({"asin": "B1", "title": "t"})], False)
    raw = read_amazon2018(tmp_path, Amazon2018Options(reviews_file="r.json", meta_file="m.json"))
    with pytest.raises(SourceError, match=r"r\.json: field 'unixReviewTime' line 2: .*'last week'; 1 of 2 values"):
        ingest(raw, SplitRules())


def test_amazon2018_missing_field_and_corrupt_gzip(tmp_path):
    write_lines(tmp_path / "r.json.gz", [json.dumps({"reviewerID": "A", "asin": f"B{k}"}) for k in range(3)], True)
    write_lines(tmp_path / "m.json", [json.dumps({"asin": "B1", "title": "t"})], False)
    options = Amazon2018Options(reviews_file="r.json.gz", meta_file="m.json")
    with pytest.raises(SourceError, match=r"r\.json\.gz: field 'unixReviewTime' is missing on every line"):
        read_amazon2018(tmp_path, options)
    data = gzip.compress(b"\n".join(json.dumps({"reviewerID": "A", "asin": str(k), "unixReviewTime": k}).encode() for k in range(2000)))
    (tmp_path / "r.json.gz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(SourceError, match=r"r\.json\.gz: cannot read after line \d+"):
        read_amazon2018(tmp_path, options)


def test_amazon2018_file_of_python_literals_stops(tmp_path):
    write_lines(tmp_path / "r.json", ["{'reviewerID': 'A', 'asin': 'B1', 'unixReviewTime': 1}"] * 3, False)
    write_lines(tmp_path / "m.json", [json.dumps({"asin": "B1", "title": "t"})], False)
    with pytest.raises(SourceError, match=r"r\.json: field 'reviewerID' is missing on every line \(0 JSON lines parsed"):
        read_amazon2018(tmp_path, Amazon2018Options(reviews_file="r.json", meta_file="m.json"))


# --- hm --------------------------------------------------------------------------------------


def write_hm(root: Path) -> dict[str, bytes]:
    """Customers c1, c2 buy 5 articles each in Sept 2020 (one duplicate row, one old purchase)."""
    ids = ["0108775015", "0108775044", "0110065001", "0111565001", "0923758001"]
    rows = [(f"2020-09-{10 + k:02d}", "c1", ids[k].lstrip("0"), "0.05", "2") for k in range(5)]  # ids as the CSV may hold them
    rows += [(f"2020-09-{20 + k:02d}", "c2", ids[k], "0.03", "1") for k in range(5)]
    rows += [rows[-1], ("2018-09-20", "c1", ids[0], "0.01", "1")]
    columns = ["t_dat", "customer_id", "article_id", "price", "sales_channel_id"]
    pl.DataFrame(rows, schema=columns, orient="row").write_csv(root / "transactions_train.csv")
    pl.DataFrame(
        {
            "article_id": ids,
            "product_code": [k[:7] for k in ids],
            "prod_name": ["Strap top", "Strap top (1)", "OP T-shirt", "Tights", "Dress"],
            "product_type_name": ["Vest top", "Vest top", "Bra", "Socks", "Dress"],
            "colour_group_name": ["Black", "White", "Off White", "Black", "Red"],
            "graphical_appearance_name": ["Solid"] * 5,
            "detail_desc": ["Jersey top.", None, "Microfibre T-shirt bra.", "Semi shiny.", "Long dress."],
        }
    ).write_csv(root / "articles.csv")
    return {key: make_image(root / "images" / key[:3] / f"{key}.jpg") for key in ids[:2]}


def test_hm_zero_padded_ids_dates_images_and_since(tmp_path):
    images = write_hm(tmp_path)
    result = ingest(read_hm(tmp_path, HMOptions()), SplitRules())
    counts = result.report["counts"]
    assert (result.report["users"], result.report["items"], result.report["interactions"]) == (2, 5, 11)
    assert counts["duplicate"] == 1 and counts["image_missing"] == 3
    assert result.items["item_key"].to_list() == ["0108775015", "0108775044", "0110065001", "0111565001", "0923758001"]
    items = {row["item_key"]: row for row in result.items.iter_rows(named=True)}
    assert items["0108775015"]["title"] == "Strap top" and items["0108775015"]["text"] == "Vest top\nBlack\nSolid\nJersey top."
    assert items["0108775044"]["text"] == "Vest top\nWhite\nSolid"
    assert image_of(result, "0108775015") == images["0108775015"] and image_of(result, "0108775044") == images["0108775044"]
    c1 = result.interactions.filter(pl.col("user_key") == "c1").sort("position")["timestamp"].to_list()
    assert c1[0] == unix("2018-09-20") and c1[1] == unix("2020-09-10") == 1599696000  # midnight UTC

    recent = read_hm(tmp_path, HMOptions(since="2020-09-12"))
    assert recent.interactions.height == 3 + 5 + 1 and recent.interactions["timestamp"].min() == unix("2020-09-12")


def test_hm_bad_date_article_id_and_missing_column(tmp_path):
    write_hm(tmp_path)
    path = tmp_path / "transactions_train.csv"
    good = pl.read_csv(path, infer_schema_length=0)
    with_value(good, "t_dat", 4, "20/09/2020").write_csv(path)
    raw = read_hm(tmp_path, HMOptions(since="2020-01-01"))  # bad values are reported, not filtered away
    assert [(b.column, b.reason, b.rows, b.count) for b in raw.bad_values] == [("t_dat", "bad_timestamp", [5], 1)]
    with pytest.raises(SourceError, match=r"transactions_train\.csv: column 't_dat' row 5: expected a date YYYY-MM-DD, got '20/09/2020'"):
        ingest(raw, SplitRules(max_bad_fraction=0.05))
    with_value(good, "article_id", 4, "0108-775").write_csv(path)
    raw = read_hm(tmp_path, HMOptions())
    assert [(b.column, b.reason, b.rows) for b in raw.bad_values] == [("article_id", "bad_item", [5])]
    assert raw.interactions.height == good.height - 1
    good.drop("customer_id").write_csv(path)
    with pytest.raises(SourceError, match=r"transactions_train\.csv: missing column\(s\) \['customer_id'\]"):
        read_hm(tmp_path, HMOptions())
    path.unlink()
    with pytest.raises(SourceError, match=r"transactions_train\.csv: transactions file not found"):
        read_hm(tmp_path, HMOptions())

