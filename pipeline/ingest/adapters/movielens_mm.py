"""`movielens-mm`: the embedded MovieLens-100K with plot overviews and poster thumbnails.

Files: ratings.csv (user_id, movie_id, rating, unix_timestamp), items.csv (movie_id, title,
..., overview), posters/{movie_id}.jpg. Every rating counts as an interaction (implicit
feedback, as in the paper). Duplicated movie ids in items.csv are resolved by the core
(first row wins); missing posters and overviews are counted there too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from .base import RawSource, ReadableRows, read_table, require_columns, to_int64


@dataclass(frozen=True)
class MovielensOptions:
    ratings_file: str = "ratings.csv"
    items_file: str = "items.csv"
    posters_dir: str = "posters"


def read_movielens_mm(path: Path, options: MovielensOptions) -> RawSource:
    ratings_path = path / options.ratings_file
    dropped: Counter = Counter()
    ratings = read_table(ratings_path, dropped)
    require_columns(ratings, ["user_id", "movie_id", "unix_timestamp"], ratings_path)
    readable = ReadableRows(ratings_path, ratings.height)
    raw_times = ratings["unix_timestamp"]
    times = readable.check("unix_timestamp", raw_times, to_int64(raw_times), "bad_timestamp", "an integer")
    interactions = pl.DataFrame({"user_key": ratings["user_id"], "item_key": ratings["movie_id"], "timestamp": times})
    interactions = interactions.filter(readable.keep)

    items_path = path / options.items_file
    movies = read_table(items_path, dropped)
    require_columns(movies, ["movie_id", "title", "overview"], items_path)
    posters = path / options.posters_dir
    items = movies.select(
        pl.col("movie_id").alias("item_key"),
        pl.col("title"),
        pl.col("overview").alias("text"),
        pl.concat_str(pl.lit(f"{posters}/"), pl.col("movie_id"), pl.lit(".jpg")).alias("image_path"),
        pl.lit(None, pl.String).alias("image_url"),
    )
    return RawSource(interactions=interactions, items=items, dropped=dropped, bad_values=readable.bad_values, image_roots=(path,))
