"""The ``remat`` command line: ``remat policies | inspect | sweep | tune | targets | train``.

Each subcommand lives in its own ``_add_<name>`` function below; ``--help``
on any of them lists its options. Human tables (rich) by default; ``--json``
means one thing in every subcommand: alone, only JSON on stdout; ``--json
PATH``, the table and the JSON written to ``PATH``. Flag text becomes typed
values only here (e.g. :func:`search_point`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from remat import _compat, policies
from remat._errors import RematError
from remat._files import write_text

_compat.hide_frames(__file__)

if TYPE_CHECKING:
    from remat._tune import SearchPoint


def policy_table_markdown() -> str:
    """The registry as a Markdown table (name, saves, offloads, doc), as the
    documentation embeds it (``docs/guide/policies.md``); ``remat policies --markdown`` prints it."""
    lines = ["| policy | saves on device | offloads to host | what it is |", "|---|---|---|---|"]
    for name in policies.names():
        p = policies.get(name)
        saves = ", ".join([f"`{n}`" for n in sorted(p.save)] + ([f"matmuls ({p.dots})"] if p.dots else [])
                          ) or "layer inputs"
        if p.is_none or p.everything:
            saves = "everything" if p.is_none else "everything, under jax.checkpoint"
        offloads = ", ".join([f"`{n}`" for n in sorted(p.offload)]
                             + ([f"matmuls ({p.offload_dots})"] if p.offload_dots else [])) or "-"
        lines.append(f"| `{name}` | {saves} | {offloads} | {policies.describe(name)} |")
    return "\n".join(lines) + "\n"


def _policies(args: argparse.Namespace) -> int:
    if args.markdown:
        print(policy_table_markdown(), end="")
        return 0
    rows = []
    for name in policies.names():
        p = policies.get(name)
        rows.append({
            "name": name,
            "spec": str(p),
            "saves": sorted(p.save) + ([f"dots:{p.dots}"] if p.dots else []),
            "offloads": sorted(p.offload) + ([f"dots:{p.offload_dots}"] if p.offload_dots else []),
            "doc": policies.describe(name),
        })
    if args.json:
        _write_json(rows, args.json)
        if args.json == "-":
            return 0
    table = Table(title="remat policies", show_lines=True)
    for col in ("name", "saves", "offloads", "doc"):
        table.add_column(col, overflow="fold")
    for r in rows:
        saves = ("everything" if r["spec"] == "none" else "everything, under jax.checkpoint"
                 if r["spec"] == "everything_saveable" else ", ".join(r["saves"]) or "layer inputs")
        table.add_row(r["name"], saves, ", ".join(r["offloads"]) or "-", r["doc"])
    _print_wide(table)
    return 0


def _add_policies(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policies", help="list the registered remat policies",
                       description="List every registered policy: what it saves, offloads, and its doc.")
    _add_json(p, "the policies")
    p.add_argument("--markdown", action="store_true", help="print the Markdown table the docs embed")
    p.set_defaults(func=_policies)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a model on real text (bytes) under a remat policy",
        description="Byte-level language modelling (default corpus: this Python's standard library) "
                    "with AdamW + warmup/cosine + clipping, orbax checkpoints, exact --resume, "
                    "metrics.jsonl and loss.png in --out. Options left out take the defaults of "
                    "remat.train.TrainConfig, or with --resume the run's saved values.")
    p.add_argument("--model", help="model preset, or the path of a Hugging Face config.json (kept in --out)")
    p.add_argument("--policy", help="remat policy name or spec")
    p.add_argument("--groups", help="nested layer groups: 'sqrt' or 'G,K' with G*K = layers")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch", type=int, help="sequences per step")
    p.add_argument("--seq", type=int, help="bytes per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: steps // 10)")
    p.add_argument("--min-lr-ratio", type=float, help="the cosine decays to lr * this at the last step")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices")
    p.add_argument("--b1", type=float, help="AdamW first-moment decay rate")
    p.add_argument("--b2", type=float, help="AdamW second-moment decay rate")
    p.add_argument("--clip", type=float, help="max global gradient norm")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files/folders (default: the standard library's .py files)")
    p.add_argument("--data-ext", nargs="+", metavar="SUFFIX",
                   help="keep only these suffixes when walking --data folders, e.g. .py .md")
    p.add_argument("--val-fraction", type=float, help="share of files held out")
    p.add_argument("--eval-every", type=int, help="validate every K steps")
    p.add_argument("--eval-windows", type=int, help="validation sequences per evaluation")
    p.add_argument("--ckpt-every", type=int, help="checkpoint every K steps")
    p.add_argument("--seed", type=int, help="seed of init, data order and dropout")
    p.add_argument("--out", help="run folder (default runs/MODEL)")
    p.add_argument("--loss-chunks", type=int, help="compute the logits and loss in this many chunks")
    p.add_argument("--microbatches", type=int, help="accumulate gradients over K micro-batches a step")
    _add_api(p)
    _add_mesh_options(p)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")

    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    """``remat train``: resolve the config (unset options take the defaults of
    :class:`remat.train.TrainConfig`, or with ``--resume`` the run's saved
    values), train, print the summary. Returns 130 after Ctrl-C, with the
    checkpoint saved."""
    import dataclasses

    from remat._scan import parse_groups
    from remat.train import EXIT_PREEMPTED, Preempted, TrainConfig, load_config, train

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
             if getattr(args, f.name, None) is not None}
    if "groups" in given:
        given["groups"] = parse_groups(given["groups"])
    for k in ("data", "data_ext"):
        if k in given:
            given[k] = tuple(given[k])
    _say_ignored(given.get("model"))
    out = args.out or f"runs/{given.get('model', TrainConfig.model)}"
    cfg = load_config(out, given) if args.resume else TrainConfig(**given)
    console = Console()
    console.print(f"remat train → {out}: " + ", ".join(f"{k}={v}" for k, v in cfg.to_json().items()),
                  highlight=False)
    try:
        result = train(cfg, out, resume=args.resume, console=console)
    except KeyboardInterrupt:
        return 130
    except Preempted:
        return EXIT_PREEMPTED
    console.print(result.summary(), highlight=False)
    return 0


MODEL_HELP = ("model preset (remat.models.names()), the path of a Hugging Face config.json or a MaxText "
              "model .yml, or your own remat.Workload as module:attribute (e.g. mypkg.train:workload; the "
              "attribute may be a zero-argument function returning one)")


def _model(text: str) -> Any:
    """``--model``: a workload for ``module:attribute`` (:func:`remat._workload.load_workload`), else the
    text (a preset name or a config path)."""
    import os
    import re

    if re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*", text) and not os.path.exists(text):
        from remat._workload import load_workload

        return load_workload(text)
    return text


def _say_ignored(model: str | None) -> None:
    """For a ``config.json`` or MaxText YAML, say which keys it sets that change
    numerics only and are not modelled (RoPE scaling, sliding windows), and
    which keys read it leaves to their defaults."""
    if model and model.endswith((".json", ".yml", ".yaml")):
        from remat.models.hf import defaults_note, ignored_keys

        try:
            keys = ignored_keys(model) if model.endswith(".json") else []
            note = defaults_note(model)
        except (OSError, ValueError, AttributeError):
            return  # reading it fails later, with the reader's message
        console = Console(stderr=True, soft_wrap=True)
        if keys:
            console.print(f"note: {model} sets {', '.join(keys)}: numerics only (no shape, parameter or "
                          "memory figure changes), not modelled", highlight=False)
        if note:
            console.print(f"note: {note}", highlight=False)


def _run_defaults(args: argparse.Namespace) -> None:
    """Fill ``--policy`` and ``--batch`` left out from a MaxText YAML's
    ``remat_policy`` and ``per_device_batch_size`` (times the device count)."""
    _say_ignored(args.model)
    d: dict = {}
    if args.model.endswith((".yml", ".yaml")):
        from remat.models.hf import maxtext_run_defaults

        d = maxtext_run_defaults(args.model)
    if getattr(args, "policy", "") is None:
        if "policy" not in d:
            raise RematError("--policy is required (or a MaxText YAML as --model that sets remat_policy)")
        args.policy = d["policy"]
    if args.batch is None and d:
        args.batch = max(1, int(d["per_device_batch_size"] * _device_count(args)))


def _device_count(args: argparse.Namespace) -> int:
    """The devices the step runs on: the target's (``--devices``, or the
    ``--mesh`` sizes' product), or JAX's on ``cpu``."""
    if getattr(args, "target", "cpu") == "cpu":
        import jax

        return jax.device_count()
    from remat._mesh import parse_mesh

    if args.devices:
        return args.devices
    return math.prod(parse_mesh(args.mesh).values()) if args.mesh else 1


def _add_step_options(p: argparse.ArgumentParser, *, search: bool = False) -> None:
    """The train-step options that ``inspect``, ``sweep`` and (``search=True``)
    ``tune`` share, each declared here once. ``tune`` searches the knobs:
    its ``--batch`` also takes ``auto``, its ``--groups`` is what the search
    may use, and it has no ``--loss-chunks``/``--microbatches``."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    auto = ", or 'auto': the largest that fits" if search else ""
    p.add_argument("--batch", type=None if search else int,
                   help=f"global sequences (examples) per step{auto} (default: a MaxText YAML's "
                        "per_device_batch_size x devices, else the workload's: 1 for a preset)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default min(2048, max_seq_len))")
    p.add_argument("--dtype", help="compute dtype override: bf16, f32 or f16 (default: the preset's)")
    if search:
        p.add_argument("--groups", default="sqrt", help="nested layer groups the search may use: 'sqrt', "
                                                        "'G,K' with G*K = layers, or 'none' (default sqrt)")
    else:
        p.add_argument("--groups", help="nested layer groups: 'sqrt' or 'G,K' with G*K = layers")
        p.add_argument("--loss-chunks", type=int, help="compute the logits and loss in this many chunks over "
                                                        "the tokens (default 1: at once)")
        p.add_argument("--microbatches", type=int, help="accumulate gradients over this many micro-batches "
                                                        "of batch/microbatches (default 1)")
    _add_api(p)
    _add_mesh_options(p)
    _add_target_options(p)


def _add_target_options(p: argparse.ArgumentParser) -> None:
    """``--target``, ``--attention`` and ``--mem-fraction``: what the step is compiled for."""
    from remat._targets import target_names
    from remat.models.config import ATTENTION_IMPLS

    p.add_argument("--target", default="cpu", choices=target_names(),
                   help="compile for this accelerator (see `remat targets`): a GPU or TPU target compiles "
                        "deviceless on this host with XLA:GPU (pip install 'remat[gpu]') or libtpu (pip "
                        "install 'remat[tpu]'), its memory and rates in the report; default cpu, this host's "
                        "XLA:CPU")
    p.add_argument("--attention", choices=ATTENTION_IMPLS,
                   help="the model's attention: xla (einsum, tags scores and probs), dot_product_attention "
                        "(jax.nn's, cuDNN on a GPU backend), cudnn (cuDNN flash attention for a GPU target), "
                        "pallas (Pallas flash attention for a TPU target, sequence a multiple of 128); "
                        "default: the target's flash attention where it takes the model, else the preset's")
    p.add_argument("--xla-remat", action="store_true",
                   help="on a GPU target, let XLA:GPU's own rematerialization pass run (off by default, as "
                        "in NVIDIA's MaxText recipes: above ~80%% of device memory it silently changes the "
                        "program being compared); train with the same setting")
    p.add_argument("--mem-fraction", type=float,
                   help="the fraction of device memory the runtime may allocate (default 0.75, JAX's; "
                        "NVIDIA's recipes use 0.94)")


def _add_rates(p: argparse.ArgumentParser) -> None:
    """``--host-bandwidth`` and ``--peak-flops``: the rates of the transfer/compute figures."""
    p.add_argument("--host-bandwidth", type=float, help="host-link bytes per second each way for the offload "
                                                         "transfer time (default: the target's; on cpu 64e9, "
                                                         "PCIe Gen5 x16, assumed)")
    p.add_argument("--peak-flops", type=float, help="device FLOPs per second for the compute time (default: "
                                                     "the target's; on cpu 989e12, H200 dense bf16, assumed)")


API_CHOICES = ("linen", "nnx")
"""``--api``'s values: :data:`remat.models.nnx.APIS` (not imported here: ``--help`` stays fast)."""


def _add_api(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", choices=API_CHOICES, help="the Flax API a preset is built in: linen (default) or "
                                                      "nnx (the same parameters)")


def _add_mesh_options(p: argparse.ArgumentParser) -> None:
    """``--mesh`` and ``--devices``, shared by ``inspect``, ``sweep`` and ``train``."""
    p.add_argument("--mesh", help="device mesh AXIS=SIZE,... over the axes data, fsdp, tensor (their product "
                                  "= the device count), e.g. data=2,fsdp=4; memory is then per device")
    p.add_argument("--devices", type=int, help="with --target cpu: simulate this many CPU devices (set "
                                               "before JAX starts); with another target: that many of its "
                                               "devices (the --mesh sizes multiply to it; without --mesh, "
                                               "fsdp=N, as MaxText's default ici_fsdp_parallelism=-1)")
    p.add_argument("--distributed", action="store_true",
                   help="join a multi-process run (jax.distributed.initialize); the options below, or JAX's "
                        "environment (JAX_COORDINATOR_ADDRESS, SLURM, Cloud TPU, MPI) say where")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0 (implies --distributed)")
    p.add_argument("--num-processes", type=int, help="how many processes take part")
    p.add_argument("--process-id", type=int, help="this process's index, 0..num-processes-1")


def _step_kwargs(args: argparse.Namespace) -> dict:
    """``batch``/``seq``/``dtype``/``groups``/``mesh`` for :func:`remat.train_step_setup` and
    :func:`remat.sweep`."""
    from remat._mesh import parse_mesh
    from remat._scan import parse_groups

    return {"batch": args.batch, "seq": args.seq, "dtype": args.dtype,
            "groups": parse_groups(args.groups) if args.groups else None,
            "mesh": parse_mesh(args.mesh) if args.mesh else None, "loss_chunks": args.loss_chunks,
            "microbatches": args.microbatches, "api": args.api, **_target_kwargs(args)}


def _compiler_options(args: argparse.Namespace) -> dict | None:
    """None (the platform's defaults), or XLA's own defaults with ``--xla-remat``."""
    if not args.xla_remat:
        return None
    if args.target == "cpu":
        raise RematError("--xla-remat is XLA:GPU's rematerialization pass: give a GPU --target "
                         "(see `remat targets`)")
    return {}


def _target_kwargs(args: argparse.Namespace) -> dict:
    """``target``/``attention``/``mem_fraction`` for the Python API."""
    return {"target": args.target, "attention": args.attention, "mem_fraction": args.mem_fraction}


def _print_wide(renderable: object, width: int = 150) -> None:
    """Print with rich; when stdout is not a terminal, at ``width`` columns
    instead of rich's 80, so piped tables keep their shape."""
    console = Console()
    (console if console.is_terminal else Console(width=width)).print(renderable)


def _add_json(p: argparse.ArgumentParser, what: str) -> None:
    """``--json [PATH]``, one meaning in every subcommand: alone (or ``-``),
    only the JSON, on stdout; with a path, the table as usual and the JSON
    written to ``PATH``."""
    p.add_argument("--json", nargs="?", const="-", metavar="PATH",
                   help=f"{what} as JSON: alone (or '-'), on stdout instead of the table; with PATH, also "
                        "written to PATH")


def _write_json(value: Any, json_path: str) -> None:
    """``value`` as JSON on stdout (``"-"``) or written whole to ``json_path``."""
    text = json.dumps(value, indent=2)
    if json_path == "-":
        print(text)
    else:
        write_text(json_path, text)
        Console(stderr=True).print(f"wrote {json_path}", highlight=False)


def _emit(value: Any, json_path: str | None, width: int = 150) -> int:
    """Print ``value`` (a rich renderable with ``to_dict()``), or only its JSON
    for ``json_path="-"``; also write the JSON to ``json_path``. Returns 0."""
    if json_path != "-":
        _print_wide(value, width=width)
    if json_path:
        _write_json(value.to_dict(), json_path)
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="measure one policy on a model's train step (compile-only)",
        description="Compile (never run) the train step of a model preset (forward, loss, gradients, "
                    "AdamW) on abstract inputs and report per-device memory, the residuals the policy "
                    "keeps by name x layers (device or host), FLOPs with every layer counted and the "
                    "recompute overhead against policy 'none'.")
    _add_step_options(p)
    p.add_argument("--policy", help="remat policy name or spec (see `remat policies`; default: a MaxText "
                                    "YAML's remat_policy)")
    _add_json(p, "the report")
    _add_rates(p)

    def run(args: argparse.Namespace) -> int:
        from remat._sweep import inspect_policy, train_step_setup

        _run_defaults(args)
        with Console().status(f"compiling the {args.model} train step under {args.policy!r} ..."):
            report = inspect_policy(train_step_setup(_model(args.model), **_step_kwargs(args)), args.policy,
                                    compiler_options=_compiler_options(args))
        return _emit(report.with_rates(args.host_bandwidth, args.peak_flops), args.json)

    p.set_defaults(func=run)


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="measure many policies on a model's train step; Pareto table and plot",
        description="Compile (never run) the train step of a model preset under every policy preset "
                    "that applies to it (or --policies) and print a table sorted by peak memory per "
                    "device, the Pareto frontier (memory vs FLOPs) marked.")
    _add_step_options(p)
    p.add_argument("--policies", help="comma-separated policy names or specs (default: every preset "
                                      "that applies to the model, one per distinct policy)")
    p.add_argument("--workers", type=int, default=2, help="compile threads (default 2)")
    _add_json(p, "every report")
    p.add_argument("--plot", metavar="PATH", help="save the memory-vs-FLOPs plot (.png, .svg, .pdf)")
    _add_rates(p)

    def run(args: argparse.Namespace) -> int:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from remat._sweep import plot_sweep, sweep, train_step_setup

        _run_defaults(args)
        specs = None if args.policies is None else [x.strip() for x in args.policies.split(",")]
        if specs is not None and not all(specs):
            raise RematError(f"--policies {args.policies!r} has an empty entry")
        setup = train_step_setup(_model(args.model), **_step_kwargs(args))  # bad input: before the bar
        console = Console(stderr=True)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"tracing {args.model} ...", total=None)

            def advance(r: object, done: int, total: int) -> None:
                bar.update(task, description=f"compiled {getattr(r, 'label', '')}", completed=done,
                           total=total)

            result = sweep(setup, specs, workers=args.workers, on_report=advance,
                           compiler_options=_compiler_options(args))
        _emit(result.with_rates(args.host_bandwidth, args.peak_flops), args.json, width=160)
        if args.plot:
            plot_sweep(result, args.plot)
            console.print(f"wrote {args.plot}", highlight=False)
        return 0

    p.set_defaults(func=run)


def _add_tune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="the least-recompute configuration that fits a memory budget per device",
        description="Search save/offload/recompute per checkpoint name, dots rules, policy segments, nested "
                    "groups, the chunked loss head and micro-batches for the configuration with the least "
                    "recompute FLOPs whose train step fits --budget per device: a cost model from a few "
                    "compiles, solved exactly, the pick confirmed by compiling. Prints the flags that "
                    "reproduce it.")
    _add_step_options(p, search=True)
    p.add_argument("--budget", help="memory per device, with its unit: 80GiB, 512MiB, 4e10B (default: the "
                                    "target's usable memory; required on cpu)")
    p.add_argument("--allow-offload", action="store_true", help="let checkpoint names be offloaded to host")
    p.add_argument("--max-microbatches", type=int, default=8, help="the most micro-batches (default 8)")
    p.add_argument("--max-compiles", type=int, help="the cap on compiles (default 15; 40 with --batch auto)")
    _add_json(p, "the result")

    def run(args: argparse.Namespace) -> int:
        from remat._mesh import parse_mesh
        from remat._scan import parse_groups
        from remat._tune import tune

        if args.batch != "auto":
            args.batch = None if args.batch is None else _positive_int("--batch", args.batch)
            _run_defaults(args)
        batch = args.batch
        with Console(stderr=True).status(f"tuning the {args.model} train step on {args.target} ..."):
            result = tune(_model(args.model), args.budget, batch=batch, seq=args.seq, dtype=args.dtype,
                          mesh=parse_mesh(args.mesh) if args.mesh else None, allow_offload=args.allow_offload,
                          groups=None if args.groups == "none" else parse_groups(args.groups),
                          max_microbatches=args.max_microbatches, max_compiles=args.max_compiles,
                          api=args.api, compiler_options=_compiler_options(args), **_target_kwargs(args))
        return _emit(result, args.json, width=160)

    p.set_defaults(func=run)


def _positive_int(flag: str, text: str) -> int:
    """``text`` as a positive int, or a RematError naming ``flag`` and the valid forms."""
    if not text.isdigit() or int(text) < 1:
        raise RematError(f"{flag} {text!r}: a positive integer or 'auto'")
    return int(text)


def search_point(argv: Sequence[str]) -> SearchPoint:
    """The :class:`remat.SearchPoint` that ``--policy``, ``--groups``,
    ``--loss-chunks`` and ``--microbatches`` give (as
    :meth:`remat.SearchPoint.flags` writes them), parsed by ``remat
    train``'s own parser: flag text is read only here, at the CLI edge.

    Raises:
      RematError: bad ``--policy`` segments or ``--groups``.
      SystemExit: flags ``remat train`` does not take (argparse's usage error).
    """
    from remat._scan import is_segment_text, parse_groups, parse_segments
    from remat._tune import SearchPoint

    args = build_parser().parse_args(["train", *argv])
    policy = args.policy or "full"
    return SearchPoint(tuple(parse_segments(policy)) if is_segment_text(policy) else policy,
                       parse_groups(args.groups) if args.groups else None, args.loss_chunks or 1,
                       args.microbatches or 1)


def build_parser() -> argparse.ArgumentParser:
    """The ``remat`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="remat", description="Named, checked, measured rematerialization policies for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_policies(sub)
    _add_train(sub)
    _add_inspect(sub)
    _add_sweep(sub)
    _add_tune(sub)
    _add_targets(sub)
    return parser


def _add_targets(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("targets", help="list the accelerators --target compiles for",
                       description="The targets of --target: each device's memory, what the runtime may "
                                   "allocate of it, its peak dense bf16 rate, HBM and host-link bandwidth, "
                                   "and where the figures come from.")

    def run(args: argparse.Namespace) -> int:
        from remat._format import format_bytes
        from remat._targets import TARGETS

        t = Table(title="remat targets (--target)", caption="usable = memory x fraction - runtime reserve")
        for col in ("name", "device", "memory", "usable", "bf16 peak", "HBM", "host link", "source"):
            t.add_column(col, overflow="fold")
        for x in TARGETS.values():
            t.add_row(x.name, x.device_kind, format_bytes(x.memory_bytes), format_bytes(x.usable_bytes()),
                      f"{x.peak_flops_per_s / 1e12:.4g} TFLOP/s", f"{x.hbm_bytes_per_s / 1e12:.3g} TB/s",
                      f"{x.host_link_bytes_per_s / 1e9:.3g} GB/s", x.source)
        _print_wide(t, width=200)
        return 0

    p.set_defaults(func=run)


def _check_devices(args: argparse.Namespace) -> None:
    """On a target other than cpu, ``--devices`` must be the ``--mesh`` sizes'
    product; without ``--mesh`` it means ``--mesh fsdp=N`` (all devices on
    FSDP, as MaxText's default ``ici_fsdp_parallelism: -1``)."""
    from remat._mesh import parse_mesh

    if args.devices is not None and args.mesh and math.prod(parse_mesh(args.mesh).values()) != args.devices:
        raise RematError(f"--mesh {args.mesh} has {math.prod(parse_mesh(args.mesh).values())} devices, but "
                         f"--devices {args.devices}: make the sizes multiply to {args.devices}")
    if args.devices is not None and args.devices > 1 and not args.mesh:
        args.mesh = f"fsdp={args.devices}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``remat`` command. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        target = getattr(args, "target", "cpu")
        from remat._targets import prepare_environment

        prepare_environment(target)  # before JAX starts: the CUDA plugin registers without a driver
        if target != "cpu":
            _check_devices(args)
        elif getattr(args, "devices", None) is not None:
            from remat._mesh import set_cpu_devices

            set_cpu_devices(args.devices)
        if getattr(args, "distributed", False) or getattr(args, "coordinator", None):
            from remat._mesh import initialize_distributed

            initialize_distributed(args.coordinator, args.num_processes, args.process_id)
        status = args.func(args)
        sys.stdout.flush()  # a reader that went away fails here, inside this handler, not at exit
        return status
    except BrokenPipeError:  # `remat policies --json | head`: stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's signal docs, on SIGPIPE
        return 1
    except RematError as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for SIGINT, not a traceback
        Console(stderr=True).print(f"interrupted: remat {args.command} stopped", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
