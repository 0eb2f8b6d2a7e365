"""Pushing a run's model to the Hugging Face Hub (the ``hub:`` section), with a generated model card.

At the end of a run (``stages.end_run``, after the report) the main process pushes the final model —
SPIN / T-SPIN / TPAW: θ_T (``run_dir.model(T − 1)``), SFT: ``run_dir.model(0)``, LSP:
``run_dir.final_model`` — to ``hub.repo_id`` at ``hub.revision`` (default main). The folder gets a
README.md model card (``model_card``: method and paper, base model, data, the results table of
results.md, plot.png, the config as YAML) and plot.png, and is uploaded whole with
``HfApi.upload_folder`` after ``create_repo(exist_ok=True)``. With ``hub.push_iterations``, θ_{t+1} is
pushed after every iteration t to the branch ``iter-<t+1>`` (``push_iteration``).

The token is huggingface_hub's: HF_TOKEN or ``hf auth login``; nothing here writes one.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sparring.config import ConfigError, RunConfig, dump_yaml
from sparring.state import RunDir


@dataclass(frozen=True)
class Paper:
    title: str
    authors: str
    venue: str
    arxiv: str

    def cite(self) -> str:
        return f"[{self.title}](https://arxiv.org/abs/{self.arxiv}) ({self.authors}, {self.venue}, arXiv {self.arxiv})"


PAPERS = {
    "spin": Paper("Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models", "Chen et al.",
                  "ICML 2024", "2401.01335"),
    "tspin": Paper("Triplets Better Than Pairs: Towards Stable and Effective Self-Play Fine-Tuning for LLMs", "Wang et al.", "NeurIPS 2025", "2601.08198"),
    "tpaw": Paper("Team-Based Self-Play With Dual Adaptive Weighting for Fine-Tuning LLMs", "Li et al.", "ACL 2026", "2605.09922"),
    "lsp": Paper("Language Self-Play For Data-Free Training", "Kuba et al.", "2025", "2509.07414"),
}
METHOD_NAMES = {"spin": "SPIN", "tspin": "T-SPIN", "tpaw": "TPAW", "lsp": "LSP", "sft": "SFT"}


def check_can_push(cfg: RunConfig) -> None:
    """With hub.push, refuse a run that could not push at its end (offline, or no token) before it trains."""
    if not cfg.hub.push:
        return
    from huggingface_hub import constants, get_token

    if constants.is_offline_mode():
        raise ConfigError("hub.push needs the Hub, but HF_HUB_OFFLINE is set: unset it, or set hub.push=false")
    if get_token() is None:
        raise ConfigError("hub.push needs a Hugging Face token: set HF_TOKEN or run `hf auth login` (the config never "
                          "holds one)")


def final_model(run_dir: RunDir, cfg: RunConfig) -> Path:
    """The model a finished run pushes: LSP's final policy, else the last iteration's θ_{t+1}."""
    if cfg.method == "lsp":
        return run_dir.final_model
    return run_dir.model(getattr(getattr(cfg, cfg.method, None), "iterations", 1) - 1)


def results_table(run_dir: RunDir) -> str | None:
    """The table at the top of results.md (the report's samples section follows a blank line)."""
    if not run_dir.results.exists():
        return None
    return run_dir.results.read_text().strip().split("\n\n")[0] or None


def method_line(cfg: RunConfig) -> str:
    name = METHOD_NAMES.get(cfg.method, cfg.method)
    if cfg.method == "lsp":
        name += f" ({'LSP-Zero' if cfg.lsp.variant == 'zero' else 'LSP, self-reward'})"
    paper = PAPERS.get(cfg.method)
    return f"{name}, from {paper.cite()}" if paper else name


def data_line(cfg: RunConfig) -> str:
    if cfg.method == "lsp":
        source = f"prompts from `{cfg.lsp.prompts}`" if cfg.lsp.query_source == "data" else \
            "no training data: the model writes its own queries (challenger) and answers them (solver)"
        return f"{source}; reward: {cfg.lsp.reward.kind}"
    rows = "all rows" if cfg.data.num_prompts is None else f"the first {cfg.data.num_prompts} rows after shuffling"
    return f"`{cfg.data.source}` (split `{cfg.data.split}`, {rows})"


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hub repo id rather than a local path (card metadata takes ids only)."""
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def model_card(cfg: RunConfig, *, title: str | None = None, table: str | None = None,
               plot: bool = False):
    """The model card (README.md) of the run's model: metadata (library, tags, base model and data set
    when they are Hub ids), what trained it, on what, the results ``table`` and plot, and the config."""
    from huggingface_hub import ModelCard, ModelCardData

    base = cfg.model.name_or_path
    data = cfg.data.source if cfg.method != "lsp" else None
    meta = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation",
        tags=["sparring", cfg.method, "self-play" if cfg.method != "sft" else "sft"],
        base_model=base if is_hub_id(base) else None, datasets=[data] if is_hub_id(data) else None,
    )
    lines = [
        f"# {title or cfg.hub.repo_id or Path(cfg.output_dir).name}", "",
        f"Fine-tuned from `{base}` with sparring (self-play fine-tuning on the Hugging Face stack).", "",
        f"- **Method**: {method_line(cfg)}",
        f"- **Base model**: `{base}`" + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- **Training data**: {data_line(cfg)}",
        f"- **Held-out evaluation**: `{cfg.eval.source}`" if cfg.eval.source else "- **Held-out evaluation**: none",
        "",
    ]
    if table:
        lines += ["## Results", "", "One row per model (θ0 first), from the run's results.md.", "", table, ""]
    if plot:
        lines += ["![held-out metric and training signal of the run](plot.png)", ""]
    lines += ["## Config", "", "The run's config.yaml (`sparring run config.yaml` runs it again):", "", "```yaml", dump_yaml(cfg).rstrip(),
              "```", ""]
    return ModelCard(f"---\n{meta.to_yaml()}\n---\n\n" + "\n".join(lines))


def push_folder(folder: Path, cfg: RunConfig, card, *, revision: str | None, message: str, api=None,
                plot: Path | None = None) -> str:
    """``folder`` (a saved model) with ``card`` as its README.md (and ``plot`` as plot.png) uploaded to
    ``hub.repo_id`` at ``revision`` (a branch, created when missing; None: main). Returns the commit URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    hub = cfg.hub
    card.save(folder / "README.md")
    if plot is not None and plot.exists():
        shutil.copyfile(plot, folder / "plot.png")
    api.create_repo(hub.repo_id, private=hub.private, repo_type="model", exist_ok=True)
    if revision is not None:
        api.create_branch(hub.repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(repo_id=hub.repo_id, folder_path=folder, repo_type="model", revision=revision,
                             commit_message=message)
    return str(getattr(info, "commit_url", info))


def push_run(run_dir: RunDir, cfg: RunConfig, folder: Path | None = None, *, api=None) -> str:
    """The finished run's final model, its card (with results.md's table and plot.png), to the Hub."""
    folder = folder or final_model(run_dir, cfg)
    table = results_table(run_dir)
    card = model_card(cfg, table=table, plot=run_dir.plot.exists())
    url = push_folder(folder, cfg, card, revision=cfg.hub.revision, api=api, plot=run_dir.plot,
                      message=f"sparring: {cfg.method} run {Path(cfg.output_dir).name}")
    print(f"pushed {folder} to {cfg.hub.repo_id}: {url}")
    return url


def iteration_revision(t: int) -> str:
    """The branch θ_{t+1}, the model of iteration t, is pushed to with hub.push_iterations."""
    return f"iter-{t + 1}"


def push_iteration(run_dir: RunDir, cfg: RunConfig, t: int, *, api=None) -> str:
    """θ_{t+1} (``run_dir.model(t)``), after iteration t, to the branch ``iteration_revision(t)``."""
    revision = iteration_revision(t)
    name = f"{cfg.hub.repo_id} @ {revision}"
    card = model_card(cfg, title=f"{name}: θ_{t + 1}, after iteration {t}")
    url = push_folder(run_dir.model(t), cfg, card, revision=revision, api=api,
                      message=f"sparring: {cfg.method} iteration {t} (θ_{t + 1})")
    print(f"pushed {run_dir.model(t)} to {name}: {url}")
    return url
