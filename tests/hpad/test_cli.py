"""The library CLI end to end on a generated MVTec-layout category and the tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpad.artifact import read_artifact
from hpad.cli import main
from hpad.masks import decode_mask_png
from tests.synthetic import write_mvtec_category

TINY = ["--model", "hpad-tiny", "--random-init"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    write_mvtec_category(root, "widget", n_train=4, n_test_good=3, n_test_defect=3, defect_types=("scratch", "blob"))
    return root


def test_usage_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("score", "eval", "train", "oagm", "serve", "camera", "tune", "prompts", "weights"):
        assert command in out
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


class _EntryPoint:
    def __init__(self, name: str, value: str) -> None:
        self.name, self.value = name, value


def test_service_commands_are_discovered_from_entry_points(monkeypatch, capsys):
    import hpad.cli as cli

    groups: list[str] = []

    def fake_entry_points(group: str):
        groups.append(group)
        return [_EntryPoint("serve", "tests.hpad.test_cli:_fake_serve"), _EntryPoint("score", "elsewhere:main")]

    monkeypatch.setattr(cli, "entry_points", fake_entry_points)
    monkeypatch.setattr(cli, "SOURCE_TREE", None)  # an installed hpad, not a checkout
    assert set(cli.service_commands()) == {"serve"}  # a library command cannot be replaced
    assert groups == ["hpad.commands"]
    assert main(["serve", "--flag"]) == 7
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "serve" in out and "tests.hpad.test_cli:_fake_serve" in out and "not installed" not in out


def test_an_uninstalled_checkout_reads_the_table_from_its_pyproject(monkeypatch, tmp_path):
    """PYTHONPATH=<checkout> without pip install (the GPU machine): the same table, from pyproject.toml."""
    import tomllib

    import hpad.cli as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    declared = tomllib.loads((cli.SOURCE_TREE / "pyproject.toml").read_text())["project"]["entry-points"]
    assert {n: c.target for n, c in cli.service_commands().items()} == declared["hpad.commands"]
    assert cli.service_commands()["serve"].target == "consumers.app:main"
    # a checkout beside an older install (a git worktree): the checkout's table wins and adds its new commands
    monkeypatch.setattr(cli, "entry_points", lambda group: [_EntryPoint("serve", "old.install:main"),
                                                            _EntryPoint("gone", "old.install:gone")])
    found = {n: c.target for n, c in cli.service_commands().items()}
    assert found == {**{"gone": "old.install:gone"}, **declared["hpad.commands"]}
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n[project.entry-points."hpad.commands"]\n'
                                             'serve = "x:y"\n')
    monkeypatch.setattr(cli, "SOURCE_TREE", tmp_path)
    assert cli.service_commands() == {}  # another project's pyproject is not ours
    (tmp_path / "pyproject.toml").write_text("not toml [")
    assert cli.service_commands() == {}


def _fake_serve(argv) -> int:
    assert list(argv) == ["--flag"]
    return 7


def test_service_commands_not_installed_are_a_clear_error(monkeypatch, capsys):
    import hpad.cli as cli

    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    monkeypatch.setattr(cli, "SOURCE_TREE", None)  # not run from a checkout either
    assert main(["--help"]) == 0
    assert "hpad[service]" in capsys.readouterr().out
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'serve'" in err and "hpad[service]" in err
    monkeypatch.setattr(cli, "entry_points", lambda group: [_EntryPoint("serve", "no_such_service_module:main")])
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "hpad[service]" in err and "no_such_service_module" in err


def test_library_imports_no_service_code():
    """hpad/ imports neither Kafka, settings nor Prometheus code, nor the service packages."""
    import subprocess
    import sys

    modules = ["hpad.cli", "hpad.commands", "hpad.oagm_cli", "hpad.training", "hpad.config", "hpad.evaluate"]
    code = (f"import sys; import {', '.join(modules)}; "
            "bad = {'kafka', 'pydantic', 'pydantic_settings', 'prometheus_client', 'consumers', 'tuner'} & "
            "{name.split('.')[0] for name in sys.modules}; print(sorted(bad))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    for path in Path(__file__).resolve().parents[2].joinpath("hpad").rglob("*.py"):
        text = path.read_text()
        for name in ("consumers", "tuner", "kafka", "pydantic_settings", "prometheus_client"):
            assert f"import {name}" not in text and f"from {name}" not in text, (path, name)


def test_score_prints_json_and_writes_masks(dataset, tmp_path, capsys):
    images = sorted((dataset / "widget" / "test").rglob("*.png"))[:3]
    assert main(["score", *map(str, images), *TINY, "--mask-out", str(tmp_path)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    for line in lines:
        assert 0.0 <= line["pred_score"] <= 1.0 and "random weights" in line["weights"]
        mask_path = Path(line["mask"])
        assert mask_path.parent == tmp_path
        assert decode_mask_png(mask_path.read_bytes()).shape == (96, 96)


def test_eval_writes_metrics_table_and_overlays(dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(dataset), "--category", "widget", "--shots", "2", *TINY,
                 "--out", str(out), "--overlays", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["metrics"]) == {"image_AUROC", "pixel_AUROC", "AUPRO", "image_F1Max", "pixel_F1Max"}
    assert set(metrics["per_defect_type"]) == {"scratch", "blob"}
    assert metrics["random_weights"] is True and metrics["shots"] == 2 and len(metrics["shot_images"]) == 2
    assert len(metrics["images"]) == 3 + 2 * 3
    assert "Random weights" in (out / "metrics.md").read_text()
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert "image_AUROC" in capsys.readouterr().out


def test_train_then_eval_with_the_artifact(dataset, tmp_path, capsys):
    artifact_path = tmp_path / "widget.safetensors"
    assert main(["train", "--data", str(dataset), "--category", "widget", "--shots", "2", "--seed", "3",
                 *TINY, "--out", str(artifact_path), "--epochs", "3", "--steps-per-epoch", "2",
                 "--train-normals", "8", "--train-anomalies", "8"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["k"] == 2 and "random weights" in summary["weights"]
    artifact = read_artifact(artifact_path, expected_identity="hpad-tiny/random-init")
    manifest = artifact.manifest
    assert manifest["k"] == 2 and manifest["seed"] == 3 and manifest["category"] == "widget"
    assert manifest["laa"] == {"enabled": True, "layers": 4, "radius": 1, "dual_path": True, "kernel": "vv",
                               "patch_mlp": False}
    assert manifest["method"]["laa"] == manifest["laa"] and manifest["method"]["fusion"] == "harmonic"
    assert manifest["method"]["memory_blocks"] == [1, 3] and len(manifest["fusion_scales"]) == 4
    assert manifest["training"]["config"]["mpts"] is True and manifest["random_weights"] is True
    assert set(manifest["training"]) == {"config", "metrics", "history_tail"}
    assert set(manifest["training"]["metrics"]["val_after"]) == {"image_AUROC", "pixel_AUROC", "loss"}
    assert "image_F1Max" in manifest["training"]["metrics"]["calibration"]
    assert summary["val_after"]["image_AUROC"] == manifest["training"]["metrics"]["val_after"]["image_AUROC"]
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(dataset), "--category", "widget", *TINY, "--prompts", str(artifact_path),
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompt_source"] == "learned" and metrics["few_shot_memory"] is True


def test_artifact_for_other_laa_is_refused(dataset, tmp_path, capsys):
    artifact_path = tmp_path / "widget.safetensors"
    assert main(["train", "--data", str(dataset), "--category", "widget", "--shots", "1", *TINY, "--no-laa",
                 "--out", str(artifact_path), "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    capsys.readouterr()
    assert main(["eval", "--data", str(dataset), "--category", "widget", *TINY, "--prompts", str(artifact_path),
                 "--out", str(tmp_path / "e")]) == 2
    assert "LAA" in capsys.readouterr().err


def test_missing_weights_and_bad_data_are_clear_errors(dataset, tmp_path, capsys):
    assert main(["score", str(tmp_path / "x.png"), "--pretrained", "laion400m_e32",
                 "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not available" in err and "--checkpoint" in err
    assert main(["eval", "--data", str(dataset), "--category", "nope", *TINY, "--out", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err
