"""A deterministic synthetic shop catalogue in the `generic` ingest layout, at any size.

    python benchmarks/synthetic.py OUT_DIR --size M            # S, M, L (table below)
    python benchmarks/synthetic.py OUT_DIR --items 50000 --users 20000 --image-px 96

writes OUT_DIR/interactions.csv (user_id, item_id, timestamp), OUT_DIR/items.csv (item_id, title,
description, image) and OUT_DIR/images/{item_id}.jpg, and prints the params that point the
`generic` adapter at it. The same seed gives byte-identical files. Item popularity follows a
power law (Zipf exponent `--zipf`), every item is bought at least once (ingest keeps nearly the whole
catalogue: ~0.1-2% of the items are bought only in purchases its last-15 rule cuts), every user has 5-60 purchases (15 on average, skewed: ingest keeps each user's last
15) with increasing timestamps, and users have 64-hex ids (as H&M's customers). Images are small smooth
colour JPEGs (coarse noise scaled up) unique per item; texts are a few words of a small
vocabulary. The functions (`item_text`, `item_image`, `catalogue`, `write`) are importable, e.g.
to add items to a catalogue for an incremental benchmark.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

# items, users (interactions: 15 per user on average): the sizes of issue #9
SIZES = {"S": (5_000, 20_000), "M": (50_000, 200_000), "L": (100_000, 1_000_000)}
WORDS = ("red blue green black white small large cotton wool steel wooden classic modern soft "
         "light heavy summer winter kitchen garden office travel sport kids home lamp chair mug "
         "shirt bag shoe table pen notebook bottle jacket scarf watch").split()
START = 1_600_000_000  # unix seconds of the first purchase


def item_text(item: int, seed: int = 0) -> tuple[str, str]:
    """(title, description) of item `item` (1-based), the same for the same seed."""
    rng = np.random.default_rng([seed, item, 1])
    title = " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))).title() + f" {item}"
    description = " ".join(rng.choice(WORDS, int(rng.integers(8, 40)))) + "."
    return title, description


def item_image(item: int, px: int = 64, seed: int = 0) -> bytes:
    """A px x px JPEG for item `item`: coarse random colours scaled up smoothly."""
    rng = np.random.default_rng([seed, item, 2])
    coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    coarse.resize((px, px), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def catalogue(items: int, users: int, zipf: float = 1.1, seed: int = 0) -> np.ndarray:
    """Purchases as rows (user, item, timestamp), users 1..U and items 1..N (1-based)."""
    rng = np.random.default_rng([seed, 0])
    lengths = 4 + np.minimum(rng.geometric(1 / 11, users), 56)  # 5-60, mean ~15
    weights = 1.0 / np.arange(1, items + 1) ** zipf
    order = rng.permutation(items) + 1  # which item has which popularity rank
    drawn = order[rng.choice(items, int(lengths.sum()), p=weights / weights.sum())]
    # every item at least once: the first purchases of users in turn are the catalogue in order
    drawn[: min(items, len(drawn))] = np.arange(1, min(items, len(drawn)) + 1)
    user = np.repeat(np.arange(1, users + 1), lengths)
    rng.shuffle(user)
    timestamp = START + np.arange(len(drawn)) * 60  # one purchase a minute
    return np.stack([user, drawn, timestamp], axis=1)


def user_ids(users: int, seed: int = 0) -> list[str]:
    """64-hex ids of users 1..U (distinct, as long as H&M's customer ids)."""
    raw = np.random.default_rng([seed, 3]).bytes(32 * users)
    return [raw[i : i + 32].hex() for i in range(0, 32 * users, 32)]


def write(out: str | Path, items: int, users: int, image_px: int = 64, zipf: float = 1.1, seed: int = 0) -> Path:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if users * 5 < items:
        raise ValueError(f"{users} users buy at least 5 items each: too few for {items} items (need >= {-(-items // 5)})")
    with (out / "interactions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        ids = user_ids(users, seed)
        writer.writerows((ids[u - 1], f"i{i}", t) for u, i, t in catalogue(items, users, zipf, seed).tolist())
    with (out / "items.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title", "description", "image"])
        for item in range(1, items + 1):
            writer.writerow([f"i{item}", *item_text(item, seed), f"{item}.jpg"])
            (out / "images" / f"{item}.jpg").write_bytes(item_image(item, image_px, seed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--size", choices=sorted(SIZES), help="S (5k items, 20k users), M (50k, 200k), L (100k, 1M)")
    parser.add_argument("--items", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--image-px", type=int, default=64)
    parser.add_argument("--zipf", type=float, default=1.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items, users = SIZES[args.size] if args.size else (args.items, args.users)
    if not items or not users:
        parser.error("give --size or both --items and --users")
    out = write(args.out, items, users, args.image_px, args.zipf, args.seed)
    print(f"{items} items, {users} users written to {out}. Ingest it with:")
    print(f"  dvc exp run -S ingest.adapter=generic -S ingest.path={out} -S ingest.generic.text_columns='[description]' "
          "-S ingest.generic.image_column=image -S ingest.generic.image_dir=images")


if __name__ == "__main__":
    main()
