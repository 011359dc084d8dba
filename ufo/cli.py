"""The `ufo` command: parses arguments and calls one function of the Python API per command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ufo.errors import UfoError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except UfoError as e:
        # one write: under a launcher every rank may report at once, into one unbuffered log
        sys.stderr.write(f"ufo {args.command}: error: {e}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print(f"ufo {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    import ufo

    parser = argparse.ArgumentParser(prog="ufo", description="Train UFO multi-task ViT supernets and "
                                     "export deployable single-task timm subnets.")
    parser.add_argument("--version", action="version", version=f"ufo {ufo.__version__}")
    # the deepspeed launcher passes --local_rank before the command; LOCAL_RANK is read from the environment
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def track_args(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument("--track", metavar="URI", dest="track_uri",
                       help=f"log {what} to the checkpoint's MLflow run in this store (default: the store its "
                       "marker names, if that is a local store that exists here; never a remote one)")
        p.add_argument("--no-track", dest="track", action="store_false",
                       help=f"do not log {what} to the checkpoint's MLflow run")

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", type=Path, help="YAML config file (see configs/)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value by its dotted key, e.g. --set model.depth=6 (repeatable)")

    def training_bench_args(b: argparse.ArgumentParser, steps: int, out: str) -> None:
        """A benchmark that trains runs of its own: config, steps, where the runs go."""
        config_args(b)
        b.add_argument("--steps", type=int, default=steps, help=f"training steps of each run (default {steps})")
        b.add_argument("--out", type=Path, default=Path(out),
                       help=f"where the runs and the comparison go (default: {out})")
        b.add_argument("--overwrite", action="store_true", help="replace the runs left in --out")
        b.add_argument("--json", action="store_true", help="print the result as JSON")

    p = commands.add_parser("init", help="write an initialised supernet checkpoint")
    config_args(p)
    p.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.safetensors)")
    p.add_argument("--from-timm", type=Path, metavar="FILE",
                   help="initialise from a plain timm ViT state dict (.safetensors/.pth); every FFN takes its MLP "
                        "(the same as --set model.pretrained=FILE)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    p.set_defaults(run=_init)

    p = commands.add_parser("train", help="train the supernet (one process, or under deepspeed or torchrun); "
                                          "reruns resume")
    config_args(p)
    p.set_defaults(run=_train)

    p = commands.add_parser("distill", help="train a student (any timm model) on one task from its subnet or "
                                            "the supernet's path (one process, or under deepspeed or torchrun); "
                                            "reruns resume")
    p.add_argument("teacher", type=Path, help="the task's exported subnet directory, or a supernet checkpoint "
                   "(run, step directory or file: the task on its trained path)")
    p.add_argument("--task", required=True, help="the task to distil")
    p.add_argument("--student", required=True, help="a timm model name (vit_tiny_patch16_224, resnet18, "
                   "mobilenetv3_large_100, ...)")
    p.add_argument("--out", type=Path, help="the run's directory (default: runs/distill-TASK-STUDENT)")
    p.add_argument("--steps", type=int, help="training steps (default: the teacher run's train.steps)")
    p.add_argument("--config", type=Path, help="the run config to take the task's data and training from "
                   "(default: the teacher's own: a checkpoint's, or an exported subnet's source run's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by its dotted key, e.g. --set distill.temperature=2 "
                        "--set distill.student_args.depth=4 (repeatable)")
    p.set_defaults(run=_distill)

    p = commands.add_parser("info", help="print the parameter table of a config's supernet and subnets")
    config_args(p)
    p.add_argument("--show-config", action="store_true", help="also print the resolved config")
    p.add_argument("--world", type=int, metavar="N", help="also print the per-rank memory plan of N ranks, "
                                                          "for each placement")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage of the plan (default: the config's)")
    p.set_defaults(run=_info)

    p = commands.add_parser("export", help="prune a checkpoint to a task's deployable timm subnet")
    p.add_argument("checkpoint", type=Path, help="supernet checkpoint")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--task", help="the task to export")
    which.add_argument("--all-tasks", action="store_true", help="export every task, one sub-directory each")
    p.add_argument("--out", type=Path, required=True, help="output directory (must not exist unless --overwrite)")
    p.add_argument("--path", help="path to export instead of the task's configured one, e.g. SSSSTTTT")
    p.add_argument("--path-from", type=Path, metavar="SEARCH_JSON",
                   help="export the best path of a `ufo search` result for --task")
    p.add_argument("--depth", type=int, help="elastic: keep the first DEPTH blocks (default: all)")
    p.add_argument("--mlp-ratio", type=float, help="elastic: FFN hidden width as a ratio of the embedding width "
                   "(default: the supernet's)")
    p.add_argument("--num-heads", type=int, help="elastic: keep the first NUM_HEADS attention heads, each of the "
                   "supernet's width (default: all)")
    p.add_argument("--format", dest="formats", help="comma-separated: safetensors,onnx,torchscript,onnx-int8 "
                   "(default: the checkpoint config's export.formats)")
    p.add_argument("--int8", choices=["auto", "static", "dynamic"], help="onnx-int8: activation ranges calibrated "
                   "on the task's images (static) or computed per batch (dynamic); auto: dynamic for transformers, "
                   "static for CNNs (default: export.int8, auto)")
    p.add_argument("--calibration", metavar="SHARDS", help="static INT8: the images to calibrate on (default: the "
                   "task's train shards)")
    p.add_argument("--calibration-samples", type=int, help="static INT8: images to calibrate on (default 256)")
    p.add_argument("--int8-max-drop", type=float, help="onnx-int8: the largest loss of the task's primary metric "
                   "against the fp32 graph accepted (default: export.int8_max_drop, 0.02)")
    p.add_argument("--no-verify", dest="verify", action="store_false", default=None,
                   help="skip checking the exported files against the supernet")
    p.add_argument("--atol", type=float, help="largest accepted |subnet - supernet| (default: export.atol, 1e-5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--ema", action="store_true", help="export the moving average of the weights (train.ema: the "
                   "checkpoint's ema.safetensors) instead of the weights")
    p.add_argument("--best", action="store_true", help="each task from its own best checkpoint (train.keep_best: "
                   "the run's checkpoints/best.json) instead of the given one")
    track_args(p, "the subnets")
    p.add_argument("--register", metavar="NAME", help="also log each subnet as an MLflow model in the checkpoint's "
                   "run and register it as NAME (several tasks: NAME-TASK) in the store's model registry")
    p.set_defaults(run=_export)

    p = commands.add_parser("search", help="find a task's best path on its eval shards (no retraining)")
    p.add_argument("checkpoint", help="a supernet checkpoint: a training run directory, a step directory, "
                   "or an `ufo init` file")
    p.add_argument("--task", required=True, help="the task whose path to search")
    p.add_argument("--budget-evals", type=int, default=32, help="paths to evaluate at most (default 32)")
    p.add_argument("--population", type=int, default=8, help="paths per generation (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the search (default 0)")
    p.add_argument("--max-params", type=float, help="budget: parameters of the exported subnet (e.g. 5e6); "
                   "searches every elastic size of the task that fits")
    p.add_argument("--max-latency-ms", type=float, help="budget: ms per image of the exported subnet, "
                   "measured on this machine")
    p.add_argument("--out", type=Path, help="result JSON (default: search-TASK.json in the run directory; "
                   "with a budget also a Pareto plot, .png)")
    track_args(p, "the search")
    p.set_defaults(run=_search)

    p = commands.add_parser("eval", help="measure a checkpoint or an exported subnet on a task's eval sets, "
                                         "by the task's protocol (reid, verification, retrieval, classification)")
    p.add_argument("target", help="a training run or step directory, an exported subnet directory (loaded "
                   "with timm alone), or one of its ONNX graphs (model.onnx, model.int8.onnx: run by onnxruntime)")
    p.add_argument("--task", required=True, help="the task to measure")
    p.add_argument("--shards", action="append", metavar="[NAME=]SPEC",
                   help="eval shards instead of the config's: one SPEC, or NAME=SPEC per part, repeated "
                        "(--shards query=DIR --shards gallery=DIR; --shards lfw=DIR --shards cfp_fp=DIR)")
    p.add_argument("--protocol", choices=["classification", "retrieval", "reid", "verification"],
                   help="default: the task's, else its shards' manifest, else by kind")
    p.add_argument("--path", help="checkpoint: the path to measure (default: the task's configured one)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    p.add_argument("--out", type=Path, help="result JSON (default: eval-TASK.json in the run or subnet directory)")
    p.set_defaults(run=_eval)

    p = commands.add_parser("data", help="write and inspect task shards (WebDataset)")
    data = p.add_subparsers(dest="data", required=True, metavar="ACTION")
    w = data.add_parser("write", help="write a task's shards from an image folder, .npz, sklearn:digits or synth:...")
    w.add_argument("--task", required=True, help="task name (shards are named TASK-000000.tar)")
    w.add_argument("--from", dest="source", required=True, metavar="SOURCE",
                   help="image folder (ImageFolder layout), FILE.npz (images, labels), sklearn:digits, "
                        "synth:shapes, synth:instances, or a dataset as it ships with its own splits: "
                        "market1501:DIR, dukemtmc:DIR, veri776:DIR, msmt17:DIR, sop:DIR, insightface:DIR")
    w.add_argument("--out", type=Path, required=True, help="output directory (must be empty unless --overwrite)")
    w.add_argument("--kind", choices=["classification", "retrieval"],
                   help="task kind recorded in the manifest (default: the source's, else classification)")
    w.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most")
    w.add_argument("--maxsize", type=float, default=1e9, help="bytes per shard at most")
    w.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of each class as OUT/eval (the rest goes to OUT/train)")
    w.add_argument("--seed", type=int, default=0, help="shuffle (and synthetic generator) seed")
    w.add_argument("--classes", type=int, default=10, help="synth: number of classes")
    w.add_argument("--samples", type=int, default=1000, help="synth: number of samples")
    w.add_argument("--difficulty", type=float, default=0.3, help="synth: 0 (easy) .. 1 (hard)")
    w.add_argument("--image-size", type=int, default=32, help="synth and sklearn:digits: image side in pixels")
    w.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    w.add_argument("--max-side", type=int, metavar="N", help="store images whose longer side is above N pixels "
                   "resized to N (JPEG quality 95): decoding full-size photos would dominate the loader")
    w.set_defaults(run=_data_write)
    i = data.add_parser("inspect", help="counts per shard and class, problems, and a contact sheet")
    i.add_argument("shards", help="a shard directory, a pattern like 'dir/task-{000000..000009}.tar', or one tar")
    i.add_argument("--sheet", type=Path, default=Path("contact_sheet.png"),
                   help="contact sheet PNG to write (default: ./contact_sheet.png)")
    i.add_argument("--no-sheet", action="store_true", help="do not draw a contact sheet")
    i.add_argument("--json", action="store_true", help="print the report as JSON")
    i.set_defaults(run=_data_inspect)

    p = commands.add_parser("bench", help="benchmarks")
    benches = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    b = benches.add_parser("model", help="supernet fwd+bwd on a task-grouped batch vs a plain timm ViT")
    config_args(b)
    b.add_argument("--batch-per-task", type=int, default=16, help="rows of each task in the micro-batch")
    b.add_argument("--steps", type=int, default=10, help="timed steps per model")
    b.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    b.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    b.add_argument("--compile", action="store_true", help="also time both models compiled (train.compile)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_model)
    b = benches.add_parser("data", help="loader throughput per worker count vs the demo training step")
    config_args(b)
    b.add_argument("--workers", default="0,1,2", help="comma-separated worker counts to time")
    b.add_argument("--batches", type=int, default=20, help="timed batches per task and worker count")
    b.add_argument("--jpeg-side", type=int, default=224, help="also time one core on JPEG shards of photos "
                   "written with --max-side N, against the photos as shipped (0: skip)")
    b.add_argument("--jpeg-samples", type=int, default=128, help="samples in each JPEG set")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_data)
    b = benches.add_parser("train", help="training throughput vs a plain ViT, and peak memory per ZeRO stage")
    config_args(b)
    b.add_argument("--steps", type=int, default=5, help="timed steps per model")
    b.add_argument("--ranks", type=int, default=2, help="ranks to start (CPU processes with gloo, or GPUs)")
    b.add_argument("--memory-config", type=Path, help="config for the ZeRO 0-3 memory figures "
                   "(e.g. configs/ufo_vit_b.yaml); none: skip them")
    b.add_argument("--memory-stages", default="0,1,2,3", help="ZeRO stages to measure")
    b.add_argument("--memory-batch", type=int, default=1, help="samples of each task per rank in the memory runs")
    b.add_argument("--memory-checkpointing", default="0", help="train.activation_checkpointing values to measure "
                   "the memory with, e.g. 0,1 (off, every block)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_train)
    b = benches.add_parser("scale", help="per-rank weights, optimizer state and bytes sent per step for 2, 4, 8 "
                                         "tasks: replicated vs task_sharded vs a plain ViT")
    config_args(b)
    b.add_argument("--tasks", default="2,4,8", help="task counts to measure (default 2,4,8)")
    b.add_argument("--zero", type=int, default=1, choices=[0, 1, 2], help="ZeRO stage of the runs (default 1)")
    b.add_argument("--steps", type=int, default=2, help="optimizer steps per run; the last is counted")
    b.add_argument("--no-projection", dest="project", action="store_false",
                   help="skip the projection to the ViT-B, ViT-L and 26-task ViT-H configs")
    b.add_argument("--partial-fc", type=int, metavar="CLASSES",
                   help="instead: per-rank bytes of a CLASSES-identity margin head on 1, 2 and 4 ranks, dense vs "
                        "Partial FC (e.g. 1000000)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_scale)
    b = benches.add_parser("export", help="peak RSS of exporting one task from a task-sharded vs a replicated "
                                          "checkpoint")
    config_args(b)
    b.add_argument("--task", help="the task to export (default: the first)")
    b.add_argument("--ranks", type=int, help="ranks that write the checkpoints (default: one per task)")
    b.add_argument("--zero", type=int, default=1, choices=[0, 1, 2], help="ZeRO stage of the checkpoints (default 1)")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_export)
    b = benches.add_parser("weighting", help="train once per loss-weighting strategy; metrics, weights and losses")
    training_bench_args(b, steps=100, out="runs/bench-weighting")
    b.add_argument("--strategies", default="all", help="comma-separated train.weighting names (default: all)")
    b.set_defaults(run=_bench_weighting)
    b = benches.add_parser("ufo", help="UFO's comparison: each task alone, hard sharing, fixed, sampled and "
                                       "learned paths, by each task's protocol")
    training_bench_args(b, steps=300, out="runs/bench-ufo")
    b.add_argument("--settings", default="all", help="comma-separated: alone,hard,fixed,sample,learned,"
                   "learned_both (default: all); SETTING+WEIGHTING runs a setting under another loss weighting, "
                   "e.g. fixed+uncertainty")
    b.add_argument("--weightings", default="", help="comma-separated train.weighting names: each adds the "
                   "setting fixed+NAME (fixed paths under that weighting)")
    b.add_argument("--launcher", help='run each setting under a launcher, e.g. "torchrun --nproc_per_node 8" '
                   "(default: in this process)")
    b.add_argument("--tasks", default="", help="comma-separated: only these of the config's tasks, e.g. a related "
                   "pair (default: all)")
    b.add_argument("--seeds", type=int, default=1, help="runs of each setting with seeds train.seed, +1, ...: "
                   "mean and standard deviation per cell (default 1)")
    b.add_argument("--lrs", default="", help="comma-separated lrs: every setting trained at each and reported at "
                   "its best on the eval sets (default: the config's)")
    b.add_argument("--jobs", type=int, default=1, help="train this many runs at once, each a process with its "
                   "share of the CPU threads (default 1: one after the other, in this process)")
    b.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps and report each task at its "
                   "best step (train.keep_best; default: the last step only)")
    b.set_defaults(run=_bench_ufo)
    b = benches.add_parser("deploy", help="a trained run's task deployed small: supernet, subnet, smaller sizes, "
                                          "distilled and alone-trained students, INT8; metric, params, CPU latency")
    b.add_argument("checkpoint", type=Path, help="the trained supernet: a run directory or checkpoint")
    b.add_argument("--task", required=True, help="the task to deploy")
    b.add_argument("--student", action="append", metavar="NAME[:key=value,...]",
                   help="a student (timm name and arguments), repeatable (default: two ViTs of half and a quarter "
                        "of the supernet's width)")
    b.add_argument("--steps", type=int, help="each student's training steps (default: the run's train.steps)")
    b.add_argument("--out", type=Path, help="where the students' runs and the table go (default: "
                   "runs/bench-deploy-TASK)")
    b.add_argument("--launcher", help='train each student under a launcher, e.g. "deepspeed --num_gpus 2" '
                   "(default: in this process)")
    b.add_argument("--jobs", type=int, default=1, help="train this many students at once (default 1)")
    b.add_argument("--track", metavar="URI", dest="track_uri", help="also log the table as an MLflow run in this store")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    b.set_defaults(run=_bench_deploy)
    b = benches.add_parser("elastic", help="metric at 25/50/100%% of the subnet's parameters: elastic vs from scratch")
    training_bench_args(b, steps=150, out="runs/bench-elastic")
    b.set_defaults(run=_bench_elastic)
    return parser


def _init(args: argparse.Namespace) -> None:
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.config import load_config

    overrides = list(args.overrides) + ([f"model.pretrained={args.from_timm}"] if args.from_timm else [])
    cfg = load_config(args.config, overrides)
    if args.out.exists() and not args.overwrite:
        raise UfoError(f"{args.out}: exists; pass --overwrite to replace it")
    model = init_supernet(cfg, say=print)
    save_supernet(model, cfg, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    source = f"from {cfg.model.pretrained}" if cfg.model.pretrained else f"seed {cfg.train.seed}"
    print(f"wrote {args.out}: supernet of {len(cfg.tasks)} tasks, {n / 1e6:.2f} M parameters ({source})")


def _distill(args: argparse.Namespace) -> int:
    from ufo.distill import distill_config

    overrides = args.overrides + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    return _train(args, distill_config(args.teacher, args.task, args.student, args.out, args.config, overrides))


def _train(args: argparse.Namespace, cfg=None) -> int:
    from ufo.config import load_config
    from ufo.train import train

    from ufo.layout import leave_distributed

    from ufo.supervise import peer_lost

    cfg = cfg or load_config(args.config, args.overrides)
    try:
        result = train(cfg)
    except RuntimeError as e:
        if not peer_lost(e):
            raise
        import os

        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        print(f"ufo train: error: rank {os.environ.get('RANK', '0')}: lost another rank (hung, stopped, cut off "
              f"or dead; train.collective_timeout {cfg.train.collective_timeout:g} s): {first}; the newest "
              "checkpoint is kept, rerun to resume", file=sys.stderr)
        return 4
    leave_distributed()
    return 3 if result.stopped_by else 0  # 3: stopped early by a signal, checkpointed; rerun to resume


def _info(args: argparse.Namespace) -> None:
    import torch

    from ufo.config import load_config
    from ufo.model import SupernetViT, count_params, format_params

    cfg = load_config(args.config, args.overrides)
    if args.show_config:
        print(cfg.to_yaml())
    if cfg.distill is not None:
        from ufo.distill import student_backbone

        backbone = student_backbone(cfg, meta=True)
        print(f"{args.config}: a distillation run of task {next(iter(cfg.tasks))}: student {cfg.distill.student} "
              f"({sum(p.numel() for p in backbone.parameters()) / 1e6:.3f} M parameters before its head) from "
              f"teacher {cfg.distill.teacher}")
        return
    with torch.device("meta"):  # counts need shapes only, not memory
        model = SupernetViT.from_config(cfg)
    m = cfg.model
    print(f"{args.config}: ViT depth {m.depth}, width {m.embed_dim}, {m.num_heads} heads, "
          f"mlp_ratio {m.mlp_ratio:g}, {m.img_size}px / patch {m.patch_size}; tasks: {', '.join(cfg.tasks)}")
    t = cfg.train
    print(f"  start: {f'pretrained {m.pretrained}' if m.pretrained else f'random (seed {t.seed})'}"
          + (f", activation checkpointing every {t.activation_checkpointing} block(s)" if t.activation_checkpointing
             else "") + (", torch.compile" if t.compile else "")
          + (f", EMA decay {t.ema.decay:g}" if t.ema else "") + (", keeping each task's best" if t.keep_best else ""))
    print(format_params(count_params(model, {t: cfg.path_of(t) for t in cfg.tasks})))
    print("  training recipe per task (per rank):")
    for task, tc in cfg.tasks.items():
        print(f"    {task:<12} {tc.recipe(cfg.batch_of(task), cfg.size_of(task))}")
    if args.world is not None:
        from ufo.memory import activation_plan, format_activations, format_plan, memory_plan

        if args.world < 1:
            raise UfoError(f"--world {args.world}: give at least one rank")
        print(format_plan(cfg, args.world, args.zero, memory_plan(cfg, args.world, args.zero)))
        print(format_activations(cfg, activation_plan(cfg)))
    elif args.zero is not None:
        raise UfoError("--zero applies to the memory plan: give --world N too")


def _export(args: argparse.Namespace) -> None:
    from ufo.checkpoint import read_checkpoint, with_ema
    from ufo.errors import ExportError
    from ufo.export import export_all_tasks, export_subnet

    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    if args.all_tasks and (args.path or args.path_from):
        raise ExportError("--path and --path-from apply to one --task; with --all-tasks each task uses its "
                          "configured path")
    if args.path and args.path_from:
        raise ExportError("give --path or --path-from, not both")
    if args.all_tasks and (args.depth or args.mlp_ratio or args.num_heads):
        raise ExportError("--depth, --mlp-ratio and --num-heads apply to one --task")
    if args.path_from:
        from ufo.search import read_result

        found = read_result(args.path_from, args.task)
        args.path = found["best_path"]
        args.depth = args.depth or found.get("best_depth")
        args.mlp_ratio = args.mlp_ratio or found.get("best_mlp_ratio")
        args.num_heads = args.num_heads or found.get("best_num_heads")
    int8 = {"mode": args.int8, "calibration": args.calibration, "samples": args.calibration_samples,
            "max_drop": args.int8_max_drop}
    common = dict(formats=formats, overwrite=args.overwrite, verify=args.verify, atol=args.atol,
                  int8={k: v for k, v in int8.items() if v is not None} or None)
    if args.best:
        return _export_best(args, common)
    ckpt = read_checkpoint(args.checkpoint, tasks=None if args.all_tasks else [args.task])
    if args.ema:
        ckpt = with_ema(ckpt)
    print(f"ufo export: {args.checkpoint} (step {ckpt.step}, tasks {', '.join(ckpt.config.tasks)}"
          + (", moving average" if args.ema else "") + f") -> {args.out}")
    if args.all_tasks:
        results = export_all_tasks(ckpt, args.out, **common)
    else:
        results = [export_subnet(ckpt, args.task, args.out, path=args.path, depth=args.depth,
                                 mlp_ratio=args.mlp_ratio, num_heads=args.num_heads, **common)]
    verified = all(r.max_abs_diff or r.int8 for r in results)
    print(f"wrote {len(results)} subnet{'s' if len(results) > 1 else ''} to {args.out}"
          + (f" (verified against the {'trained student' if ckpt.config.distill else 'supernet'})" if verified
             else " (not verified)"))
    if args.track:
        from ufo.tracking import log_export

        log_export(ckpt.path, results, uri=args.track_uri)
    if args.register:
        from ufo.tracking import register_subnets

        register_subnets(ckpt.path, results, args.register, uri=args.track_uri)


def _export_best(args: argparse.Namespace, common: dict) -> None:
    """`ufo export RUN --best`: every task (or --task) from the checkpoint where its metric peaked."""
    from ufo.best import read_best
    from ufo.checkpoint import read_checkpoint, with_ema
    from ufo.errors import ExportError
    from ufo.export import export_subnet

    if args.path or args.path_from or args.depth or args.mlp_ratio or args.register:
        raise ExportError("--best exports each task on its configured path and full size; --path, --path-from, "
                          "--depth, --mlp-ratio and --register apply to one checkpoint")
    run = Path(args.checkpoint)
    checkpoints = next((d for d in (run / "checkpoints", run, run.parent) if (d / "best.json").is_file()), None)
    if checkpoints is None:
        raise ExportError(f"{run}: no checkpoints/best.json (a run with train.keep_best keeps one)")
    best = read_best(checkpoints)
    tasks = list(best) if args.all_tasks else [args.task]
    missing = [t for t in tasks if t not in best]
    if missing:
        raise ExportError(f"{checkpoints / 'best.json'}: no best checkpoint of task {missing[0]} "
                          f"(it has {', '.join(best) or 'none'})")
    results = []
    for task in tasks:
        entry = best[task]
        ckpt = read_checkpoint(checkpoints / entry["checkpoint"], tasks=[task])
        ckpt = with_ema(ckpt) if args.ema else ckpt
        print(f"ufo export: {task} from {entry['checkpoint']} (its best: {entry['metric']} {entry['value']:.4f} "
              f"at step {entry['step']})")
        results.append(export_subnet(ckpt, task, args.out / task if args.all_tasks else args.out, **common))
        if args.track:
            from ufo.tracking import log_export

            log_export(ckpt.path, results[-1:], uri=args.track_uri)
    print(f"wrote {len(results)} subnet{'s' if len(results) > 1 else ''} to {args.out}, each from its task's best "
          "checkpoint" + (" (verified against the supernet)" if all(r.max_abs_diff or r.int8 for r in results) else ""))


def _search(args: argparse.Namespace) -> None:
    import os

    from ufo.checkpoint import read_checkpoint
    from ufo.plots import plot_pareto
    from ufo.search import format_result, search_path, write_result

    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ:  # under torchrun or deepspeed: the ranks share the evaluations
        from ufo.layout import init_distributed

        rank, world, _ = init_distributed()
    say = print if rank == 0 else (lambda _: None)
    ckpt = read_checkpoint(args.checkpoint)
    result = search_path(ckpt, args.task, budget_evals=args.budget_evals, seed=args.seed,
                         population=args.population, rank=rank, world=world, log=say,
                         max_params=None if args.max_params is None else int(args.max_params),
                         max_latency_ms=args.max_latency_ms)
    if world > 1:
        from ufo.layout import leave_distributed

        leave_distributed()
    if rank != 0:
        return
    run_dir = ckpt.path.parent.parent if (ckpt.path / "ufo.json").is_file() else ckpt.path.parent
    out = write_result(result, args.out or run_dir / f"search-{args.task}.json")
    print(format_result(result))
    if args.max_params is not None or args.max_latency_ms is not None:
        print(f"Pareto plot: {plot_pareto(result, out.with_suffix('.png'))}")
    print(f"wrote {out}; export it with: ufo export {args.checkpoint} --task {args.task} --path-from {out} "
          "--out DIR")
    if args.track:
        from ufo.tracking import log_search

        log_search(ckpt.path, result, out, uri=args.track_uri)


def _eval(args: argparse.Namespace) -> None:
    import json
    import os

    from ufo.atomic import atomic_file
    from ufo.evaluate import eval_target, format_report, parse_shards, report_path

    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ:  # under torchrun or deepspeed: each rank embeds its share
        from ufo.layout import init_distributed

        rank, world, _ = init_distributed()
    say = print if rank == 0 else (lambda _: None)
    report = eval_target(args.target, args.task, parse_shards(args.shards or []), args.protocol, args.path,
                         args.batch_size, rank, world, say)
    if world > 1:
        from ufo.layout import leave_distributed

        leave_distributed()
    if rank != 0:
        return
    out = args.out or report_path(args.target, args.task)
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    print(f"wrote {out}")


def _data_write(args: argparse.Namespace) -> None:
    from ufo.data import open_source, write_task_shards

    source = open_source(args.source, args.task, classes=args.classes, samples=args.samples,
                         difficulty=args.difficulty, image_size=args.image_size, seed=args.seed)
    kind = args.kind or source.kind or "classification"
    print(f"ufo data write: task {args.task} ({kind}) from {source.description}")
    write_task_shards(source, args.task, args.out, kind=kind, maxcount=args.maxcount, maxsize=args.maxsize,
                      seed=args.seed, eval_fraction=args.eval_fraction, overwrite=args.overwrite,
                      max_side=args.max_side)


def _data_inspect(args: argparse.Namespace) -> int:
    import json

    from ufo.data.inspect import format_report, inspect_shards

    report = inspect_shards(args.shards, sheet=None if args.no_sheet else args.sheet)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 1 if report.problems else 0


def _bench_data(args: argparse.Namespace) -> None:
    from ufo.bench.data import bench_data, bench_jpeg, format_data_bench, format_jpeg_bench
    from ufo.bench.harness import show
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    result = bench_data(cfg, workers=workers, batches=args.batches)
    if args.jpeg_side:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ufo-bench-jpeg-") as work:
            result["jpeg"] = bench_jpeg(cfg, Path(work), side=args.jpeg_side, samples=args.jpeg_samples)
    show(result, format_data_bench, args.json)
    if not args.json and "jpeg" in result:
        print(format_jpeg_bench(result["jpeg"]))


def _bench_train(args: argparse.Namespace) -> None:
    from ufo.bench.harness import show
    from ufo.bench.train import bench_train, format_train_bench
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    memory = load_config(args.memory_config) if args.memory_config else None
    stages = [int(s) for s in args.memory_stages.split(",") if s.strip()]
    checkpointing = [int(k) for k in args.memory_checkpointing.split(",") if k.strip()]
    result = bench_train(cfg, steps=args.steps, world=args.ranks, memory_config=memory, stages=stages,
                         memory_batch=args.memory_batch, checkpointing=checkpointing)
    show(result, format_train_bench, args.json)


def _bench_scale(args: argparse.Namespace) -> None:
    from ufo.bench.harness import show
    from ufo.bench.scale import bench_scale, format_scale_bench, vit_h_config
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.partial_fc:
        from ufo.bench.scale import bench_partial_fc, format_partial_fc_bench

        show(bench_partial_fc(cfg, args.partial_fc, zero=args.zero, steps=args.steps), format_partial_fc_bench,
             args.json)
        return
    configs = Path(__file__).resolve().parents[1] / "configs"
    same = ["deepspeed.zero_stage=2", "deepspeed.precision=bf16"]  # every projection under one engine setting
    projections = {"ViT-B (4 tasks)": load_config(configs / "ufo_vit_b.yaml", same),
                   "ViT-L (4 tasks)": load_config(configs / "ufo_vit_l.yaml", same),
                   "ViT-H (26 tasks)": vit_h_config(26, same)} if args.project else {}
    counts = [int(n) for n in args.tasks.split(",") if n.strip()]
    result = bench_scale(cfg, counts, zero=args.zero, steps=args.steps, projections=projections)
    show(result, format_scale_bench, args.json)


def _bench_export(args: argparse.Namespace) -> None:
    from ufo.bench.export import bench_export, format_export_bench
    from ufo.bench.harness import show
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = bench_export(cfg, task=args.task, world=args.ranks, zero=args.zero)
    show(result, format_export_bench, args.json)


def _bench_deploy(args: argparse.Namespace) -> None:
    from ufo.bench.deploy import bench_deploy, format_deploy_bench
    from ufo.bench.harness import show

    out = args.out or Path(f"runs/bench-deploy-{args.task}")
    result = bench_deploy(args.checkpoint, args.task, out, args.student, args.steps, args.launcher, args.jobs,
                          track_uri=args.track_uri)
    show(result, format_deploy_bench, args.json)
    print(f"wrote {out / 'deploy.json'} and {out / 'deploy.png'}")


def _bench_weighting(args: argparse.Namespace) -> None:
    from ufo.bench.harness import show
    from ufo.bench.weighting import bench_weighting, format_weighting_bench
    from ufo.config import load_config
    from ufo.weighting import STRATEGIES

    cfg = load_config(args.config, args.overrides)
    strategies = list(STRATEGIES) if args.strategies == "all" else [s.strip() for s in args.strategies.split(",")]
    result = bench_weighting(cfg, strategies, args.steps, args.out, overwrite=args.overwrite,
                             log=(lambda _: None) if args.json else print)
    show(result, format_weighting_bench, args.json)
    if not args.json:
        print(f"weights and losses over time: {args.out / 'weighting.png'}")


def _bench_ufo(args: argparse.Namespace) -> None:
    from ufo.bench.harness import show
    from ufo.bench.ufo import UFO_SETTINGS, bench_ufo, format_ufo_bench, only_tasks
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.tasks:
        cfg = only_tasks(cfg, [t.strip() for t in args.tasks.split(",") if t.strip()])
    settings = list(UFO_SETTINGS) if args.settings == "all" else [s.strip() for s in args.settings.split(",")]
    settings += [f"fixed+{w.strip()}" for w in args.weightings.split(",") if w.strip()]
    if args.seeds < 1:
        raise UfoError(f"--seeds {args.seeds}: give at least 1")
    if args.jobs < 1 or (args.jobs > 1 and args.launcher):
        raise UfoError(f"--jobs {args.jobs}: give 1 or more, and 1 under --launcher (a launched run takes the "
                       "ranks it names)")
    if not 0 <= args.eval_every <= args.steps:
        raise UfoError(f"--eval-every {args.eval_every}: give 0 (the last step only) up to --steps {args.steps}")
    try:
        lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    except ValueError:
        raise UfoError(f"--lrs {args.lrs}: give comma-separated numbers, e.g. 5e-4,1e-3,2e-3") from None
    result = bench_ufo(cfg, args.steps, args.out, settings, launcher=args.launcher, overwrite=args.overwrite,
                       log=(lambda _: None) if args.json else print, seeds=args.seeds, lrs=lrs,
                       eval_every=args.eval_every, jobs=args.jobs)
    show(result, format_ufo_bench, args.json)
    if not args.json:
        print(f"wrote {args.out / 'ufo.json'} and {args.out / 'ufo.png'}")


def _bench_elastic(args: argparse.Namespace) -> None:
    from ufo.bench.elastic import bench_elastic, format_elastic_bench
    from ufo.bench.harness import show
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = bench_elastic(cfg, args.steps, args.out, overwrite=args.overwrite,
                           log=(lambda _: None) if args.json else print)
    show(result, format_elastic_bench, args.json)


def _bench_model(args: argparse.Namespace) -> None:
    from ufo.bench.harness import show
    from ufo.bench.model import bench_model, format_model_bench
    from ufo.config import load_config

    cfg = load_config(args.config, args.overrides)
    result = bench_model(cfg, batch_per_task=args.batch_per_task, steps=args.steps,
                         warmup=args.warmup, threads=args.threads, compile=args.compile)
    show(result, format_model_bench, args.json)


if __name__ == "__main__":
    sys.exit(main())
