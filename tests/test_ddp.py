"""Every method trains under `trainer.strategy=ddp` on two CPU processes (gloo, no find_unused_parameters), writes
its exports once, and ends with the same trainable tensors on both ranks."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT

CONFIGS = ["demo", "demo_dreambooth_lora", "demo_custom_diffusion"]
TIMEOUT_S = 420  # a hung collective must fail the test, not hang the suite (a normal run takes about a minute)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory, class_dir):
    """One two-process run over all three methods (the processes start once: imports dominate on a tiny model)."""
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(ROOT / "tests" / "ddp_fit.py"), str(out), str(class_dir),
               *[str(ROOT / "configs" / f"{name}.yaml") for name in CONFIGS]]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests"), "HF_HUB_OFFLINE": "1",
           "DDP_FIT_TIMEOUT_S": str(TIMEOUT_S - 60)}  # each rank dumps its stack before we kill it
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the launcher's rank-1 child is in the same session
        output, _ = process.communicate()
        pytest.fail(f"DDP run did not finish in {TIMEOUT_S} s:\n{output[-5000:]}")
    assert process.returncode == 0, output[-5000:]
    return out


@pytest.mark.parametrize("config", CONFIGS)
def test_two_process_ddp_finishes_with_identical_trainables_on_both_ranks(ddp_runs, config):
    run = ddp_runs / config
    ranks = [torch.load(run / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert ranks[0] and list(ranks[0]) == list(ranks[1])
    for name, tensor in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], tensor, rtol=0, atol=0, msg=name)
    exports = run / "lightning_logs" / "version_0" / "exports"
    assert sorted(p.name for p in exports.iterdir()) == ["final", "step-000000"]
    start, final = ({p.name: load_file(p) for p in (exports / name).glob("*.safetensors")}
                    for name in ("step-000000", "final"))
    assert any(not torch.equal(final[f][k], start[f][k]) for f in final for k in final[f]), "nothing trained"
    assert not (run / "lightning_logs" / "version_1").exists(), "rank 1 wrote a run folder of its own"
