"""FSDP2 (``fully_shard``) on two CPU processes (gloo), launched with ``configs/accelerate/fsdp2.yaml``.

accelerate 1.16 turns FSDP on only for accelerator process groups: ``AcceleratorState`` sets
``DistributedType.FSDP`` inside its MULTI_GPU / MULTI_XPU / … branch, so on CPU the launcher's
``ACCELERATE_USE_FSDP=true`` is ignored and the run is plain MULTI_CPU data parallelism
(it prints ``processes: 2 (multi_cpu, cpu:0)``). torch itself shards on CPU: ``fully_shard`` over a
gloo mesh trains and checkpoints. So this file, run as the launched script, makes the switch
accelerate makes on a GPU (``distributed_type = FSDP`` and a plugin read from the same environment)
and then runs ``sparring.cli``. Everything after
that is sparring's and accelerate's own code: ``prepare`` → ``fully_shard`` of each decoder layer,
``save_state`` / ``load_state`` of sharded (DCP) model and optimizer state, ``get_state_dict``
gathering θ1 for ``save_pretrained``, and held-out evaluation of the sharded model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __name__ != "__main__":
    import pytest
    import torch
    from tests.conftest import REPO, tiny_overrides
    from tests.integration.helpers import rows, weights

    from sparring.cli import main

    pytestmark = pytest.mark.slow
    CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
    # test_multiprocess.py's SPIN run (25 pairs, micro-batches of 2 × 4 [FSDP] or 8 [one process],
    # two per step: 2 optimizer steps, a checkpoint after each), with no warm-up so that step 1
    # already moves the weights: a resume that lost the step-1 model or optimizer state shows in θ1.
    SMALL = ["spin.iterations=1", "data.num_prompts=25", "train.grad_accum=2", "train.save_steps=1",
             "train.warmup_ratio=0", "generation.batch_size=8", "train.logprob_batch_size=8",
             "eval.num_examples=8", "eval.batch_size=4"]
    ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    EXIT_AFTER_CHECKPOINT = "SPARRING_TEST_EXIT_AFTER_CHECKPOINT"
    PROBES = "SPARRING_TEST_FSDP_PROBES"  # where each rank writes what it holds (stdout lines interleave)


def launch_fsdp2(args: list[str], probes: Path, exit_after_checkpoint: bool = False) -> subprocess.CompletedProcess:
    """``accelerate launch`` of this file with the shipped FSDP2 profile on 2 CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "configs" / "accelerate" / "fsdp2.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", "0", __file__, *args]
    env = {**ENV, PROBES: str(probes), **({EXIT_AFTER_CHECKPOINT: "1"} if exit_after_checkpoint else {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def test_fsdp2_on_two_cpu_processes_trains_saves_and_resumes_like_one_process(tiny_ground, tmp_path):
    fsdp, one = tmp_path / "fsdp2", tmp_path / "one"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, fsdp), *SMALL, "train.batch_size=4"]

    # 1. Train to the checkpoint of step 1, then both ranks exit at once (os._exit, like a kill).
    first = launch_fsdp2(args, tmp_path / "probes-1", exit_after_checkpoint=True)
    log = first.stdout + first.stderr
    assert first.returncode != 0 and "exiting after checkpoint step-00000001" in first.stdout, log[-4000:]
    # Two ranks in one group. accelerate builds it as MULTI_CPU and this file switches it to FSDP; if
    # accelerate (or sparring) ever does that itself, the group comes up as FSDP and nothing is switched.
    assert "processes: 2 (multi_cpu" in first.stdout or "processes: 2 (fsdp" in first.stdout, log[-4000:]
    assert "is_fsdp2=True" in first.stdout, log[-4000:]
    # Really sharded: every parameter is a DTensor and each rank holds half of the elements (dim-0 shards).
    held = [json.loads(f.read_text()) for f in sorted((tmp_path / "probes-1").glob("rank-*.json"))]
    assert sorted(p["rank"] for p in held) == [0, 1] and all(p["start"] == 0 for p in held), held
    for probe in held:
        assert probe["wrapper"].startswith("FSDP") and probe["dtensor_params"] == probe["params"] > 0, probe
        assert 0.4 < probe["local_elements"] / probe["full_elements"] < 0.6, probe
    # The checkpoint is sharded (DCP files per rank) for the model and the optimizer.
    files = json.loads((tmp_path / "probes-1" / "checkpoint-files.json").read_text())
    assert any(f.startswith("pytorch_model_fsdp_0/") and f.endswith(".distcp") for f in files), files
    assert any(f.startswith("optimizer_0/") and f.endswith(".distcp") for f in files), files

    # 2. The same command again: it resumes from that checkpoint and finishes.
    second = launch_fsdp2(args, tmp_path / "probes-2")
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-6000:]
    resumed = [json.loads(f.read_text()) for f in sorted((tmp_path / "probes-2").glob("rank-*.json"))]
    assert sorted((p["rank"], p["start"]) for p in resumed) == [(0, 1), (1, 1)], resumed
    # Step 1 logged by the first launch, step 2 after the resume (no step trained twice).
    assert [r["step"] for r in rows(fsdp / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]

    # 3. One process with twice the per-device batch, uninterrupted.
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, one), *SMALL, "train.batch_size=8"]) == 0
    assert rows(fsdp / "iter_000" / "generated.jsonl") == rows(one / "iter_000" / "generated.jsonl")
    a, b = weights(fsdp / "iter_000" / "model"), weights(one / "iter_000" / "model")
    # The gathered FSDP state dict also names the tied lm_head (the same tensor as the embeddings).
    assert set(a) - set(b) <= {"lm_head.weight"} and set(b) <= set(a)
    if "lm_head.weight" in a:
        assert torch.equal(a["lm_head.weight"], a["model.embed_tokens.weight"])
    # 1e-6, as for DDP in test_multiprocess.py: float32 reduction-order noise only. Measured 4.0e-7 on
    # one element of 138k (layers.0.mlp.down_proj), all others < 1e-7; 2-process DDP gives the same
    # 4.0e-7 and the same θ1 as FSDP2 bit for bit: the 2 ranks' gradient sum is summed in another
    # order than one process's batch, and Adam's first steps divide by |g|. The two steps at lr 1e-4
    # move weights by 1e-4 (checked), and a resume that skips load_state ends 2.5e-4 away.
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    start = weights(Path(tiny_ground["model"]))
    assert max((b[n] - start[n]).abs().max().item() for n in b) > 5e-5
    for two, single in zip(*[[r for r in rows(run / "metrics.jsonl") if r["kind"] == "train"] for run in (fsdp, one)]):
        assert two["loss"] == pytest.approx(single["loss"], abs=1e-6)
        assert two["rewards/margins"] == pytest.approx(single["rewards/margins"], abs=1e-6)

    # θ1 is an ordinary Hugging Face model folder.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(fsdp / "iter_000" / "model").state_dict()
    for name in b:
        torch.testing.assert_close(loaded[name], b[name], rtol=0, atol=1e-6, msg=name)


def _launched() -> None:
    """The script side: switch accelerate's state to FSDP on CPU, probe the sharding, run the CLI."""
    import torch
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    import sparring.modeling
    import sparring.stages
    import sparring.training.engine as engine
    from sparring.cli import main

    make_accelerator, engine_init, save_checkpoint = (sparring.modeling.make_accelerator, engine.Engine.__init__,
                                                      engine.save_checkpoint)

    def fsdp_accelerator(cfg):
        accelerator = make_accelerator(cfg)
        fsdp_launch = os.environ.get("ACCELERATE_USE_FSDP") == "true"
        switched = fsdp_launch and accelerator.distributed_type == DistributedType.MULTI_CPU
        if switched:
            state = AcceleratorState()
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        if accelerator.is_main_process:
            print(f"{'switched to' if switched else 'launched as'} {accelerator.distributed_type.value}: "
                  f"is_fsdp2={accelerator.is_fsdp2}", flush=True)
        return accelerator

    def probed_init(self, *args, **kwargs):
        engine_init(self, *args, **kwargs)
        accelerator = self.accelerator
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        dtensors = [p for p in params if isinstance(p, DTensor)]
        probes = Path(os.environ[PROBES])
        probes.mkdir(parents=True, exist_ok=True)
        (probes / f"rank-{accelerator.process_index}.json").write_text(json.dumps({
            "rank": accelerator.process_index, "start": self.start, "wrapper": type(self.model).__name__,
            "params": len(params), "dtensor_params": len(dtensors),
            "local_elements": sum(p.to_local().numel() for p in dtensors),
            "full_elements": sum(p.numel() for p in dtensors)}))

    def save_and_maybe_exit(accelerator, scheduler, folder, step, **kwargs):
        save_checkpoint(accelerator, scheduler, folder, step, **kwargs)
        if os.environ.get(EXIT_AFTER_CHECKPOINT) == "1":
            final = engine.checkpoint_dir(folder, step)
            if accelerator.is_main_process:
                (Path(os.environ[PROBES]) / "checkpoint-files.json").write_text(json.dumps(sorted(
                    str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())))
                print(f"exiting after checkpoint {final.name}", flush=True)
            accelerator.wait_for_everyone()
            os._exit(3)

    sparring.modeling.make_accelerator = sparring.stages.make_accelerator = fsdp_accelerator
    engine.Engine.__init__ = probed_init
    engine.save_checkpoint = save_and_maybe_exit
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    EXIT_AFTER_CHECKPOINT, PROBES = "SPARRING_TEST_EXIT_AFTER_CHECKPOINT", "SPARRING_TEST_FSDP_PROBES"
    _launched()
