"""Our detector interface over PyOD: every kind, persistence, and schema refusal."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from chainwatch.schema import encode
from detector.models import MODEL_KINDS, AnomalyDetector, ModelError
from detector.training import History, gather, load_models, train_block_model
from tests.fakes import make_block

FEATURES = ("a", "b", "c")


def normal_rows(n: int = 400, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_kind_scores_in_unit_range_and_flags_a_clear_outlier(kind):
    model = AnomalyDetector("test", FEATURES, kind=kind, contamination=0.02, seed=7)
    model.fit(normal_rows())
    scored = model.score(np.array([[0.0, 0.0, 0.0], [9.0, -9.0, 9.0]]))
    assert ((scored.scores >= 0) & (scored.scores <= 1)).all()
    assert 0 <= scored.threshold <= 1
    assert not scored.anomalous[0] and scored.anomalous[1]
    assert scored.scores[1] > scored.threshold > scored.scores[0]
    top = model.explain(np.array([9.0, 0.0, 0.0]))
    assert top[0].feature == "a" and top[0].deviation > 5


def test_same_seed_same_model():
    x = normal_rows()
    first, second = (AnomalyDetector("t", FEATURES, seed=3) for _ in range(2))
    first.fit(x)
    second.fit(x)
    probe = normal_rows(20, seed=9)
    assert np.array_equal(first.score(probe).scores, second.score(probe).scores)
    assert first.version == second.version


def test_save_and_load_round_trip_with_metadata(tmp_path):
    model = AnomalyDetector("block", FEATURES, kind="hbos")
    model.fit(normal_rows(), {"first_block": 1, "last_block": 400})
    model.save(tmp_path / "m.joblib")
    loaded = AnomalyDetector.load(tmp_path / "m.joblib", "block", FEATURES)
    probe = normal_rows(10, seed=5)
    assert np.array_equal(loaded.score(probe).scores, model.score(probe).scores)
    assert loaded.training_window == {"first_block": 1, "last_block": 400}
    from pyod.utils.persistence import load

    _, envelope = load(tmp_path / "m.joblib", return_metadata=True, trusted=True)
    assert envelope["metadata"]["feature_schema_hash"] == model.schema_hash
    assert envelope["sklearn_version"] and envelope["pyod_version"]


@pytest.mark.parametrize("kind", ["iforest", "sk_iforest"])
def test_a_saved_forest_loads_and_scores_without_importing_sklearn_or_pyod(kind, tmp_path):
    """Replay with trained models only scores: importing sklearn and PyOD to unpickle the
    estimator cost ~1 s of every start. The estimator stays pickled until it is needed."""
    model = AnomalyDetector("block", FEATURES, kind=kind)
    model.fit(normal_rows())
    model.save(tmp_path / "m.joblib")
    probe = normal_rows(50, seed=6)
    probe[0, 0] = 30.0
    np.save(tmp_path / "probe.npy", probe)
    np.save(tmp_path / "expected.npy", model.score(probe).scores)
    script = f"""
import sys
import numpy as np
from pathlib import Path
from detector.models import AnomalyDetector
loaded = AnomalyDetector.load(Path({str(tmp_path / "m.joblib")!r}), "block", {FEATURES!r})
scores = loaded.score(np.load({str(tmp_path / "probe.npy")!r})).scores
assert np.array_equal(scores, np.load({str(tmp_path / "expected.npy")!r})), "other scores"
print(sorted(m for m in ("sklearn", "pyod", "joblib") if m in sys.modules))
loaded.estimator  # unpickled on first use
print(sorted(m for m in ("sklearn", "pyod") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["['joblib']", "['pyod', 'sklearn']"] if (
        kind == "iforest") else ["['joblib']", "['sklearn']"]


def test_a_model_saved_before_the_estimator_was_kept_pickled_still_loads(tmp_path):
    """Files written by earlier releases hold the estimator itself in the model's state."""
    import copyreg

    from pyod.utils.persistence import save

    class SavedBefore:  # pickles as an AnomalyDetector with the earlier layout
        def __init__(self, state: dict) -> None:
            self.state = state

        def __reduce__(self):
            # copyreg._reconstructor is private: typeshed leaves it out
            return (copyreg._reconstructor,  # type: ignore[attr-defined]
                    (AnomalyDetector, object, None), self.state)

    model = AnomalyDetector("block", FEATURES)
    model.fit(normal_rows())
    state = {k: v for k, v in vars(model).items()
             if k not in ("_est", "_est_pickle", "_threshold", "_walk", "_offset")}
    state["_estimator"] = model.estimator
    save(SavedBefore(state), tmp_path / "old.joblib", metadata=model.metadata())
    loaded = AnomalyDetector.load(tmp_path / "old.joblib", "block", FEATURES)
    probe = normal_rows(50, seed=7)
    probe[3, 1] = -25.0
    assert loaded.compiled_walk() is not None  # scored by the walk as a new file is
    new, old = model.score(probe), loaded.score(probe)
    assert np.array_equal(new.scores, old.scores)
    assert np.array_equal(new.anomalous, old.anomalous) and old.anomalous[3]


@pytest.mark.parametrize("rows", [
    np.arange(12, dtype=np.int64).reshape(4, 3),
    np.arange(12, dtype=np.float32).reshape(4, 3) / 7,
    np.array([[1, 2.5], [3, 4]], dtype=object),
    np.array([[1.0, np.nan]]),
    np.array([[np.inf, 1.0]]),
    np.empty((0, 3)),
    np.empty((3, 0)),
    np.arange(3.0),
])
def test_rows_are_checked_as_sklearn_checks_them_before_a_forest(rows):
    """The walk's rows: sklearn's check_array's, or a ValueError where it raises one."""
    from sklearn.utils import check_array

    from detector.models import checked_rows

    try:
        expected = check_array(rows)
    except ValueError:
        with pytest.raises(ValueError):
            checked_rows(rows)
        return
    got = checked_rows(rows)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_a_model_for_other_features_is_refused_with_one_clear_line(tmp_path):
    model = AnomalyDetector("block", FEATURES)
    model.fit(normal_rows())
    model.save(tmp_path / "m.joblib")
    with pytest.raises(ModelError) as err:
        AnomalyDetector.load(tmp_path / "m.joblib", "block", ("a", "b", "c", "d"))
    assert "trained on other features" in str(err.value) and "\n" not in str(err.value)
    (tmp_path / "bad.joblib").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="unreadable"):
        AnomalyDetector.load(tmp_path / "bad.joblib", "block", FEATURES)


def chain_jsonl(path, count: int) -> None:
    parent, lines = "0x" + "00" * 32, []
    for n in range(count):
        block = make_block(n, parent, tx_count=100 + (n * 7) % 40)
        lines.append(encode(block).decode())
        parent = block.hash
    lines.insert(5, "{not json")
    lines.append(lines[10])  # a duplicate, as at-least-once delivery leaves them
    path.write_text("\n".join(lines) + "\n")


def test_training_from_history_counts_what_it_skipped(tmp_path):
    archive = tmp_path / "history.jsonl"
    chain_jsonl(archive, 120)
    from detector.training import read_jsonl

    history = History()
    gather(read_jsonl(archive, history), history)
    assert (history.records, history.duplicates, len(history.invalid)) == (121, 1, 1)
    assert history.invalid[0].startswith("history.jsonl:6:")
    model = train_block_model(history, kind="iforest", contamination=0.01, seed=42)
    assert model.trained_rows == 119  # the first block has no parent interval
    assert model.training_window["first_block"] == 0 and model.training_window["last_block"] == 119


def test_train_command_writes_a_model_that_detect_loads(tmp_path):
    archive = tmp_path / "history.jsonl"
    chain_jsonl(archive, 120)
    result = subprocess.run(
        [sys.executable, "-m", "chainwatch.cli", "train", "--input", str(archive),
         "--out", str(tmp_path / "models"), "--model", "hbos"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "trained block-hbos-n119" in result.stdout and "1 invalid skipped" in result.stdout
    models = load_models(tmp_path / "models")
    assert models["block"].kind == "hbos"


def test_detect_refuses_a_model_for_other_features_in_one_line(tmp_path):
    model = AnomalyDetector("block", FEATURES)
    model.fit(normal_rows())
    model.save(tmp_path / "models" / "block.joblib")
    result = subprocess.run(
        [sys.executable, "-m", "chainwatch.cli", "run", "--rpc", "http://127.0.0.1:1",
         "--models", str(tmp_path / "models"), "--metrics-port", "0",
         "--state-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    [line] = [x for x in result.stderr.splitlines() if x.startswith("chainwatch: error:")]
    assert "trained on other features" in line and "chainwatch train" in line
    assert "Traceback" not in result.stderr


def test_train_fits_a_transaction_model_on_live_features_and_detect_runs_it_frozen(tmp_path):
    from bench.synthetic import generate
    from chainwatch.metrics import Metrics
    from detector.engine import Detector, DetectorConfig
    from detector.tx_features import TX_FEATURES

    archive = tmp_path / "history.jsonl"
    blocks = generate(70, 60, seed=5)
    archive.write_text("".join(encode(b).decode() + "\n" for b in blocks[:60]))
    result = subprocess.run(
        [sys.executable, "-m", "chainwatch.cli", "train", "--input", str(archive),
         "--out", str(tmp_path / "models")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    models = load_models(tmp_path / "models")
    tx = models["tx"]
    assert tx.feature_names == TX_FEATURES
    # every tx of the 60 blocks but the first block's (no fee market yet to compare with)
    assert tx.trained_rows == sum(b.tx_count for b in blocks[1:60])
    assert f"{tx.version} on {tx.trained_rows} transactions" in result.stdout
    detector = Detector(DetectorConfig(), Metrics(), pretrained=models)
    for block in blocks[60:]:  # one poll each: the first one fills the fee market
        detector.process([block])
    family = detector.tx[1]
    assert family.model.frozen and family.model.version == tx.version
    assert family.scored_rows > 0 and family.model.fits == 0


@pytest.mark.parametrize("kind", ["iforest", "sk_iforest"])
def test_the_compiled_forest_scores_exactly_as_sklearn(kind, tmp_path):
    """A small live call takes the compiled walk; it must not change a single score, and
    a saved model loads into the same scores, walked (its walk is saved with it)."""
    from detector import models

    rng = np.random.default_rng(11)
    train = rng.standard_normal((2_000, 4))
    train[:, 2] = 5.0  # a constant feature: never split on
    model = AnomalyDetector("block", ("a", "b", "c", "d"), kind=kind, contamination=0.01)
    model.fit(train)
    rows = np.vstack([rng.standard_normal((200, 4)) * 3, [[40.0, -40.0, 5.0, 0.0]]])
    assert model.estimator is not None  # fitted
    reference = np.asarray(model.estimator.decision_function(rows))
    assert np.array_equal(model._raw(rows), reference)
    forest = model._forest()
    assert forest is not None and forest[0] in models._compiled  # the fast path was taken
    path = tmp_path / "m.joblib"
    model.save(path)
    loaded = AnomalyDetector.load(path, "block", ("a", "b", "c", "d"))
    assert loaded.compiled_walk() is not None and loaded._est is None
    assert np.array_equal(loaded.score(rows).scores, model.score(rows).scores)


def test_the_deviation_cut_follows_the_training_tail():
    """A quiet market's far outlier is flagged; the same deviation is ordinary where the
    training txs themselves reach it (mainnet's MEV tips), and stays unflagged there."""
    rng = np.random.default_rng(5)
    quiet = rng.normal(0.0, 1.0, size=(4_000, 3))
    heavy = quiet.copy()
    heavy[:, 0] = rng.standard_t(1.2, size=4_000)  # a heavy-tailed feature
    probe = np.array([[60.0, 0.0, 0.0]])  # 60 robust sigma on that feature
    cuts = {}
    for name, train in (("quiet", quiet), ("heavy", heavy)):
        model = AnomalyDetector("tx", ("a", "b", "c"), contamination=0.001, seed=1,
                                z_limit=20.0, tail_factor=3.0)
        model.fit(train)
        cuts[name] = model.z_cut
        scored = model.score(probe)
        assert bool(scored.anomalous[0]) == (name == "quiet"), name
    assert cuts["quiet"] == 20.0 and cuts["heavy"] > 60.0


def test_a_feature_with_its_own_cut_is_judged_by_it_and_left_out_of_the_tail():
    """The heavy-tailed feature has its own cut (6): it no longer lifts the shared cut of
    the others, so 30 sigma on a quiet feature is flagged; 7 sigma on it is flagged too
    (its robust scale is ~1.35: 10 is ~7.4 sigma, 7 is ~5.2)."""
    rng = np.random.default_rng(5)
    train = rng.normal(0.0, 1.0, size=(4_000, 3))
    train[:, 0] = rng.standard_t(1.2, size=4_000)
    model = AnomalyDetector("tx", ("a", "b", "c"), contamination=0.001, seed=1,
                            z_limit=20.0, tail_factor=3.0, feature_cuts=(6.0, 0.0, 0.0))
    model.fit(train)
    assert model.z_cut == 20.0 and model.cuts.tolist() == [6.0, 20.0, 20.0]
    scored = model.score(np.array([[10.0, 0.0, 0.0], [0.0, 30.0, 0.0], [7.0, 15.0, 0.0]]))
    assert scored.beyond.tolist() == [True, True, False]
    assert scored.anomalous[:2].all()
    # explained nearest its cut first: 5.2 of 6 on "a" before 15 of 20 on "b"
    assert [e.feature for e in model.explain(np.array([7.0, 15.0, 0.0]))][:2] == ["a", "b"]


def test_train_reads_an_archive_directory_as_it_reads_the_same_records_in_jsonl(tmp_path):
    from bench.synthetic import generate
    from chainwatch.bootstrap import run_train
    from chainwatch.settings import load_settings
    from replay.archive import ArchiveWriter, archive_row

    blocks = generate(70, 30, seed=5)
    jsonl = tmp_path / "history.jsonl"
    jsonl.write_text("".join(encode(b).decode() + "\n" for b in blocks))
    writer = ArchiveWriter(tmp_path / "archive")
    for offset, b in enumerate(blocks):
        writer.add(archive_row("chainwatch.blocks", 0, offset, "1:n", encode(b), 0))
    for offset in range(len(blocks), len(blocks) + 1_002):  # more than one sample holds
        writer.add(archive_row("chainwatch.blocks", 0, offset, "1:n", b"{broken", 0))
    writer.flush()
    settings = load_settings()
    from_jsonl = run_train(settings, [jsonl], tmp_path / "a")
    from_archive = run_train(settings, [tmp_path / "archive"], tmp_path / "b")
    # the same records give the same models (versions carry a digest of the training rows)
    versions = [load_models(tmp_path / d) for d in ("a", "b")]
    assert {f: m.version for f, m in versions[0].items()} == \
        {f: m.version for f, m in versions[1].items()}
    assert set(versions[1]) == {"block", "tx"}
    assert "0 invalid skipped" in from_jsonl and "1002 invalid skipped" in from_archive


def test_block_intervals_deviate_in_slots_so_a_missed_slot_is_not_an_outlier():
    """On a 12 s chain, a missed slot (24 s) is ~1 % of blocks: 12 robust sigma when
    intervals are measured in seconds (they hardly vary), 1 in slots. A six-slot stall
    still passes the block model's 6 sigma guard."""
    from detector.features import (
        BLOCK_FEATURE_MEDIAN_SCALE,
        BLOCK_FEATURE_MIN_SCALE,
        BLOCK_FEATURES,
    )

    rng = np.random.default_rng(3)
    rows = 5_000
    train = np.column_stack([
        np.where(rng.random(rows) < 0.01, 24.0, 12.0),  # interval_seconds
        rng.normal(0.5, 0.2, rows),  # gas_used_ratio
        rng.normal(150, 30, rows),  # tx_count
        rng.normal(0.0, 0.05, rows),  # base_fee_change_ratio
        rng.lognormal(np.log(0.6), 0.5, rows),  # propagation_delay_seconds
    ])
    missed, stall = [24.0, 0.5, 150, 0.0, 0.6], [84.0, 0.5, 150, 0.0, 0.6]
    z_interval = {}
    for median_scale in (None, BLOCK_FEATURE_MEDIAN_SCALE):
        model = AnomalyDetector("block", BLOCK_FEATURES, contamination=0.001, seed=1,
                                min_scale=BLOCK_FEATURE_MIN_SCALE, median_scale=median_scale)
        model.fit(train)
        z_interval[median_scale is not None] = model.robust_z(np.array([missed, stall]))[:, 0]
    assert list(z_interval[False]) == [12.0, 72.0]  # seconds: 1 s scale
    assert list(z_interval[True]) == [1.0, 6.0]  # slots: 12 s scale


def test_the_live_model_refits_at_growing_intervals_up_to_refit_every():
    """Fits after warm-up, then after as many new rows as seen in all, at most refit_every."""
    from detector.model import BlockAnomalyModel, fits_within

    model = BlockAnomalyModel(("a", "b"), warmup=10, refit_every=50, history=40,
                              n_estimators=10)
    rows = normal_rows(400)[:, :2]
    fitted_at = [5 * (i + 1) for i in range(len(rows) // 5)
                 if model.learn(rows[5 * i : 5 * i + 5])]
    assert fitted_at == [10, 20, 40, 80, 130, 180, 230, 280, 330, 380]
    assert fits_within(400, 10, 50) == 10 and fits_within(9, 10, 50) == 0
    assert model.fits == 10 and model.detector.trained_rows == 40  # the last `history` rows
    frozen = BlockAnomalyModel(("a", "b"), warmup=10, pretrained=model.detector)
    assert not frozen.learn(rows[:50]) and frozen.fits == 0


def test_deviations_in_one_pass_are_numpys_bit_for_bit():
    """Score's largest |z| and |z| / cut per row: the compiled pass equals numpy's steps,
    NaN and infinities included; a zero scale takes numpy's path (no division error)."""
    rng = np.random.default_rng(8)
    model = AnomalyDetector("tx", ("a", "b", "c", "d"), contamination=0.01, seed=1)
    model.fit(rng.lognormal(0.0, 2.0, size=(3_000, 4)))
    x = rng.lognormal(0.0, 3.0, size=(5_000, 4)) * rng.choice([-1.0, 1.0], size=(5_000, 4))
    x[3, 1], x[4, 0], x[5, 3], x[6, 2] = np.nan, np.inf, -np.inf, 0.0

    def numpys(m: AnomalyDetector) -> tuple[np.ndarray, np.ndarray]:
        z = np.abs(m.robust_z(x))
        return z.max(axis=1), (z / m.cuts).max(axis=1)

    for got, wanted in zip(model._deviations(x), numpys(model), strict=True):
        assert np.array_equal(got, wanted, equal_nan=True)
    assert np.isnan(model._deviations(x)[0][3]) and np.isinf(model._deviations(x)[0][4])
    model._scale = np.array([1.0, 0.0, 1.0, 1.0])  # what a constant feature could give
    with np.errstate(divide="ignore", invalid="ignore"):
        for got, wanted in zip(model._deviations(x), numpys(model), strict=True):
            assert np.array_equal(got, wanted, equal_nan=True)
