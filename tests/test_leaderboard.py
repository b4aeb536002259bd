"""Result records (schema, validation, atomic never-overwriting writes) and the leaderboard report."""
import io
import json
import math
import multiprocessing as mp
import uuid
import warnings

import numpy as np
import pandas as pd
import pytest

from leaderboard.records import (SCHEMA, RecordError, RecordWarning, existing_records, load_records, new_record,
                                 record_filename, validate_record, write_record)
from leaderboard.render import render_report
from leaderboard.report import aggregate, load_references

HASH_A = "sha256:" + "a1" * 32
HASH_B = "sha256:" + "b2" * 32


def backbone(name="r50-mscn", hash=HASH_A, method="mscn-simclr", epochs=800):
    return {"name": name, "hash": hash, "path": f"/ckpt/{name}.safetensors", "arch": "resnet50", "method": method,
            "epochs": epochs}


def record(benchmark="places205", task="linear", recipe="vissl", engine="torch-linear", mode="cached", trial=0,
           metrics=None, bb=None, **kw):
    return new_record(benchmark=benchmark, task=task, recipe=recipe, engine=engine, mode=mode,
                      backbone=bb or backbone(), trial=trial, seed=trial, metrics=metrics or {"top1": 50.0},
                      config={"recipe": {"name": recipe, "epochs": 14}, "milestones": (4, 8, 12)}, **kw)


def table_rows(markdown: str, title: str) -> list[dict]:
    """The rows of the markdown table under `## title`, as dicts keyed by header."""
    block = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in block.splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


# ------------------------------------------------------------------------------------------------------ records

def test_cached_mode_is_never_the_protocol():
    assert record(mode="cached")["protocol"] is False
    assert record(mode="protocol")["protocol"] is True
    with pytest.raises(RecordError, match="cached"):
        validate_record({**record(mode="cached"), "protocol": True})


def test_new_record_fills_provenance_and_protocol():
    rec = record(mode="protocol")
    assert rec["schema"] == SCHEMA and len(rec["run_id"]) == 32 and rec["created"].endswith("+00:00")
    assert rec["protocol"] is True and rec["overrides"] == {} and rec["allow_partial_load"] is False
    assert {"python", "torch", "numpy", "pandas"} <= set(rec["versions"])
    assert rec["versions"]["pandas"] == pd.__version__
    assert isinstance(rec["git_rev"], str) and rec["git_rev"] and rec["host"]
    assert rec["config"]["milestones"] == [4, 8, 12]  # stored as plain JSON
    assert record(mode="protocol", overrides={"epochs": 2})["protocol"] is False
    assert record(mode="protocol", allow_partial_load=True)["protocol"] is False
    assert record(metrics={"top1": np.float32(12.5)})["metrics"] == {"top1": 12.5}


def test_write_read_round_trip(tmp_path):
    rec = record(metrics={"top1": 53.25, "top5": 80.5}, overrides={"epochs": 2, "crop_size": 64})
    path = write_record(tmp_path / "new" / "dir", rec)
    assert path.name == record_filename(rec)
    assert path.name.startswith("places205__r50-mscn__vissl__torch-linear__cached__t0__")
    assert json.loads(path.read_text()) == rec
    df = load_records(tmp_path / "new" / "dir")
    assert len(df) == 2 and set(df["metric"]) == {"top1", "top5"}
    row = df.set_index("metric").loc["top1"]
    assert (row["run_id"], row["backbone"], row["backbone_hash"], row["method"], row["epochs"], row["arch"]) == \
        (rec["run_id"], "r50-mscn", HASH_A, "mscn-simclr", 800, "resnet50")
    assert row["value"] == 53.25 and not row["protocol"] and row["path"] == str(path)
    assert json.loads(row["overrides"]) == {"epochs": 2, "crop_size": 64}


def test_file_names_are_sanitised(tmp_path):
    rec = record(benchmark="voc07+12", task="detection", engine="detectron2", mode="train",
                 bb=backbone(name="moco/v2+ep800"), metrics={"AP": 1.0})
    path = write_record(tmp_path, rec)
    assert path.parent == tmp_path and path.name.startswith("voc07-12__moco-v2-ep800__vissl__detectron2__train__t0__")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "12", None, True])
def test_validation_rejects_bad_metrics(value):
    with pytest.raises(RecordError, match="top1"):
        record(metrics={"top1": value})
    rec = record()
    rec["metrics"]["top1"] = value
    with pytest.raises(RecordError, match="top1"):
        validate_record(rec)


@pytest.mark.parametrize("field", ["backbone", "metrics", "run_id", "trial", "overrides", "config"])
def test_validation_rejects_missing_fields(field):
    rec = record()
    del rec[field]
    with pytest.raises(RecordError, match=field):
        validate_record(rec)


def test_validation_rejects_inconsistent_or_malformed_records(tmp_path):
    rec = record(mode="protocol")
    validate_record(rec)
    with pytest.raises(RecordError, match="protocol"):
        validate_record({**rec, "overrides": {"epochs": 2}})  # protocol still true
    with pytest.raises(RecordError, match="mode"):
        validate_record({**rec, "mode": "fast"})
    with pytest.raises(RecordError, match="backbone.hash"):
        validate_record({**rec, "backbone": {**rec["backbone"], "hash": ""}})
    with pytest.raises(RecordError, match="metrics is empty"):
        validate_record({**rec, "metrics": {}})
    with pytest.raises(RecordError, match="schema"):
        validate_record({**rec, "schema": "bench.result/0"})
    with pytest.raises(RecordError, match="config is not plain JSON"):
        new_record(benchmark="places205", task="linear", recipe="vissl", engine="torch-linear", mode="cached",
                   backbone=backbone(), trial=0, seed=0, metrics={"top1": 1.0}, config={"path": tmp_path})
    with pytest.raises(RecordError):
        write_record(tmp_path, {**rec, "metrics": {"top1": float("nan")}})
    assert list(tmp_path.iterdir()) == []


def test_write_record_never_overwrites(tmp_path):
    rec = record()
    taken = tmp_path / record_filename(rec)
    taken.write_text("someone else's file\n")
    first = write_record(tmp_path, rec)
    second = write_record(tmp_path, rec)
    assert taken.read_text() == "someone else's file\n"
    assert len({taken, first, second}) == 3
    assert json.loads(first.read_text()) == json.loads(second.read_text()) == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([taken.name, first.name, second.name])


def _writer(results_dir, worker, count, start):
    start.wait()
    for i in range(count):
        # half the records share benchmark/backbone/trial; their run_ids share the first 8 hex digits across
        # the two workers, so both processes race for the very same file name
        rec = record(trial=0 if i % 2 else i, metrics={"top1": float(i)})
        rec["run_id"] = f"{i:08x}" + uuid.uuid4().hex[8:]
        rec["extra"] = {"worker": worker, "i": i}
        write_record(results_dir, rec)


def test_concurrent_writers_never_lose_or_clobber(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 50, start)) for w in range(2)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    files = list(tmp_path.iterdir())
    assert len(files) == 100 and all(f.suffix == ".json" and not f.name.startswith(".") for f in files)
    records = [json.loads(f.read_text()) for f in files]
    for rec in records:
        validate_record(rec)
    assert sorted((r["extra"]["worker"], r["extra"]["i"]) for r in records) == [(w, i) for w in range(2)
                                                                                 for i in range(50)]
    assert len({r["run_id"] for r in records}) == 100
    assert sum(f.stem.endswith("-1") for f in files) == 50  # every shared name was won once, then renamed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_records(tmp_path)["run_id"].nunique() == 100


def test_corrupt_record_warns_and_strict_raises(tmp_path):
    write_record(tmp_path, record())
    (tmp_path / "broken.json").write_text('{"schema": "bench.result/1", "run_id": ')
    bad = record()
    bad["metrics"]["top1"] = float("nan")
    (tmp_path / "nan-metric.json").write_text(json.dumps(bad))
    with pytest.warns(RecordWarning) as caught:
        df = load_records(tmp_path)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert "broken.json" in messages[0] and "nan-metric.json" in messages[1] and "NaN" in messages[1]
    assert len(df) == 1
    with pytest.raises(RecordError, match="broken.json"):
        load_records(tmp_path, strict=True)


def test_duplicate_run_id_is_read_once(tmp_path):
    rec = record()
    write_record(tmp_path, rec)
    write_record(tmp_path, rec)
    with pytest.warns(RecordWarning, match=rec["run_id"]):
        assert len(load_records(tmp_path)) == 1


def test_existing_records_matches_cells(tmp_path):
    for trial in range(2):
        write_record(tmp_path, record(trial=trial))
    write_record(tmp_path, record(bb=backbone(hash=HASH_B)))
    write_record(tmp_path, record(recipe="vicreg"))
    assert len(existing_records(tmp_path, benchmark="places205")) == 4
    assert len(existing_records(tmp_path, backbone_hash=HASH_A, recipe="vissl")) == 2
    hits = existing_records(tmp_path, benchmark="places205", backbone_hash=HASH_A, recipe="vissl", trial=1)
    assert [(r["trial"], r["backbone"]["hash"]) for r in hits] == [(1, HASH_A)]
    assert existing_records(tmp_path, backbone_hash=HASH_B, trial=1) == []
    assert existing_records(tmp_path / "missing", benchmark="places205") == []
    with pytest.raises(TypeError, match="bogus"):
        existing_records(tmp_path, bogus=1)


# ------------------------------------------------------------------------------------------------------- report

def test_aggregate_mean_std_over_trials(tmp_path):
    values = [10.0, 11.0, 13.0]
    for trial, v in enumerate(values):
        write_record(tmp_path, record(trial=trial, metrics={"top1": v}))
    agg = aggregate(load_records(tmp_path))
    assert len(agg) == 1
    row = agg.iloc[0]
    assert row["n"] == 3
    assert row["mean"] == pytest.approx(np.mean(values)) and row["std"] == pytest.approx(np.std(values, ddof=1))
    md = render_report(tmp_path)
    (measured,) = [r for r in table_rows(md, "Linear probes (Table 3)") if r["mode"] == "cached"]
    assert measured["Places205 top-1"] == f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f} (3)"
    assert measured["Places205 top-1"] == "11.33 ± 1.53 (3)"
    assert measured["iNat18 top-1"] == "—"  # measured on one benchmark only
    assert measured["backbone"] == "r50-mscn" and measured["source"] == "measured, sha256:a1a1a1a1"


def test_single_trial_has_no_std(tmp_path):
    write_record(tmp_path, record(metrics={"top1": 12.3}))
    agg = aggregate(load_records(tmp_path))
    assert agg.iloc[0]["n"] == 1 and math.isnan(agg.iloc[0]["std"])
    assert "12.30 ± — (1)" in render_report(tmp_path)


def test_recipes_engines_modes_hashes_and_overrides_are_never_averaged(tmp_path):
    cells = [dict(), dict(recipe="vicreg"), dict(engine="other-linear"), dict(mode="protocol"),
             dict(bb=backbone(hash=HASH_B)), dict(overrides={"epochs": 2}), dict(overrides={"epochs": 4})]
    for i, kw in enumerate(cells):
        for trial in range(2):
            write_record(tmp_path, record(trial=trial, metrics={"top1": 10.0 * (i + 1) + trial}, **kw))
    agg = aggregate(load_records(tmp_path))
    assert len(agg) == len(cells) and (agg["n"] == 2).all()
    assert sorted(agg["mean"]) == [10.0 * (i + 1) + 0.5 for i in range(len(cells))]
    rows = [r for r in table_rows(render_report(tmp_path), "Linear probes (Table 3)") if r["mode"] != "published"]
    assert len(rows) == len(cells)
    assert {(r["recipe"], r["engine"], r["mode"]) for r in rows} == {
        ("vissl", "torch-linear", "cached"), ("vicreg", "torch-linear", "cached"),
        ("vissl", "other-linear", "cached"), ("vissl", "torch-linear", "protocol")}


def test_override_rows_are_marked_with_footnotes(tmp_path):
    write_record(tmp_path, record(metrics={"top1": 40.0}))
    write_record(tmp_path, record(metrics={"top1": 20.0}, overrides={"epochs": 2, "crop_size": 64}))
    write_record(tmp_path, record(benchmark="inat18", metrics={"top1": 5.0}, allow_partial_load=True))
    md = render_report(tmp_path)
    rows = {r["Places205 top-1"] + "|" + r["iNat18 top-1"]: r["backbone"]
            for r in table_rows(md, "Linear probes (Table 3)") if r["mode"] != "published"}
    assert rows == {"40.00 ± — (1)|—": "r50-mscn", "20.00 ± — (1)|—": "r50-mscn†1",
                    "—|5.00 ± — (1)": "r50-mscn†2"}
    assert "†1 non-protocol: crop_size=64, epochs=2" in md
    assert "†2 non-protocol: allow_partial_load" in md


def test_reference_rows_appear_with_source(tmp_path):
    md = render_report(tmp_path / "nothing-here")
    assert f"No results found in {tmp_path / 'nothing-here'}" in md
    rows = table_rows(md, "Linear probes (Table 3)")
    (mscn,) = [r for r in rows if r["method"] == "mscn-simclr"]
    assert (mscn["Places205 top-1"], mscn["iNat18 top-1"], mscn["recipe"], mscn["mode"], mscn["source"]) == \
        ("53.8", "38.2", "vissl", "published", "MSCN seed Tab.3")
    det = {r["method"]: r for r in table_rows(md, "Detection and instance segmentation (Table 4)")
           if r["recipe"] == "moco"}
    assert (det["supervised"]["VOC AP"], det["supervised"]["COCO APmk75"]) == ("53.5", "35.2")
    assert det["random-init"]["COCO APbb50"] == "—"
    assert any(r["mIoU"] == "42.05" for r in table_rows(md, "ADE20K semantic segmentation (ade20k)"))
    refs = load_references()
    linear = refs[refs["benchmark"].isin(["places205", "inat18"])]
    assert len(rows) == len(linear[["method", "pretrain_epochs", "backbone", "recipe"]].drop_duplicates())
    bare = render_report(tmp_path / "nothing-here", references=False)
    assert "53.8" not in bare and "No results found" in bare


def test_csv_and_json_formats(tmp_path):
    for trial, v in enumerate([10.0, 11.0, 13.0]):
        write_record(tmp_path, record(trial=trial, metrics={"top1": v}))
    df = pd.read_csv(io.StringIO(render_report(tmp_path, fmt="csv")))
    assert set(df["kind"]) == {"measured", "published"}
    measured = df[df["kind"] == "measured"].iloc[0]
    assert (measured["benchmark"], measured["metric"], measured["n"]) == ("places205", "top1", 3)
    assert measured["mean"] == pytest.approx(34 / 3) and measured["std"] == pytest.approx(np.std([10, 11, 13], ddof=1))
    ref = df[(df["kind"] == "published") & (df["method"] == "mscn-simclr") & (df["benchmark"] == "places205")]
    assert ref["mean"].tolist() == [53.8] and ref["source"].tolist() == ["MSCN seed Tab.3"]
    rows = json.loads(render_report(tmp_path, fmt="json"))
    assert len(rows) == len(df) == 1 + len(load_references())
    assert [r["mean"] for r in rows if r["kind"] == "measured"] == [pytest.approx(34 / 3)]
    with pytest.raises(ValueError, match="format"):
        render_report(tmp_path, fmt="html")


def test_replaced_atomically_keeps_the_old_file_on_error_and_leaves_no_temp(tmp_path):
    from leaderboard.records import replaced_atomically

    path = tmp_path / "state.json"
    path.write_text("old")
    with pytest.raises(OSError):
        with replaced_atomically(path) as tmp:
            tmp.write_text("half")
            raise OSError("No space left on device")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with replaced_atomically(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["state.json"]
