"""The recommend and export stages on a toy project: whole-history recommendations keyed by the
source's keys, the export scored in a fresh process, new histories, one user's view."""

from __future__ import annotations

import io
import json
import runpy
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline import schema
from pipeline.config import ConfigError, from_dict, to_dict
from pipeline.io import read_metadata, write_table
from pipeline.recommend import RecommendConfig, main as recommend_main, whole_histories
from pipeline.sequences import left_pad
from pipeline.training import load_trained
from pipeline.training.trainer import train
from tests.test_training import toy_config
from tests.toy import make_toy_dataset, ragged, rows_of

ROOT = Path(__file__).resolve().parents[1]
RUN = "odmt-s1"
K = 5


def run_stage(project: Path, script: str, *args: str, monkeypatch) -> None:
    monkeypatch.chdir(project)
    monkeypatch.syspath_prepend(str(ROOT / "stages"))  # as `python stages/x.py` has it
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(ROOT / "stages" / script), run_name="__main__")


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder as the DAG leaves it: toy data, a trained run, exports, recommendations."""
    root = tmp_path_factory.mktemp("project")
    data = make_toy_dataset(root / "data", num_users=24, num_items=30, seq_len=8)
    posters = io.BytesIO()
    Image.new("RGB", (60, 90), "navy").save(posters, format="PNG")
    images = pa.table({"item_idx": np.arange(1, 31, dtype=np.int32), "image": [posters.getvalue()] * 30})
    write_table(images, data / "ingest/images.parquet", schema.IMAGES)
    torch.manual_seed(0)
    train(toy_config(data, epochs=2), root / "models" / RUN, root / "logs" / RUN)
    params = {"recommend": to_dict(RecommendConfig(runs=[RUN], k=K, user_block_size=7)), "report": {"history_shown": 4}, "train": {}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.MonkeyPatch.context() as mp:
        run_stage(root, "export.py", "--run", RUN, monkeypatch=mp)
        run_stage(root, "recommend.py", "--run", RUN, monkeypatch=mp)
    return root


def brute_force(project: Path, histories: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's own fused scores over the catalogue, history and padding masked, top k."""
    model, info = load_trained(project / "models" / RUN, toy_config(project / "data"))
    with torch.no_grad():
        scores = model.user_vectors(left_pad(ragged(histories), info["max_len"])) @ model.item_vectors().T
    scores[:, 0] = -torch.inf
    for row, history in enumerate(histories):
        scores[row, torch.as_tensor(history, dtype=torch.long)] = -torch.inf
    top = torch.topk(scores, k, dim=1)
    return top.indices.numpy(), top.values.numpy()


def test_every_user_gets_the_models_top_k_unseen_items_from_the_whole_history(project):
    sequences = pq.read_table(project / "data/ingest/sequences.parquet")
    recs = pq.read_table(project / "data/recommendations" / f"{RUN}.parquet")
    assert recs.column("user_key").to_pylist() == sequences.column("user_key").to_pylist()
    histories = rows_of(whole_histories(sequences))
    assert all(len(h) == 8 for h in histories)  # train + valid + test
    want_items, want_scores = brute_force(project, histories, K)
    got = np.array([[int(key[1:]) for key in row] for row in recs.column("items").to_pylist()])  # keys "i{idx}"
    np.testing.assert_allclose(np.array(recs.column("scores").to_pylist()), want_scores, rtol=1e-5, atol=1e-6)
    assert np.array_equal(got, want_items)
    assert not any(set(row) & set(h.tolist()) for row, h in zip(got, histories))
    meta = read_metadata(project / "data/recommendations" / f"{RUN}.parquet")
    assert meta["k"] == K and meta["history_excluded"] is True and meta["run"] == RUN


def test_the_export_alone_scores_exactly_like_the_stage_in_a_fresh_process(project, tmp_path):
    """The same top K items as the stage, scores within 1e-5 (ONNX Runtime and PyTorch sum the
    float32 products in other orders), without PyTorch, pickle or this repository."""
    exports = project / "exports" / RUN
    assert sorted(p.name for p in exports.iterdir()) == ["index.faiss", "items.parquet", "user_encoder.onnx"]
    items = pq.read_table(exports / "items.parquet")
    assert items.schema.names == ["item_idx", "item_key", "vector", "vector_id", "vector_text", "vector_image"]
    assert read_metadata(exports / "items.parquet")["variant"] == "odmt"
    sequences = pq.read_table(project / "data/ingest/sequences.parquet")
    keys = {i: f"i{i}" for i in range(1, 31)}
    histories = {u: [keys[i] for i in h] + ["not-an-item"] for u, h in zip(sequences.column("user_key").to_pylist(), rows_of(whole_histories(sequences)))}
    (tmp_path / "histories.json").write_text(json.dumps(histories))
    # -I: no PYTHONPATH, no script or current folder on sys.path; the repository is unreachable.
    # Unpickling anything that names a class or function raises (audit event pickle.find_class).
    client = (
        "import runpy, sys\n"
        "def no_unpickling(event, args):\n"
        "    if event == 'pickle.find_class': raise RuntimeError(f'unpickled {args}')\n"
        "sys.addaudithook(no_unpickling)\n"
        f"sys.argv = ['client', {str(exports)!r}, 'histories.json', '--k', '{K}']\n"
        f"runpy.run_path({str(ROOT / 'examples/score_from_export.py')!r}, run_name='__main__')\n"
        "assert not any(m.split('.')[0] in ('pipeline', 'stages', 'tests', 'torch') for m in sys.modules), 'imported torch or repository code'\n"
    )
    proc = subprocess.run([sys.executable, "-I", "-c", client], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(histories)} unknown item keys skipped" in proc.stderr
    served = json.loads(proc.stdout)
    recs = pq.read_table(project / "data/recommendations" / f"{RUN}.parquet").to_pylist()
    for row in recs:
        assert [key for key, _ in served[row["user_key"]]] == row["items"]
        np.testing.assert_allclose([score for _, score in served[row["user_key"]]], row["scores"], rtol=1e-5, atol=1e-5)


def test_new_histories_are_scored_without_retraining_and_unknown_items_are_skipped(project, tmp_path, monkeypatch):
    sequences = pq.read_table(project / "data/ingest/sequences.parquet")
    first = whole_histories(sequences).row(0)
    rows = [("new-a", f"i{item}", 1000 + t) for t, item in enumerate(first)]  # a copy of user u0
    rows += [("new-a", "unknown-1", 5000), ("new-b", "unknown-2", 7), ("new-b", "unknown-3", 8), ("new-c", "i3", None), ("new-d", "i3", "not-a-time"), rows[0]]
    path = tmp_path / "new.csv"
    path.write_text("user,item,timestamp\n" + "".join(f"{u},{i},{'' if t is None else t}\n" for u, i, t in rows))
    run_stage(project, "recommend.py", "--run", RUN, "--histories", str(path), monkeypatch=monkeypatch)
    out = tmp_path / "new.recommendations.parquet"
    recs = pq.read_table(out).to_pylist()
    assert [r["user_key"] for r in recs] == ["new-a"]
    stage = pq.read_table(project / "data/recommendations" / f"{RUN}.parquet").to_pylist()[0]
    assert recs[0]["items"] == stage["items"]
    source = read_metadata(out)["histories"]
    counts = (
        "skipped_unknown_item 3",
        "skipped_missing_value 1",
        "skipped_bad_timestamp 1",
        "skipped_duplicate 1",
        "skipped_users_without_known_item 3",
        "users_scored 1",
    )
    for counted in counts:
        assert counted in source


def test_history_order_follows_timestamps_not_file_order(project, tmp_path, monkeypatch):
    sequences = pq.read_table(project / "data/ingest/sequences.parquet")
    first = whole_histories(sequences).row(0)
    rows = [(f"i{item}", f"2024-01-{t + 1:02d}") for t, item in enumerate(first)][::-1]  # file order reversed
    path = tmp_path / "dated.csv"
    path.write_text("user,item,timestamp\n" + "".join(f"u,{i},{t}\n" for i, t in rows))
    run_stage(project, "recommend.py", "--run", RUN, "--histories", str(path), "--out", str(tmp_path / "o.parquet"), monkeypatch=monkeypatch)
    stage = pq.read_table(project / "data/recommendations" / f"{RUN}.parquet").to_pylist()[0]
    assert pq.read_table(tmp_path / "o.parquet").column("items").to_pylist() == [stage["items"]]


def test_one_user_in_the_terminal_and_as_a_poster_page(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert recommend_main(["--run", RUN, "--user", "u3", "--html", str(tmp_path / "u3.html")]) == 0
    out = capsys.readouterr().out
    stage = pq.read_table(project / "data/recommendations" / f"{RUN}.parquet").to_pylist()[3]
    first = stage["items"][0]
    assert "User u3" in out and f"1. item {first[1:]}" in out and "Top 5:" in out
    page = (tmp_path / "u3.html").read_text()
    assert page.count("<img") == 4 + K and "Held-out" not in page and "User u3" in page
    assert recommend_main(["--run", RUN, "--user", "nobody"]) == 1


def test_recommend_params_are_checked():
    with pytest.raises(ConfigError, match="recommend.kk: unknown key"):
        from_dict(RecommendConfig, {"kk": 3}, "recommend")
    with pytest.raises(ConfigError, match="k and user_block_size"):
        from_dict(RecommendConfig, {"k": 0}, "recommend")
