"""The core sub-commands: methods, generate, bench, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import typing
from pathlib import Path

from tokensift.errors import TokensiftError

if typing.TYPE_CHECKING:
    from tokensift.bench.config import BenchConfig


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list methods, their hook points, parameters and papers")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", help="generate text with a method switched on")
    p.add_argument("prompt", nargs="?", help="the prompt (or use --prompt-file, or - for stdin)")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--model", default=None, help="embedded model name, local directory or HF id")
    p.add_argument("--method", default="dense", help="NAME[:key=value,...][+NAME...] (default: dense)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument(
        "--question",
        help="ask this after the prompt: the prompt is compressed alone, the question appended "
        "uncompressed (query-agnostic protocol)",
    )
    p.add_argument(
        "--compression-ratio",
        type=float,
        help="kvpress's convention: the fraction of the KV cache the eviction method removes "
        "(0.75 = budget=0.25)",
    )
    p.add_argument(
        "--passages-file",
        type=Path,
        help='JSONL of passages (a string or {"text": ...} per line) that make the context; a context '
        "method (crag) chooses among them; the prompt, if given, is an instruction before them",
    )
    p.add_argument("--json", action="store_true", help="print text and stats as JSON")
    add_device_arguments(p)
    p.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="prefill the prompt in chunks of N tokens, the eviction method compressing after each "
        "(peak KV near budget + N)",
    )
    add_lookahead_argument(p)
    p.add_argument(
        "--context-parallel",
        type=int,
        metavar="P",
        help="split the prompt over P ranks (launch: torchrun --nproc-per-node P -m tokensift generate ...)",
    )
    p.add_argument(
        "--cp-schedule", choices=["ring", "tokenring"], default="tokenring", help="context-parallel prefill"
    )
    p.add_argument(
        "--gather-after-prefill",
        action="store_true",
        help="context parallel: decode on a gathered cache, not split",
    )
    p.add_argument(
        "--cp-timeout", type=float, default=120.0, help="seconds before a silent peer rank is an error"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="run tasks x methods x lengths; resumable")
    p.add_argument(
        "--suite",
        help="a named configuration: demo, ruler-lite, leaderboard, leaderboard-sparse or full "
        "(options override it; --list-tasks shows each)",
    )
    p.add_argument("--preset", help="the older name of --suite")
    p.add_argument("--model", default=None)
    p.add_argument(
        "--tasks", help="comma list of tasks (niah_single_1, vt, nt_single:unit=chars, ...); see --list-tasks"
    )
    p.add_argument("--list-tasks", action="store_true", help="list the tasks and suites, then exit")
    p.add_argument("--methods", help="comma list of NAME[:key=value,...] (';' also separates)")
    p.add_argument(
        "--compression-ratio",
        help="comma list of kvpress compression ratios (fraction removed): each eviction method runs "
        "at budget 1 - ratio for every ratio given",
    )
    p.add_argument("--lengths", help="comma list of prompt lengths in tokens: 1k,2k,4096")
    p.add_argument("--depths", help="comma list of needle depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument(
        "--samples", type=int, help="samples per task and length, per depth for depth-swept tasks (default 3)"
    )
    p.add_argument(
        "--depth-samples", type=int, help="samples per depth for depth-swept tasks (default: --samples)"
    )
    p.add_argument("--seed", type=int, help="base seed for task generation (default 0)")
    p.add_argument(
        "--protocol",
        choices=["query-aware", "query-agnostic", "both"],
        help="query-aware (default): methods compress the whole prompt; query-agnostic: the context "
        "alone, with the question appended afterwards; both: each sample under both, into one results file",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="model weights and activations (default float32; the ruler-lite and leaderboard suites use "
        "auto: bfloat16 where a short cached probe finds it faster on this CPU, else float32)",
    )
    p.add_argument("--device", help=DEVICE_HELP)
    p.add_argument(
        "--no-shared-prefill",
        action="store_true",
        help="run every method's own prefill even where it is exact dense attention (slower)",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        metavar="N",
        help="prefill every prompt in chunks of N tokens, compressing after each (no shared prefill)",
    )
    p.add_argument(
        "--batch-decode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode all the plans of a sample in one batch, one forward per step, each over its own "
        "cache (faster grids; per-row decode times are then the batch's; on in the leaderboard suites)",
    )
    add_lookahead_argument(p)
    p.add_argument("--out", type=Path, help="output directory (rerun to resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the cells on Ray actors (needs tokensift[ray]): no ADDRESS starts a local instance, "
        "'auto' or ray://HOST:PORT joins a cluster",
    )
    p.add_argument("--ray-workers", type=int, help="actors, each holding the model (default: all CPUs/GPUs)")
    p.add_argument("--ray-cpus-per-worker", type=float, help="CPUs and torch threads per actor (default 1)")
    p.add_argument(
        "--ray-gpus-per-worker", type=float, help="GPUs per actor (default: 1 if the cluster has any)"
    )
    p.add_argument(
        "--ray-max-retries", type=int, help="resubmissions of a cell whose worker died (default 2)"
    )
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild summary.md, report.html and plots from DIR/results.jsonl")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_report)


DEVICE_HELP = "cpu (default), cuda, cuda:N, or auto (cuda when torch sees a GPU, else cpu)"


def add_device_arguments(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """`--device` (and `--dtype`) for a command that loads a model."""
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    if dtype:
        p.add_argument(
            "--dtype",
            choices=["float32", "bfloat16", "float16", "auto"],
            default="float32",
            help="model weights and activations (default float32; auto: bfloat16 on a GPU, on a CPU "
            "bfloat16 where a short cached probe finds it faster, else float32)",
        )


def cmd_methods(args: argparse.Namespace) -> int:
    from tokensift.methods import REGISTRY

    entries = []
    for name, cls in sorted(REGISTRY.items()):
        hints = typing.get_type_hints(cls)
        params = {
            f.name: {"type": _type_name(hints[f.name]), "default": f.default}
            for f in dataclasses.fields(cls)
            if f.init
        }
        entries.append(
            {
                "name": name,
                "hooks": sorted(h.value for h in cls.hooks) or ["-"],
                "params": params,
                "summary": cls.summary(),
                "paper": cls.paper,
                "applied_by": list(cls.applied_by),
            }
        )
    if args.json:
        print(json.dumps(entries, indent=1, default=str))
        return 0
    for e in entries:
        params = ", ".join(f"{k}={v['default']}" for k, v in e["params"].items()) or "-"
        print(f"{e['name']}  [{', '.join(e['hooks'])}]  {params}")
        print(f"    {e['summary']}")
        print(f"    {e['paper']}")
        if e["applied_by"]:
            print(f"    applied when {' or '.join(e['applied_by'])} > 0")
    return 0


def add_lookahead_argument(p: argparse.ArgumentParser) -> None:
    """`--prefill-lookahead W` (generate and bench): see `tokensift.runtime.generate.prefill_chunked`."""
    p.add_argument(
        "--prefill-lookahead",
        type=int,
        default=0,
        metavar="W",
        help="with --prefill-chunk: append the prompt's last W tokens to each earlier chunk's forward, "
        "so window scorers (snapkv) score every chunk with the prompt's final window",
    )


def _type_name(annotation: object) -> str:
    text = str(annotation).replace("typing.", "")
    return re.sub(r"<class '(\w+)'>", r"\1", text)


def cmd_generate(args: argparse.Namespace) -> int:
    from tokensift.models import DEFAULT_MODEL, load
    from tokensift.runtime.generate import check_prefill_chunk, generate
    from tokensift.runtime.plan import Plan

    if args.prompt_file is not None:
        if args.prompt is not None:
            raise TokensiftError("give a prompt or --prompt-file, not both")
        if not args.prompt_file.is_file():
            raise TokensiftError(f"prompt file {args.prompt_file} does not exist")
        try:
            prompt = args.prompt_file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise TokensiftError(
                f"prompt file {args.prompt_file} is not UTF-8 text (byte {exc.start}): convert it, "
                f"e.g. `iconv -f latin1 -t utf-8 {args.prompt_file}`"
            ) from None
    elif args.prompt == "-":
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as exc:
            raise TokensiftError(
                f"standard input is not UTF-8 text (byte {exc.start}): convert it, e.g. with iconv"
            ) from None
    elif args.prompt is not None:
        prompt = args.prompt
    elif args.passages_file is not None:
        prompt = None
    else:
        raise TokensiftError("no prompt: give one, --prompt-file FILE, or - to read stdin")
    passages = read_passages(args.passages_file) if args.passages_file is not None else None
    if passages is None and not prompt.strip():
        raise TokensiftError("empty prompt: give some text, --prompt-file FILE, or - to read stdin")
    from tokensift.methods.spec import with_compression_ratio

    spec = args.method
    if args.compression_ratio is not None:
        spec = with_compression_ratio(spec, args.compression_ratio)
    plan = Plan.of(spec)  # parse before loading the model: bad specs fail fast
    check_prefill_chunk(args.prefill_chunk, lookahead=args.prefill_lookahead)
    chunking: dict[str, int] = {}
    if args.prefill_chunk is not None:
        chunking = {"prefill_chunk": args.prefill_chunk, "prefill_lookahead": args.prefill_lookahead}
    if chunking and args.context_parallel is not None:
        raise TokensiftError("--prefill-chunk and --context-parallel cannot be combined")
    run: typing.Any = generate
    if args.context_parallel is not None:  # every torchrun rank runs this; rank 0 prints
        from tokensift.distributed.generate import runner_from_args

        run = runner_from_args(args)
    model = load(args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device)
    result = run(
        model,
        prompt,
        plan,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        raw=args.raw,
        question=args.question,
        **({"passages": passages} if passages is not None else {}),
        **chunking,
    )
    if result is None:
        return 0
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
        return 0
    print(result.text)
    s = result.stats
    print(
        f"[{s.method}] prompt {s.prompt_tokens} tok, {s.new_tokens} new; prefill {s.prefill_seconds:.2f}s"
        + (
            f" in {s.counters.get('prefill_chunks', 0):g} chunks of {s.prefill_chunk}"
            + (f" (lookahead {s.prefill_lookahead})" if s.prefill_lookahead else "")
            if s.prefill_chunk
            else ""
        )
        + f", decode {s.decode_tokens_per_second:.1f} tok/s; KV held {s.kv_bytes_peak / 2**20:.1f} MiB "
        f"= {s.kv_ratio:.2f} of dense",
        file=sys.stderr,
    )
    return 0


def read_passages(path: Path) -> list[str]:
    """Passages from a JSONL file: each line a JSON string or an object with a "text" field."""
    if not path.is_file():
        raise TokensiftError(f"passages file {path} does not exist")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TokensiftError(f"{path}:{number}: not JSON ({exc.msg})") from None
        text = item.get("text") if isinstance(item, dict) else item
        if not isinstance(text, str) or not text.strip():
            raise TokensiftError(f'{path}:{number}: expected a string or {{"text": "..."}} with some text')
        out.append(text)
    if not out:
        raise TokensiftError(f"passages file {path} holds no passages")
    return out


def parse_lengths(text: str) -> list[int]:
    out = []
    for item in filter(None, (t.strip().lower() for t in text.split(","))):
        match = re.fullmatch(r"(\d+)(k?)", item)
        if not match or int(match.group(1)) <= 0:
            raise TokensiftError(f"bad length {item!r}: use token counts like 1k, 2k or 4096")
        out.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    if not out:
        raise TokensiftError("--lengths is empty")
    return out


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise TokensiftError(f"bad {what} {text!r}: expected comma-separated numbers") from None


def split_methods(text: str) -> list[str]:
    """Split a comma list of method specs: a comma starts a new method only before `name[:+(]`, and
    never inside a wrapper's parentheses."""
    from tokensift.methods import REGISTRY
    from tokensift.methods.spec import split_top_level

    parts: list[str] = []
    for piece in split_top_level(text.replace(";", ","), ","):
        head = re.split(r"[:+(]", piece.strip(), maxsplit=1)[0]
        if not parts or (head in REGISTRY and "=" not in piece.split(":")[0]):
            parts.append(piece.strip())
        else:
            parts[-1] += "," + piece.strip()
    return [p for p in parts if p]


def cmd_bench(args: argparse.Namespace) -> int:
    from tokensift.bench.config import BenchConfig
    from tokensift.bench.report import summary_table, write_report
    from tokensift.bench.suites import get_suite

    if args.list_tasks:
        return _list_tasks()
    if args.out is None:
        raise TokensiftError("bench needs --out DIR (rerun with the same DIR to resume)")
    if args.suite and args.preset and args.suite != args.preset:
        raise TokensiftError("give --suite or --preset, not both")
    suite = args.suite or args.preset
    if suite:
        config = get_suite(suite)
    else:
        missing = [n for n in ("tasks", "methods", "lengths") if getattr(args, n) is None]
        if missing:
            raise TokensiftError(f"bench needs --{', --'.join(missing)} (or --suite)")
        config = BenchConfig(tasks=[], methods=[], lengths=[])
    if args.tasks:
        config.tasks = split_tasks(args.tasks)
    if args.methods:
        config.methods = split_methods(args.methods)
    if args.compression_ratio:
        config.methods = expand_compression_ratios(
            config.methods, parse_floats(args.compression_ratio, "compression ratios")
        )
    if args.lengths:
        config.lengths = parse_lengths(args.lengths)
    if args.depths:
        config.depths = parse_floats(args.depths, "depths")
    if args.samples is not None:
        config.samples = args.samples
    if args.depth_samples is not None:
        config.depth_samples = args.depth_samples
    if args.seed is not None:
        config.seed = args.seed
    if args.model:
        config.model = args.model
    if args.protocol:
        config.protocol = args.protocol
    if args.no_shared_prefill:
        config.share_prefill = False
    if args.batch_decode is not None:
        config.batch_decode = args.batch_decode
    if args.prefill_chunk is not None:
        config.prefill_chunk = args.prefill_chunk
    if args.prefill_lookahead:
        config.prefill_lookahead = args.prefill_lookahead
    if args.dtype:
        config.dtype = args.dtype
    if args.device:
        config.device = args.device
    rows = run_grid(config, args)  # protocol "both": each sample under both, in turn
    summary = write_report(args.out)
    print(summary_table(rows))
    print(f"\nwrote {args.out / 'results.jsonl'}, {summary}, {args.out / 'report.html'} (+ plots)")
    return 0


def run_grid(config: BenchConfig, args: argparse.Namespace) -> list[dict]:
    """One bench run (locally or on Ray); returns every row of the results file."""
    from tokensift.bench.runner import run_bench

    if args.ray is not None:
        from tokensift.bench.ray_executor import options_from_args, run_bench_ray

        rows = run_bench_ray(config, args.out, options_from_args(args), progress=not args.no_progress)
    elif any(v is not None for k, v in vars(args).items() if k.startswith("ray_")):
        raise TokensiftError("--ray-workers, --ray-cpus-per-worker, ... only apply with --ray")
    else:
        rows = run_bench(config, args.out, progress=not args.no_progress)
    return rows


def expand_compression_ratios(methods: list[str], ratios: list[float]) -> list[str]:
    """Every method at every ratio; methods without an eviction hook (dense) once."""
    from tokensift.methods.spec import with_compression_ratio

    out: list[str] = []
    for spec in methods:
        for ratio in ratios:
            resolved = with_compression_ratio(spec, ratio)
            if resolved not in out:
                out.append(resolved)
    return out


def split_tasks(text: str) -> list[str]:
    """Split a comma list of task specs: a comma starts a new task unless the piece is `key=value`
    continuing the previous task's parameters (`nt_multiple:needles=2,placement=random,vt`)."""
    parts: list[str] = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        if parts and ":" in parts[-1] and "=" in piece and ":" not in piece:
            parts[-1] += "," + piece
        else:
            parts.append(piece)
    if not parts:
        raise TokensiftError("--tasks is empty")
    return parts


def _list_tasks() -> int:
    from tokensift.bench.suites import SUITES
    from tokensift.bench.tasks import LOOP_TASKS, TASKS

    # Generation-loop workloads (long outputs that reuse the input) are listed but in no suite.
    for name, factory in {**TASKS, **LOOP_TASKS}.items():
        task = factory()
        print(f"{name:24s} {task.description}")
        if task.source:
            print(f"{'':24s} source: {task.source}")
    print()
    for name, config in SUITES.items():
        print(f"suite {name}: {len(config.tasks)} tasks x {len(config.methods)} methods at {config.lengths}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from tokensift.bench.report import write_report

    path = write_report(args.dir)
    print(path.read_text())
    return 0
