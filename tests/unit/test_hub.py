"""The hub: section: the model card of a finished run and the push, against a local stand-in of the Hub
(``FakeHub``: no network call is ever made)."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sparring import hub
from sparring.config import ConfigError, load_config
from sparring.state import RunDir

TABLE = "| model | held-out exact match |\n|---|---|\n| initial | 0.100 |\n| iter0 | 0.200 |"
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class FakeHub:
    """A stand-in for huggingface_hub.HfApi: records create_repo / create_branch / upload_folder and copies
    each uploaded folder to ``remote/<repo_id>/<revision or main>``. Every call is checked against the
    real HfApi method's signature."""

    def __init__(self, remote: Path):
        self.remote, self.calls = remote, []

    def _record(self, name: str, *args, **kwargs) -> None:
        from huggingface_hub.hf_api import HfApi  # the class itself, even where a test replaced huggingface_hub.HfApi

        inspect.signature(getattr(HfApi, name)).bind(HfApi, *args, **kwargs)  # TypeError if HfApi would refuse it
        self.calls.append((name, args, kwargs))

    def create_repo(self, *args, **kwargs):
        self._record("create_repo", *args, **kwargs)

    def create_branch(self, *args, **kwargs):
        self._record("create_branch", *args, **kwargs)

    def upload_folder(self, **kwargs):
        self._record("upload_folder", **kwargs)
        target = self.remote / kwargs["repo_id"] / (kwargs.get("revision") or "main")
        shutil.copytree(kwargs["folder_path"], target, dirs_exist_ok=True)
        return SimpleNamespace(commit_url=f"https://hub.invalid/{kwargs['repo_id']}/commit/{len(self.calls)}")

    def named(self, name: str) -> list[tuple[tuple, dict]]:
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


def run_config(tmp_path: Path, method: str = "spin", *overrides: str):
    data = {} if method == "lsp" else {"data": {"source": "org/dataset", "num_prompts": 32}}
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump({"method": method, "output_dir": str(tmp_path / "run"),
                                    "model": {"name_or_path": "org/base-model"}, **data}))
    return load_config(path, ["hub.push=true", "hub.repo_id=me/tiny", *overrides])


def finished_run(tmp_path: Path, cfg) -> RunDir:
    """A run directory as a finished run leaves it: results.md (table, then samples), plot.png, θ_T's folder."""
    rd = RunDir(cfg.output_dir)
    folder = hub.final_model(rd, cfg)
    folder.mkdir(parents=True)
    for name in MODEL_FILES:
        (folder / name).write_text(name)
    rd.results.write_text(TABLE + "\n\n## Samples\n\nprompt: secret sample text\n")
    rd.plot.write_bytes(b"\x89PNG fake")
    return rd


def test_the_card_names_method_paper_base_data_results_plot_and_config(tmp_path):
    cfg = run_config(tmp_path, "spin", "spin.iterations=2")
    rd = finished_run(tmp_path, cfg)
    card = hub.model_card(cfg, table=hub.results_table(rd), plot=True)
    text = str(card)
    assert card.data.library_name == "transformers" and {"sparring", "spin"} <= set(card.data.tags)
    assert card.data.base_model == "org/base-model" and card.data.datasets == ["org/dataset"]
    assert "# me/tiny" in text and "Self-Play Fine-Tuning Converts Weak Language Models" in text
    assert "https://arxiv.org/abs/2401.01335" in text and "Chen et al." in text
    assert "`org/base-model`" in text and "`org/dataset`" in text and "the first 32 rows" in text
    assert TABLE in text and "secret sample text" not in text  # results.md's table, not its samples
    assert "](plot.png)" in text
    config = yaml.safe_load(text.split("```yaml\n")[1].split("```")[0])
    assert config["method"] == "spin" and config["spin"]["iterations"] == 2 and config["hub"]["repo_id"] == "me/tiny"


def test_lsp_and_sft_cards_and_local_paths_kept_out_of_the_metadata(tmp_path):
    lsp = run_config(tmp_path, "lsp", "lsp.variant=self_reward")
    text = str(hub.model_card(lsp))
    assert "LSP, self-reward" in text and "Language Self-Play For Data-Free Training" in text
    assert "arxiv.org/abs/2509.07414" in text and "no training data" in text and "## Results" not in text
    sft = run_config(tmp_path, "sft", f"model.name_or_path={tmp_path}")  # a local folder: no base_model metadata
    card = hub.model_card(sft)
    assert "- **Method**: SFT\n" in str(card) and card.data.base_model is None


def test_push_run_uploads_the_final_model_with_card_and_plot(tmp_path):
    cfg = run_config(tmp_path, "tpaw", "tpaw.iterations=3")
    rd = finished_run(tmp_path, cfg)
    api = FakeHub(tmp_path / "remote")
    url = hub.push_run(rd, cfg, api=api)
    assert url.startswith("https://hub.invalid/me/tiny/commit/")
    assert api.named("create_repo") == [(("me/tiny",), {"private": True, "repo_type": "model", "exist_ok": True})]
    assert api.named("create_branch") == []  # hub.revision None: main
    ((_, upload),) = api.named("upload_folder")
    assert upload["repo_id"] == "me/tiny" and upload["revision"] is None and Path(upload["folder_path"]) == rd.model(2)
    remote = tmp_path / "remote" / "me" / "tiny" / "main"
    assert sorted(p.name for p in remote.iterdir()) == sorted([*MODEL_FILES, "README.md", "plot.png"])
    assert (remote / "plot.png").read_bytes() == rd.plot.read_bytes() and TABLE in (remote / "README.md").read_text()


def test_push_to_a_branch_and_a_public_repo_and_an_iteration_to_its_branch(tmp_path):
    cfg = run_config(tmp_path, "spin", "spin.iterations=1", "hub.revision=dev", "hub.private=false",
                     "hub.push_iterations=true")
    rd = finished_run(tmp_path, cfg)
    api = FakeHub(tmp_path / "remote")
    hub.push_run(rd, cfg, api=api)
    hub.push_iteration(rd, cfg, 0, api=api)
    assert [kw["private"] for _, kw in api.named("create_repo")] == [False, False]
    assert [kw["branch"] for _, kw in api.named("create_branch")] == ["dev", "iter-1"]
    assert [kw["revision"] for _, kw in api.named("upload_folder")] == ["dev", "iter-1"]
    card = (tmp_path / "remote" / "me" / "tiny" / "iter-1" / "README.md").read_text()
    assert "θ_1, after iteration 0" in card and "```yaml" in card


@pytest.mark.parametrize(("overrides", "message"), [
    (["hub.push=true"], "hub.push needs hub.repo_id"),
    (["hub.repo_id=me/m", "hub.push_iterations=true"], "set hub.push too"),
])
def test_hub_settings_that_cannot_push_are_config_errors(tmp_path, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"source": "d"}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_push_iterations_is_refused_for_a_method_without_iterations(tmp_path):
    with pytest.raises(ConfigError, match="lsp has no iterations to push"):
        run_config(tmp_path, "lsp", "hub.push_iterations=true")


def test_a_run_that_could_not_push_at_its_end_is_refused_before_it_starts(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = run_config(tmp_path, "spin")
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: True)
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):
        hub.check_can_push(cfg)
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="needs a Hugging Face token"):
        hub.check_can_push(cfg)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stand_in")
    hub.check_can_push(cfg)
    hub.check_can_push(run_config(tmp_path, "spin", "hub.push=false"))  # nothing to check without a push
