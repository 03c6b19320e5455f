"""Training-step benchmark: tea-lightning's `training_step` through Lightning against the reference step.

    python bench/train_step.py --arch tiny --method ti --steps 2             # CI smoke (seconds)
    python bench/train_step.py --arch sd15 --method all --batch 1 --steps 30  # SD 1.5 architecture, on a GPU
    python bench/train_step.py --arch sd15 --method ti --ablate              # each speed-up off, side by side
    python bench/train_step.py --arch sdxl --method all --steps 10           # SDXL architecture at 1024 px, on a GPU
    python bench/train_step.py --arch tiny-sdxl --method all --steps 6       # the SDXL code path at toy size (CPU)

Every contestant (the reference, tea-lightning with its defaults, and any `--variant`) trains its own copy of the
same weights on the same data stream at the same precision, in this one process. Each runs in its own thread and
they take turns: all set up and warm up one after another, then the timed blocks of `--block` steps alternate
(the order rotates every round), so drift in clock speed or machine load hits every contestant alike. Only one
contestant computes at any time.

Reported per contestant: steps/s (the median over its timed blocks) and its ratio to the reference; peak memory
of its training steps (its own resident tensors + the step's transient peak: CUDA max allocated, CPU max RSS) and
of its load + warm-up; and, on a GPU with a known peak, the model-FLOPs utilisation from the FLOP table of
shared/reference/users-and-costs.md (TFLOP per sample per method at 512 px; the VAE encoder counts only where the
contestant runs it).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import functools
import gc
import importlib
import inspect
import json
import math
import platform
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `python bench/train_step.py`
    sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from bench.models import ARCHS, model_folder  # noqa: E402
from bench.reference import ReferenceStep, Template  # noqa: E402
from tea_lightning.data import ConceptDataModule  # noqa: E402
from tea_lightning.module import DiffusionModule  # noqa: E402
from tea_lightning.speed import Speed  # noqa: E402
from tea_lightning.tiny import _vocab_and_merges  # noqa: E402

IMAGES = ROOT / "examples" / "pink_star"

# TFLOP per sample at 512 px (users-and-costs.md §2.1): (latents cached, VAE encoder every step).
FLOPS_PER_SAMPLE = {"ti": (1.70, 2.81), "lora": (1.73, 2.84), "cd": (1.70, 2.82)}
# Dense bf16/fp16 tensor-core peak, TFLOP/s (vendor spec sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class MethodSpec:
    module: str
    cls: str
    kwargs: dict
    lr: float


# One place to adjust how each method is built (the DreamBooth-LoRA and Custom Diffusion modules come from issue 4).
METHODS = {
    "ti": MethodSpec("tea_lightning.textual_inversion", "TextualInversion",
                     {"concept_word": "star", "placeholder": "<v>"}, 5e-4),
    "lora": MethodSpec("tea_lightning.dreambooth_lora", "DreamBoothLoRA", {"concept_word": "star"}, 1e-4),
    "cd": MethodSpec("tea_lightning.custom_diffusion", "CustomDiffusion", {"concept_word": "star"}, 1e-5),
}

# Options that only act on CUDA (no-ops on the CPU, so not worth an ablation row there).
CUDA_ONLY = ("channels_last", "tf32", "cudnn_benchmark", "fused_optimizer", "frozen_half")
OFF = {"cache_latents": False, "channels_last": False, "tf32": False, "cudnn_benchmark": False,
       "fused_optimizer": False, "frozen_half": False}


class MethodUnavailable(RuntimeError):
    """The method's module is not on this branch yet."""


def method_class(method: str) -> type:
    spec = METHODS[method]
    try:
        module = importlib.import_module(spec.module)
    except ModuleNotFoundError as error:
        if error.name != spec.module:
            raise
        raise MethodUnavailable(f"{spec.module} is not on this branch yet (issue 4): {method!r} skipped") from None
    return getattr(module, spec.cls)


def build_ours(method: str, pretrained: str, speed: Speed, options: dict | None = None,
               seed: int = 0) -> L.LightningModule:
    spec = METHODS[method]
    optimizer = functools.partial(torch.optim.AdamW, lr=spec.lr, weight_decay=1e-2)
    return method_class(method)(pretrained=pretrained, seed=seed, optimizer=optimizer, speed=speed,
                                **{**spec.kwargs, **(options or {})})


def module_options() -> set[str]:
    """Init arguments of the shared module (a variant may set them too, e.g. gradient_checkpointing)."""
    return set(inspect.signature(DiffusionModule.__init__).parameters) - {"self", "speed", "optimizer", "pretrained",
                                                                          "seed"}


def parse_variant(text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`off` or `name=value[,name=value]` → (`Speed` fields, other module init arguments)."""
    if text == "off":
        return dict(OFF), {}
    fields = {f.name for f in dataclasses.fields(Speed)}
    speed: dict[str, Any] = {}
    options: dict[str, Any] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in fields | module_options() or not value:
            raise ValueError(f"--variant {text!r}: use off or name=value with name one of "
                             f"{sorted(fields | module_options())}.")
        (speed if name in fields else options)[name] = _value(value)
    return speed, options


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def ablation_variants(device: torch.device) -> list[str]:
    """One row per speed-up turned off (or, for the opt-in ones, on)."""
    names = [f.name for f in dataclasses.fields(Speed) if f.default is True]
    if device.type != "cuda":
        names = [n for n in names if n not in CUDA_ONLY]
    extra = ["gradient_checkpointing=true"] if "gradient_checkpointing" in module_options() else []
    return [f"{n}=false" for n in names] + ["attention=math", *extra, "off"]


# ----- memory -------------------------------------------------------------------------------------------------------
class Memory:
    """Current and peak memory of this process: CUDA allocated bytes, or the CPU resident set (RSS)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._libc = None
        if not self.cuda:
            try:
                self._libc = ctypes.CDLL("libc.so.6")
            except OSError:
                self._libc = None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        gc.collect()
        if self._libc is not None:
            self._libc.malloc_trim(0)  # return freed heap pages, so RSS reflects live memory
        return _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux ≥ 4.0)
        except OSError:
            pass

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


# ----- turn taking ------------------------------------------------------------------------------------------------
def _cuda_flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)


def _set_cuda_flags(flags: tuple) -> None:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


@dataclass
class Contestant:
    """One way of training, in its own thread; `turn()` (coordinator) lets it run until it yields back."""

    name: str
    body: Callable[[Contestant], None]
    memory: Memory
    speed: Speed | None = None
    options: dict = field(default_factory=dict)  # other module init arguments of a variant
    times: list[tuple[int, float]] = field(default_factory=list)  # (steps, seconds) per timed block
    step_peaks: list[int] = field(default_factory=list)
    resident: int = 0
    load_peak: int = 0
    setup_s: float = 0.0  # load + warm-up (+ compile) seconds
    error: str | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self._go, self._done, self._finish = threading.Event(), threading.Event(), threading.Event()
        self._flags = _cuda_flags()  # process-wide CUDA flags as this contestant set them
        self._setup = True
        self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    # coordinator side
    def turn(self) -> None:
        if self.error is not None or self.finished:
            return
        if not self.thread.is_alive() and not self._setup:
            self.error = self.error or "thread ended early"
            return
        if not self.thread.is_alive():
            self.thread.start()
        self._done.clear()
        self._go.set()
        self._done.wait()

    def finish(self) -> None:
        self._finish.set()
        self._go.set()

    # contestant side
    def _run(self) -> None:
        try:
            self.wait_turn()
            self.body(self)
        except BaseException:  # noqa: BLE001 - reported in the table, the other contestants go on
            self.error = traceback.format_exc(limit=6).strip().splitlines()[-1]
            self.error_detail = traceback.format_exc()
        finally:
            self.finished = True
            self._done.set()

    def wait_turn(self) -> None:
        self._go.wait()
        self._go.clear()
        _set_cuda_flags(self._flags)
        self._start = self.memory.current()
        self.memory.reset_peak()
        self._t0 = time.perf_counter()

    def end_turn(self, steps: int) -> None:
        """Close this turn (setup + warm-up, or a block of `steps` timed steps), hand back, wait for the next."""
        self.memory.sync()
        seconds = time.perf_counter() - self._t0
        peak, now = self.memory.peak(), self.memory.current()
        if self._setup:
            self.resident, self.load_peak, self._setup = now - self._start, peak - self._start, False
            self.setup_s = seconds
        else:
            self.times.append((steps, seconds))
            self.step_peaks.append(peak - self._start + self.resident)
        self._flags = _cuda_flags()
        self._done.set()
        self.wait_turn()

    def end_last_turn(self, steps: int) -> None:
        """Close the last timed block and wait, idle, until every contestant is done."""
        self.memory.sync()
        seconds = time.perf_counter() - self._t0
        self.times.append((steps, seconds))
        self.step_peaks.append(self.memory.peak() - self._start + self.resident)
        self._done.set()
        self._finish.wait()

    @property
    def steps_per_s(self) -> float:
        """Median over the timed blocks: one block slowed by another process on a shared machine does not count."""
        rates = sorted(steps / seconds for steps, seconds in self.times if seconds > 0)
        if not rates:
            return float("nan")
        middle = len(rates) // 2
        return rates[middle] if len(rates) % 2 else (rates[middle - 1] + rates[middle]) / 2


class Turns(L.Callback):
    """Yields the Lightning contestant's turn at block boundaries (before a step runs, its batch fetched).

    Warm-up lasts `warmup` steps and, with the latent cache on, until every (image, flip) is cached (at most
    `MAX_FILL` more steps): the timed steps are the steady state of a long run, where misses are a few in thousands.
    """

    MAX_FILL = 300

    def __init__(self, contestant: Contestant, setting: Setting) -> None:
        self.contestant, self.setting, self.start = contestant, setting, None

    def warm(self, step: int, module: L.LightningModule) -> bool:
        if step < self.setting.warmup:
            return False
        cached = not module.speed.cache_latents or len(module.latent_cache.store) >= self.setting.keys
        return cached or step >= self.setting.warmup + self.MAX_FILL

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        step, block = trainer.global_step, self.setting.block
        if self.start is None:
            if self.warm(step, pl_module):
                self.start = step
                self.contestant.end_turn(step)
            return
        done = step - self.start
        if done == self.setting.rounds * block:
            self.contestant.end_last_turn(block)
            trainer.should_stop = True  # this step runs untimed, after every contestant is done
        elif done % block == 0:
            self.contestant.end_turn(block)


# ----- the run ----------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    arch: str
    method: str
    batch: int
    steps: int
    warmup: int
    block: int
    precision: str
    resolution: int
    device: torch.device
    pretrained: str
    images: int = 6
    flip_p: float = 0.5

    @property
    def rounds(self) -> int:
        return math.ceil(self.steps / self.block)

    @property
    def keys(self) -> int:
        """Distinct (image, flip) samples of the data."""
        return self.images * (2 if 0.0 < self.flip_p < 1.0 else 1)

    def data(self) -> ConceptDataModule:
        """The benchmark's data: the first `images` pink-star images; every contestant gets the same stream."""
        dm = ConceptDataModule(str(IMAGES), resolution=self.resolution, flip_p=self.flip_p, batch_size=self.batch,
                               repeats=1000, seed=0)
        dm.images = dm.images[: self.images]
        return dm


def ours_body(setting: Setting, shared: dict) -> Callable[[Contestant], None]:
    def body(me: Contestant) -> None:
        module = build_ours(setting.method, setting.pretrained, me.speed, me.options)
        shared.setdefault("template", Template.of(module))
        trainer = L.Trainer(
            accelerator=setting.device.type, devices=1, precision=setting.precision,
            max_steps=setting.warmup + Turns.MAX_FILL + setting.rounds * setting.block + 2, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[Turns(me, setting)])
        trainer.fit(module, setting.data())
    return body


def reference_body(setting: Setting, shared: dict) -> Callable[[Contestant], None]:
    def body(me: Contestant) -> None:
        if "template" not in shared:
            raise RuntimeError("tea-lightning's module failed to build, so the reference has nothing to copy")
        reference = ReferenceStep(shared["template"], setting.device, setting.precision, lr=METHODS[setting.method].lr)
        batches = _forever(setting.data().train_dataloader())
        for _ in range(setting.warmup):
            reference.step(next(batches))
        me.end_turn(setting.warmup)
        for r in range(setting.rounds):
            for _ in range(setting.block):
                reference.step(next(batches))
            if r < setting.rounds - 1:
                me.end_turn(setting.block)
        me.end_last_turn(setting.block)
    return body


def _forever(loader):
    while True:
        yield from loader


def compare(setting: Setting, variants: list[str], with_reference: bool = True) -> list[Contestant]:
    """Run the contestants in turns; returns them with their timings, memory and errors."""
    memory, shared = Memory(setting.device), {}
    _vocab_and_merges()  # built once per process: not charged to whichever contestant comes first
    contestants = [Contestant("ours", ours_body(setting, shared), memory, speed=Speed())]
    if with_reference:
        contestants.append(Contestant("reference", reference_body(setting, shared), memory))
    for variant in variants:
        speed, options = parse_variant(variant)
        contestants.append(Contestant(f"ours[{variant}]", ours_body(setting, shared), memory, speed=Speed(**speed),
                                      options=options))
    for contestant in contestants:  # set-up and warm-up, one after another
        contestant.turn()
        _free(setting.device)
    for r in range(setting.rounds):
        order = contestants[r % len(contestants):] + contestants[: r % len(contestants)]
        for contestant in order:
            contestant.turn()
    for contestant in contestants:
        contestant.finish()
    for contestant in contestants:
        if contestant.thread.is_alive():
            contestant.thread.join(timeout=600)
    return contestants


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----- the table ----------------------------------------------------------------------------------------------------
def rows(setting: Setting, contestants: list[Contestant], peak_tflops: float | None) -> list[dict]:
    reference = next((c for c in contestants if c.name == "reference" and c.error is None), None)
    out = []
    for c in contestants:
        row = {"arch": setting.arch, "method": setting.method, "batch": setting.batch, "precision": setting.precision,
               "resolution": setting.resolution, "contestant": c.name, "steps": sum(s for s, _ in c.times),
               "error": c.error}
        if c.error is None:
            row["steps_per_s"] = c.steps_per_s
            row["ratio"] = c.steps_per_s / reference.steps_per_s if reference else None
            row["peak_mib"] = max(c.step_peaks) / 2**20 if c.step_peaks else None
            row["load_peak_mib"] = c.load_peak / 2**20
            row["setup_s"] = c.setup_s
            row["mfu"] = mfu(setting, c, peak_tflops)
            row["block_seconds"] = [round(t, 4) for _, t in c.times]
        out.append(row)
    return out


def mfu(setting: Setting, c: Contestant, peak_tflops: float | None) -> float | None:
    """Model-FLOPs utilisation: FLOP-table TFLOP per sample × samples/s ÷ peak (SD 1.5 at 512 px only)."""
    if peak_tflops is None or setting.arch != "sd15" or setting.resolution != 512:
        return None
    cached, uncached = FLOPS_PER_SAMPLE[setting.method]
    runs_vae = c.speed is None or not c.speed.cache_latents
    return (uncached if runs_vae else cached) * setting.batch * c.steps_per_s / peak_tflops


def table(results: list[dict]) -> str:
    header = ("| arch | method | batch | precision | px | contestant | steps/s | ×ref | peak MiB (steps) | "
              "peak MiB (load+warm-up) | load+warm-up s | MFU |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        head = "| " + " | ".join(str(r[k]) for k in ("arch", "method", "batch", "precision", "resolution",
                                                      "contestant")) + " "
        if r.get("error"):
            what = "skipped" if r.get("skipped") else "failed"
            lines.append(head + f"| {what}: {r['error'][:100]} | | | | | |")
            continue
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "—"
        mfu_text = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        lines.append(head + f"| {r['steps_per_s']:.3g} | {ratio} | {r['peak_mib']:.0f} | {r['load_peak_mib']:.0f} "
                            f"| {r.get('setup_s', float('nan')):.1f} | {mfu_text} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    import diffusers
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=False).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               check=False).stdout.strip()
    except OSError:
        commit, dirty = "unknown", ""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.processor() or ''}"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": commit + ("+dirty" if dirty else ""), "device": name.strip(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def known_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHS, default="tiny",
                        help="tiny / tiny-sdxl (CI), sd15 or sdxl (SD 1.5's or SDXL's architecture, random weights)")
    parser.add_argument("--method", choices=[*METHODS, "all"], default="ti")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes to run, one after another")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contestant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per contestant first (≥ 1)")
    parser.add_argument("--block", type=int, default=None, help="steps per turn (default: steps/3, at least 1)")
    parser.add_argument("--precision", default="auto", help="Lightning precision; auto = bf16-mixed on CUDA, else 32")
    parser.add_argument("--resolution", type=int, default=None,
                        help="pixels (default: 512 for sd15, 1024 for sdxl, 64 for tiny and tiny-sdxl)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--images", type=int, default=6, help="how many of the 6 pink-star images to train on")
    parser.add_argument("--flip-p", type=float, default=0.5, help="horizontal flip probability")
    parser.add_argument("--variant", action="append", default=[],
                        help="an extra tea-lightning row with other Speed options: off, or name=value[,name=value]")
    parser.add_argument("--ablate", action="store_true", help="add one row per speed-up turned off")
    parser.add_argument("--no-reference", action="store_true", help="only tea-lightning rows (ablations)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: known GPUs)")
    parser.add_argument("--cache-dir", default="~/.cache/tea-lightning-bench",
                        help="where the sd15 and sdxl weights are saved")
    parser.add_argument("--json", default=None, help="append one JSON line per row to this file")
    parser.add_argument("--summarize", default=None, metavar="JSONL", help="print the table of a JSON-lines file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or any(b < 1 for b in args.batch):
        parser.error("--warmup, --steps and --batch must be at least 1")
    if not 1 <= args.images <= 6:
        parser.error("--images must be 1 to 6")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.summarize:
        results = [json.loads(line) for line in Path(args.summarize).read_text().splitlines() if line.strip()]
        print(table(results))
        return results
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    device = torch.device("cuda", torch.cuda.current_device()) if want_cuda else torch.device("cpu")
    precision = args.precision if args.precision != "auto" else ("bf16-mixed" if want_cuda else "32")
    resolution = args.resolution or {"sd15": 512, "sdxl": 1024}.get(args.arch, 64)
    env = environment(device)
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    pretrained = model_folder(args.arch, Path(args.cache_dir))
    peak_tflops = args.peak_tflops or known_peak(device)
    variants = list(args.variant) + (ablation_variants(device) if args.ablate else [])

    results = []
    for method in (list(METHODS) if args.method == "all" else [args.method]):
        try:
            method_class(method)
        except MethodUnavailable as error:
            print(f"# {error}", flush=True)
            results.append({"arch": args.arch, "method": method, "batch": None, "precision": precision,
                            "resolution": resolution, "contestant": "—", "error": str(error), "skipped": True})
            continue
        for batch in args.batch:
            setting = Setting(args.arch, method, batch, args.steps, args.warmup,
                              args.block or max(1, math.ceil(args.steps / 3)), precision, resolution, device,
                              pretrained, images=args.images, flip_p=args.flip_p)
            contestants = compare(setting, variants, with_reference=not args.no_reference)
            for c in contestants:
                if c.error is not None:
                    print(f"# {c.name} failed:\n{getattr(c, 'error_detail', c.error)}", file=sys.stderr, flush=True)
            new = rows(setting, contestants, peak_tflops)
            for row in new:
                row.update(env)
            results += new
            if args.json:
                with open(args.json, "a", encoding="utf-8") as out:
                    out.writelines(json.dumps(row) + "\n" for row in new)
            print(table(new), flush=True)
            _free(device)
    if len(results) > 1:
        print("\n" + table(results))
    return results


if __name__ == "__main__":
    main()
