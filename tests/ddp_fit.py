"""Run by test_ddp.py: `python tests/ddp_fit.py OUT CLASS_DIR CONFIG...` fits every config through train.py with
DDP on two CPU processes (gloo), then each rank saves its trainable tensors to OUT/<config>/rank<N>.pt.

Lightning's DDP launcher starts rank 1 by running this same command again; the later fits of the loop reuse the
process group, so one pair of processes serves every config.
"""

import faulthandler
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402

# Few steps at batch 1; class images come from a ready folder; gradient checkpointing for the methods that train
# UNet weights (it must work under DDP, non-reentrant).
COMMON = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
          "--trainer.max_steps", "2", "--data.batch_size", "1"]
EXTRA = {
    "demo_dreambooth_lora": ["--model.init_args.gradient_checkpointing", "true", "--data.num_class_images", "0"],
    "demo_custom_diffusion": ["--model.init_args.gradient_checkpointing", "true", "--data.num_class_images", "0"],
}


def main(out: Path, class_dir: str, configs: list[str]) -> None:
    for config in configs:
        name = Path(config).stem
        args = ["fit", "--config", config, *COMMON, "--trainer.default_root_dir", str(out / name), *EXTRA.get(name, [])]
        if name in EXTRA:
            args += ["--data.class_dir", class_dir]
        cli = train.main(args)
        torch.save(cli.model.trainable_state_dict(), out / name / f"rank{cli.trainer.global_rank}.pt")


if __name__ == "__main__":
    # Each rank (the launcher runs this file again for rank 1) prints its stack and exits if it hangs.
    faulthandler.dump_traceback_later(int(os.environ.get("DDP_FIT_TIMEOUT_S", "600")), exit=True)
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3:])
