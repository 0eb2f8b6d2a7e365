"""Command line: ``sparring run | sft | status | report | export | data check | experiment``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparring", description="Self-play fine-tuning of language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every iteration of a method; rerun to resume")
    run.add_argument("config", nargs="?", help="YAML config (default: the built-in quickstart)")
    run.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-6 spin.iterations=2")
    run.add_argument("--force", action="store_true", help="resume even if result-affecting settings changed")
    sft = sub.add_parser("sft", help="supervised fine-tuning (method: sft) on any data; no config: build the proving ground")
    sft.add_argument("config", nargs="?", help="YAML config with method: sft (default: build the proving ground)")
    sft.add_argument("overrides", nargs="*")
    sft.add_argument("--force", action="store_true", help="resume even if result-affecting settings changed")
    status = sub.add_parser("status", help="which stages of a run are done")
    status.add_argument("run_dir")
    report = sub.add_parser("report", help="rewrite a run's results table and plot")
    report.add_argument("run_dir")
    export = sub.add_parser("export", help="answer a benchmark's prompts with every model of a run, in the "
                                           "answer format the benchmark reads")
    export.add_argument("run_dir")
    export.add_argument("prompts", help="AlpacaEval's eval set (json/jsonl, \"instruction\") or MT-Bench's question.jsonl")
    export.add_argument("--format", required=True, choices=["alpaca_eval", "mt_bench"], dest="fmt")
    export.add_argument("--iterations", choices=["all", "last"], default="all",
                        help="every model θ0 … θT (LSP: kept steps and the final policy), or the newest alone")
    export.add_argument("--out", help="folder of the answer files (default RUN_DIR/export/FORMAT)")
    export.add_argument("--max-new-tokens", type=int, default=1024)
    export.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampled")
    export.add_argument("--batch-size", type=int, default=8)
    export.add_argument("--seed", type=int, default=0)
    data = sub.add_parser("data", help="check a data file before a run").add_subparsers(dest="data_command",
                                                                                       required=True)
    check = data.add_parser("check", help="parse and tokenize a data file as a config's run would; exit 1 on "
                                          "rows that would stop it")
    check.add_argument("file", help="the data: a file, a save_to_disk folder or a Hub dataset id")
    check.add_argument("config", help="the run's YAML config (its data: section and model's tokenizer)")
    check.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.split=test")
    experiment = sub.add_parser("experiment", help="run a proving-ground experiment (configs/experiments/)")
    experiment.add_argument("config")
    experiment.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from sparring.config import ConfigError, load_config
    from sparring.data import DataError
    from sparring.state import RunLock, RunLocked

    try:
        if args.command in ("run", "sft"):
            config, overrides = _split_config(args.config, args.overrides)
            cfg = load_config(config, overrides)
            if args.command == "sft" and args.config is None:  # no config: build the proving ground
                from sparring.tasks.sft import build_proving_ground

                build_proving_ground(cfg.sft, cfg.model.name_or_path if cfg.model.build_proving_ground else None)
                return 0
            if args.command == "sft" and cfg.method != "sft":
                raise ConfigError(f"`sparring sft` runs configs with method: sft; {config} has method: {cfg.method} "
                                  "(use `sparring run` for it)")
            from sparring import algorithms
            from sparring.modeling import ensure_base_model
            from sparring.training.loop import EXIT_PREEMPTED, NonFiniteLoss, Preempted

            ensure_base_model(cfg)  # the quickstart and configs with model.build_proving_ground: true

            try:
                algorithms.get(cfg.method)(cfg, force=args.force)
            except Preempted as err:  # a clean stop: schedulers requeue on this status
                print(f"preempted: {err} (exit status {EXIT_PREEMPTED})", file=sys.stderr)
                return EXIT_PREEMPTED
            except NonFiniteLoss as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            finally:
                RunLock.release_all()  # the run is over: a later run in this process finds the folder free
            return 0
        if args.command == "status":
            from sparring.state import RunDir

            state = json.loads(RunDir(args.run_dir).state_path.read_text())
            print(f"method: {state.get('method')}")
            for stage, info in state["stages"].items():
                print(f"  done  {stage}  {json.dumps(info) if info else ''}")
            return 0
        if args.command == "report":
            return _report(Path(args.run_dir))
        if args.command == "export":
            return _export(args)
        if args.command == "data":
            return _data_check(args.file, args.config, args.overrides)
        if args.command == "experiment":
            import importlib

            import yaml

            # The config's top-level `experiment:` picks the module under sparring.experiments (default
            # plateau), imported only when chosen; each has load(path, overrides) and run(cfg, *, command).
            modules = {"plateau": "plateau", "distribution": "distribution", "lsp": "lsp_ground"}
            data = yaml.safe_load(Path(args.config).read_text()) or {}
            kind = data.get("experiment", "plateau") if isinstance(data, dict) else None
            if kind not in modules:
                raise ConfigError(f"unknown experiment {kind!r} in {args.config}; experiments are {', '.join(modules)}")
            module = importlib.import_module(f"sparring.experiments.{modules[kind]}")
            cfg = module.load(args.config, args.overrides)
            module.run(cfg, command=" ".join(["sparring experiment", args.config, *args.overrides]))
            return 0
    except (ConfigError, DataError, FileNotFoundError, RunLocked) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 1


def _split_config(config: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """`sparring run train.lr=1e-6` means the quickstart config with an override."""
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        return None, [config, *overrides]
    return config, overrides


def _data_check(source: str, config: str, overrides: list[str]) -> int:
    """``sparring data check``: the report of ``data.check`` on stdout; 1 when the run would stop on the data."""
    from sparring.config import load_config
    from sparring.data import load_rows
    from sparring.data.check import check_rows, failed, render
    from sparring.modeling import load_tokenizer

    cfg = load_config(config, [*overrides, f"data.source={json.dumps(source)}"], check_reads=False)
    result = check_rows(load_rows(source, cfg.data.split), cfg.data, load_tokenizer(cfg.model))
    print(render(result, cfg.data, source))
    why = failed(result, cfg.data)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    return 0


def _export(args: argparse.Namespace) -> int:
    """``sparring export``: every model's answers to the prompt file (``export.export``)."""
    from sparring.config import load_config
    from sparring.export import export
    from sparring.state import RunDir

    rd = RunDir(args.run_dir)
    if not rd.config_path.exists():
        raise FileNotFoundError(f"{rd.config_path} not found: {rd.root} is not a run directory")
    export(rd, load_config(rd.config_path, check_reads=False), args.prompts, args.fmt, iterations=args.iterations,
           out=Path(args.out) if args.out else None, max_new_tokens=args.max_new_tokens,
           temperature=args.temperature, batch_size=args.batch_size, seed=args.seed)
    return 0


def _report(run_dir: Path) -> int:
    """The report a run writes at its end (evaluation.report), rewritten from the run directory alone."""
    from sparring.config import load_config
    from sparring.evaluation.report import write_report
    from sparring.state import RunDir

    rd = RunDir(run_dir)
    write_report(rd, load_config(rd.config_path, check_reads=False))  # as the run wrote it
    return 0


if __name__ == "__main__":
    sys.exit(main())
