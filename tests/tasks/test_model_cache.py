"""The registry download cache: a version is found by registry, name and version, never by
name and version alone (two registries may share a workspace and both have a version 1)."""

from __future__ import annotations

import json
from pathlib import Path

from tasks import tracking

REPO = Path(__file__).resolve().parents[2]


def _register(uri: str, tmp_path: Path, marker: str, experiment: str = "cache-test") -> str:
    c = tracking.client(uri)
    folder = tmp_path / f"model-{marker}"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"marker": marker}))
    experiment_id = tracking.ensure_experiment(c, experiment, (tmp_path / f"artifacts-{marker}").as_uri())
    run_id = tracking.start_run(c, experiment_id, "step-0")
    version = tracking.register(c, "shared-name", run_id, str(folder), {"sdpo.step": "0"})
    tracking.point_aliases(c, "shared-name", {0: version})  # as a finished run does
    return version


def test_two_registries_in_one_workspace_do_not_share_a_cached_version(tmp_path: Path) -> None:
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    assert _register(first, tmp_path, "a") == _register(second, tmp_path, "b") == "1"
    cache = tmp_path / "cache"
    dir_a, version_a = tracking.fetch_model(first, "models:/shared-name/1", cache)
    dir_b, version_b = tracking.fetch_model(second, "models:/shared-name@step-0", cache)
    assert version_a == version_b == "1"
    assert dir_a != dir_b
    assert json.loads((Path(dir_a) / "config.json").read_text()) == {"marker": "a"}
    assert json.loads((Path(dir_b) / "config.json").read_text()) == {"marker": "b"}
    # A second fetch is served from the cache: the same folder.
    assert tracking.fetch_model(first, "models:/shared-name/1", cache)[0] == dir_a


def test_a_recreated_registered_model_is_not_served_from_the_cache(tmp_path: Path) -> None:
    """A registered model deleted and made again (or a registry rebuilt at the same URI) numbers
    its versions from 1 again: the new version 1 is another model, and the cache must not hand
    back the old one."""
    uri = f"sqlite:///{tmp_path / 'a.db'}"
    cache = tmp_path / "cache"
    _register(uri, tmp_path, "old")
    old_dir, _ = tracking.fetch_model(uri, "models:/shared-name/1", cache)
    tracking.client(uri).delete_registered_model("shared-name")
    assert _register(uri, tmp_path, "new", experiment="cache-test-new") == "1"
    new_dir, version = tracking.fetch_model(uri, "models:/shared-name/1", cache)
    assert version == "1" and new_dir != old_dir
    assert json.loads((Path(new_dir) / "config.json").read_text()) == {"marker": "new"}


def test_scores_are_cached_per_tokenizer_too(tmp_path) -> None:
    """The same weights under another chat template tokenize, and so score, a file differently:
    the scores cache must not hand back the other tokenizer's numbers."""
    import shutil

    from sdpo_core.config import load_config
    from tasks.context import RunContext
    from tasks.scores import scores_path

    cfg = load_config(REPO / "recipes" / "default.yaml")
    ctx = RunContext(str(tmp_path), str(tmp_path / "runs" / "r"), "sqlite:///x.db", "0", "p", "m")
    plain = tmp_path / "plain"
    shutil.copytree(REPO / "models" / "stories260K", plain)
    templated = tmp_path / "templated"
    shutil.copytree(plain, templated)
    (templated / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c", "source": "s"}\n')
    assert scores_path(cfg, ctx, str(plain), pairs) != scores_path(cfg, ctx, str(templated), pairs)
    assert scores_path(cfg, ctx, str(plain), pairs) == scores_path(cfg, ctx, str(tmp_path / "plain"), pairs)
