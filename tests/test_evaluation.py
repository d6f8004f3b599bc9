"""The evaluation on the tiny torch-free repository and synthetic images: every section and plot,
numbers that match an independent count, the same routing as production, MLflow, the CLI, --url."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from adaptive_quant.config import TrackingConfig
from adaptive_quant.core.images import to_model_input
from adaptive_quant.core.manifest import VariantEntry, load_manifest, save_manifest, sha256_file
from adaptive_quant.core.routing import Priority, RoutingConfig, allowed_mask, route_batch
from adaptive_quant.data import make_synthetic
from adaptive_quant.evaluation.offline import EvalOptions, EvaluationError, evaluate_repository, pick_samples
from adaptive_quant.evaluation.render import log_report_to_mlflow, write_report
from gateway_repo import VAL_ACCURACY, _weights, build_repo, make_int8
from http_server import serve_in_thread  # tests/http_server.py

ROOT = Path(__file__).resolve().parents[1]

FAST = dict(latency_iters=10, throughput_seconds=0.05, threads=1, progress=False)


def _add_ptq_baseline(root: Path) -> None:
    """A non-served INT8 baseline beside the QAT one, as export writes it (other weights: other answers)."""
    w = {k: v + np.random.default_rng(7).normal(0, 0.05, v.shape).astype(np.float32) for k, v in _weights().items()}
    path = root / "tiny_int8_ptq" / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    onnx.save(make_int8(w), path)
    manifest = load_manifest(root)
    manifest.variants["int8_ptq"] = VariantEntry(
        key="int8_ptq",
        precision="int8",
        triton_name="tiny_int8_ptq",
        path=str(path.relative_to(root)),
        sha256=sha256_file(path),
        size_bytes=path.stat().st_size,
        served=False,
        val_accuracy=0.9,
    )
    save_manifest(root, manifest)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = build_repo(tmp_path_factory.mktemp("repo"))
    _add_ptq_baseline(root)
    return root


@pytest.fixture(scope="module")
def test_split():
    return make_synthetic(160, seed=3)


@pytest.fixture(scope="module")
def report(repo, test_split):
    return evaluate_repository(repo, test_split, EvalOptions(**FAST))


def _logits(repo, key, images):
    manifest = load_manifest(repo)
    sess = ort.InferenceSession(str(repo / manifest.variants[key].path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"images": to_model_input(images, manifest.mean, manifest.std)})[0]


def test_every_section_and_plot(report, tmp_path):
    files = {f.name for f in write_report(report, tmp_path)}
    assert {"report.md", "report.json", "pareto_latency.png", "pareto_throughput.png", "sweep.png"} <= files
    assert {f"confusion_{k}.png" for k in ("fp32", "fp16", "int8", "int8_ptq")} <= files
    for f in files:
        assert (tmp_path / f).stat().st_size > 0
    md = (tmp_path / "report.md").read_text()
    for heading in (
        "## Verdict",
        "## Setup",
        "How latency is modelled",
        "## Per variant",
        "### int8_ptq: per class",
        "## Adaptive routing",
        "## Baselines",
        "## Pareto frontier",
    ):
        assert heading in md
    for name in ("airplane", "truck", "oracle", "cascade int8→fp32", "no (baseline)"):
        assert name in md
    assert "Single-stage routing, as the gateway routes without a router" in md and "two_stage.md" in md
    data = json.loads((tmp_path / "report.json").read_text())
    assert {v["key"] for v in data["variants"]} == {"fp32", "fp16", "int8", "int8_ptq"}
    strategies = {p["strategy"] for p in data["points"]}
    assert strategies == {"fixed", "adaptive", "oracle", "confidence"}
    budgets = data["meta"]["budgets_ms"]
    adaptive = [p for p in data["points"] if p["strategy"] == "adaptive"]
    assert len(adaptive) == 3 * (len(budgets) + 1)  # three priorities × (budgets + no budget)
    assert data["verdict"] and any(p["on_latency_frontier"] for p in data["points"])
    assert data["meta"]["single_stage"]["accuracy"] == VAL_ACCURACY  # the served variants' priors, not int8_ptq's


def test_fixed_variant_numbers_equal_an_independent_count(repo, test_split, report):
    fp32 = next(v for v in report.variants if v.key == "fp32")
    pred = _logits(repo, "fp32", test_split.images).argmax(1)
    labels = test_split.labels
    assert fp32.metrics.accuracy == pytest.approx(sum(int(p == y) for p, y in zip(pred, labels)) / len(labels))
    for c, row in enumerate(fp32.metrics.confusion):
        assert row == [sum(1 for p, y in zip(pred, labels) if y == c and p == k) for k in range(10)]
    for c, cls in enumerate(fp32.metrics.per_class):
        tp = sum(1 for p, y in zip(pred, labels) if p == c and y == c)
        predicted, support = sum(1 for p in pred if p == c), sum(1 for y in labels if y == c)
        assert cls.support == support
        assert cls.precision == pytest.approx(tp / predicted if predicted else 0.0)
        assert cls.recall == pytest.approx(tp / support if support else 0.0)
    assert fp32.accuracy_drop_points == 0.0
    int8 = next(v for v in report.variants if v.key == "int8")
    assert int8.accuracy_drop_points == pytest.approx(100 * (fp32.metrics.accuracy - int8.metrics.accuracy))
    fixed = next(p for p in report.points if p.label == "fixed fp32")
    assert fixed.accuracy == pytest.approx(fp32.metrics.accuracy)
    assert fixed.throughput == pytest.approx(fp32.throughput_b64)
    lat = fp32.latency_ms
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert fp32.size_bytes == (repo / load_manifest(repo).variants["fp32"].path).stat().st_size


def test_routed_and_baseline_points_agree_with_an_independent_count(repo, test_split, report):
    """The sweep routes through route_batch on the manifest's accuracies as production does without
    a router; every strategy's accuracy and mix equal a count made here from the variants' own answers."""
    keys = ["fp32", "fp16", "int8"]
    logits = {k: _logits(repo, k, test_split.images) for k in keys}
    correct = np.stack([logits[k].argmax(1) == test_split.labels for k in keys], axis=1)
    pred_acc = np.tile([VAL_ACCURACY[k] for k in keys], (len(test_split), 1))  # the same for every sample
    est = np.array([report.meta["router_estimates_ms"][k] for k in keys])
    allowed = allowed_mask(keys, None)
    rows = np.arange(len(test_split))
    for p in report.points_of("adaptive"):
        idx = route_batch(pred_acc, est, allowed, p.budget_ms, Priority(p.priority), RoutingConfig()).index
        assert p.accuracy == pytest.approx(correct[rows, idx].mean())
        assert all(p.mix[k] == pytest.approx((idx == j).mean()) for j, k in enumerate(keys))
    # one variant per point: single-stage routing knows nothing that tells samples apart
    assert all(max(p.mix.values()) == 1.0 for p in report.points_of("adaptive"))
    assert "never mixed variants" in report.verdict
    right = {k: correct[:, j] for j, k in enumerate(keys)}
    assert report.points_of("oracle")[0].accuracy == pytest.approx(correct.any(axis=1).mean())
    z = logits["int8"]  # float32, as ONNX Runtime returns it and the cascade reads it
    e = np.exp(z - z.max(axis=1, keepdims=True))
    top = (e / e.sum(axis=1, keepdims=True)).max(axis=1)  # int8's top-1 softmax probability
    for p in report.points_of("confidence"):
        up = top < p.param  # escalated to fp32
        assert p.accuracy == pytest.approx(np.where(up, right["fp32"], right["int8"]).mean())
        assert p.mix["fp32"] == pytest.approx(up.mean()) and p.escalated == pytest.approx(up.mean())


def test_frontier_marks_no_dominated_point(report):
    cand = [p for p in report.points if p.deployable]
    for p in cand:
        dominated = any(
            q.accuracy >= p.accuracy and q.mean_ms <= p.mean_ms and (q.accuracy > p.accuracy or q.mean_ms < p.mean_ms)
            for q in cand
        )
        assert p.on_latency_frontier == (not dominated)
    assert not any(p.on_latency_frontier for p in report.points if not p.deployable)


def test_a_limit_and_given_budgets_are_what_is_evaluated(tmp_path, test_split):
    root = build_repo(tmp_path / "bare")
    r = evaluate_repository(root, pick_samples(test_split, 40, 0), EvalOptions(**FAST, budgets=[50.0]))
    assert r.meta["samples"] == 40 and r.meta["single_stage"]["source"] == "manifest"
    assert r.meta["budgets_ms"] == [50.0]
    assert {p.budget_ms for p in r.points_of("adaptive")} == {50.0, None}


def test_missing_repository_is_named(tmp_path, test_split):
    with pytest.raises(EvaluationError, match="nowhere.*does not exist"):
        evaluate_repository(tmp_path / "nowhere", test_split, EvalOptions(**FAST))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="manifest.json does not exist"):
        evaluate_repository(tmp_path / "empty", test_split, EvalOptions(**FAST))


def test_mlflow_evaluation_run(report, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    files = write_report(report, tmp_path / "out")
    cfg = TrackingConfig(tracking_uri=uri, artifact_root=str(tmp_path / "artifacts"), experiment="eval-test")
    run_id = log_report_to_mlflow(cfg, report, files)
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.tags["phase"] == "evaluation"
    assert run.data.metrics["fp32/accuracy"] == pytest.approx(report.variants[0].metrics.accuracy)
    logged = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.md", "report/report.json", "report/pareto_latency.png"} <= logged


def test_cli_writes_report_and_names_missing_things(repo, tmp_path, capsys):
    from adaptive_quant.cli import evaluate

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        "seed: 1\ndata: {source: synthetic, synthetic_train: 300, synthetic_test: 80, val_size: 50}\n"
        "tracking: {enabled: false}\n"
    )
    common = [
        "--config",
        str(cfg),
        "--serve-config",
        str(ROOT / "configs" / "serve.yaml"),
        "--latency-iters",
        "10",
        "--throughput-seconds",
        "0.05",
        "--threads",
        "1",
        "--no-progress",
        "--log-level",
        "WARNING",
    ]
    assert evaluate.main(["--repository", str(repo), "--out", str(tmp_path / "r"), "--limit", "30", *common]) == 0
    assert (tmp_path / "r" / "report.md").is_file()
    assert "Pareto frontier" in capsys.readouterr().out
    assert evaluate.main(["--repository", str(tmp_path / "missing"), "--out", str(tmp_path / "r2"), *common]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    assert "--checkpoint" in capsys.readouterr().out


@contextmanager
def http_server(settings):
    from adaptive_quant.serving.app import create_app

    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_url_mode_against_a_real_server(repo, test_split, tmp_path):
    from adaptive_quant.evaluation.over_http import evaluate_url
    from adaptive_quant.serving.settings import load_settings

    # ewma 0: routing follows the manifest's profiles (int8 30 ms, fp32 80 ms, fp16 90 ms p95 at batch 1)
    settings = load_settings(overrides={"repository": str(repo), "latency.ewma_alpha": 0.0}, environ={})
    with http_server(settings) as url:
        r = evaluate_url(
            url,
            test_split,
            EvalOptions(**FAST, limit=12, budgets=[40.0], priorities=(Priority.BALANCED, Priority.QUALITY)),
        )
    floor = r.points_of("fixed")[0]
    assert floor.mix["fp32"] == 1.0  # X-Min-Precision fp32 pins the service to fp32
    at40 = [p for p in r.points_of("http") if p.budget_ms == 40.0]
    assert at40 and all(p.mix["int8"] == 1.0 for p in at40)  # only int8's 30 ms estimate fits 40 ms
    sub = pick_samples(test_split, 12, 0)
    want = (_logits(repo, "int8", sub.images).argmax(1) == sub.labels).mean()
    assert at40[0].accuracy == pytest.approx(want)  # accuracy from labels, over HTTP
    assert r.service_metrics is not None and r.service_metrics.samples == 12
    files = {f.name for f in write_report(r, tmp_path)}
    assert {"report.md", "report.json", "pareto_latency.png", "confusion_service.png", "sweep.png"} <= files
