"""`freeatten submit`: render the SLURM template for a run, check it against the run's config, queue it.

    freeatten submit fit --nodes 4 --gpus-per-node 8 --config configs/experiment/gpt2-small-fineweb.yaml \\
        --time 24:00:00 -- --model.attention lssar

Everything after `--` is passed to `freeatten fit` unchanged. The whole command is parsed here first, with
the real CLI, so a typo or a node / device mismatch is an error now rather than in the job's log an hour later.
"""

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

from jsonargparse import Namespace

from freeatten_lightning.cluster.layout import Layout, check_layout, freeatten_command, resolve_config
from freeatten_lightning.errors import FreeattenError

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "slurm"
TEMPLATES = {"fit": "train.sbatch", "validate": "eval.sbatch", "test": "eval.sbatch"}
_FIELD = re.compile(r"\{\{(\w+)\}\}")


def render(template: str, fields: dict[str, str]) -> str:
    """Replace every {{name}} of the template; a field the template needs but `fields` lacks is an error."""
    missing = sorted(set(_FIELD.findall(template)) - fields.keys())
    if missing:
        raise FreeattenError(f"the sbatch template needs fields this command does not fill: {', '.join(missing)}")
    return _FIELD.sub(lambda match: fields[match.group(1)], template)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="freeatten submit",
        description="Queue `freeatten fit` (or validate / test) as a multi-node SLURM job, one task per device. "
        "Arguments after `--` go to the freeatten command unchanged.",
    )
    parser.add_argument("subcommand", nargs="?", default="fit", choices=sorted(TEMPLATES))
    parser.add_argument("--nodes", type=int, required=True, help="nodes to run on")
    parser.add_argument(
        "--gpus-per-node",
        type=int,
        required=True,
        help="devices (tasks) per node; must match trainer.devices (with accelerator: cpu, processes per node)",
    )
    parser.add_argument("--config", action="append", default=[], help="run config(s), as for `freeatten fit`")
    parser.add_argument("--time", default="24:00:00", help="SLURM time limit (default: %(default)s)")
    parser.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (default: %(default)s)")
    parser.add_argument("--partition", help="SLURM partition")
    parser.add_argument("--account", help="SLURM account")
    parser.add_argument("--job-name", help="default: freeatten-<subcommand>")
    parser.add_argument(
        "--signal-seconds",
        type=int,
        default=300,
        help="seconds before the time limit at which the job checkpoints and requeues itself (default: %(default)s)",
    )
    parser.add_argument("--log-dir", default="logs/slurm", help="SLURM output folder (default: %(default)s)")
    parser.add_argument("--setup", default="", help="shell line run before srun, e.g. 'module load cuda'")
    parser.add_argument(
        "--sbatch-arg", action="append", default=[], help="extra #SBATCH option, e.g. --sbatch-arg=--qos=high"
    )
    parser.add_argument("--template", type=Path, help="sbatch template (default: recipes/slurm/<train|eval>.sbatch)")
    parser.add_argument("--dry-run", action="store_true", help="print the job script; queue nothing")
    return parser


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(submit's own arguments, the freeatten command's), split at the first `--`."""
    if "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1 :]
    return argv, []


def _job_name(options: argparse.Namespace) -> str:
    return options.job_name or f"freeatten-{options.subcommand}"


def job_script(options: argparse.Namespace, forwarded: list[str]) -> tuple[str, Layout, Namespace]:
    """The rendered sbatch script, the checked layout and the resolved config of the run."""
    run_args = [arg for path in options.config for arg in ("--config", path)] + forwarded
    config = resolve_config(options.subcommand, run_args)
    layout = check_layout(config.trainer, options.nodes, options.gpus_per_node)
    command = [*freeatten_command(), options.subcommand, *run_args, *layout.trainer_args()]
    sbatch_lines = [f"#SBATCH --gpus-per-node={layout.devices_per_node}"] if layout.uses_gpus else []
    sbatch_lines += [
        f"#SBATCH --{name}={value}" for name in ("partition", "account") if (value := getattr(options, name))
    ]
    sbatch_lines += [f"#SBATCH {arg}" for arg in options.sbatch_arg]
    given_ckpt = any(arg == "--ckpt_path" or arg.startswith("--ckpt_path=") for arg in forwarded)
    template_path = options.template or RECIPES / TEMPLATES[options.subcommand]
    if not template_path.is_file():
        raise FreeattenError(f"sbatch template {template_path} not found: pass --template <file>")
    fields = {
        "job_name": _job_name(options),
        "nodes": str(layout.nodes),
        "tasks_per_node": str(layout.devices_per_node),
        "cpus_per_task": str(options.cpus_per_task),
        "time": options.time,
        "log_dir": str(Path(options.log_dir).resolve()),
        "signal_seconds": str(options.signal_seconds),
        "sbatch_lines": "\n".join(sbatch_lines),
        "workdir": shlex.quote(str(Path.cwd())),
        "setup": options.setup,
        "command": shlex.join(command),
        "resume": "" if given_ckpt else "--ckpt_path last",
    }
    return render(template_path.read_text(), fields), layout, config


def _summary(layout: Layout, config: Namespace) -> str:
    """What the job will run, in numbers a person checks before spending GPU hours."""
    data, trainer = config.data, config.trainer
    tokens = layout.world_size * data.batch_size * trainer.accumulate_grad_batches * data.seq_len
    return (
        f"{layout.nodes} node(s) x {layout.devices_per_node} {'GPUs' if layout.uses_gpus else 'CPU processes'} = "
        f"{layout.world_size} ranks; {tokens:,} tokens per optimizer step "
        f"({data.batch_size} sequences x {data.seq_len} tokens x {trainer.accumulate_grad_batches} accumulation "
        f"x {layout.world_size} ranks); run folder {trainer.default_root_dir}"
    )


def submit_main(argv: list[str]) -> int:
    """Entry point of `freeatten submit`: 0 once the job is queued (or printed with --dry-run)."""
    from freeatten_lightning.cli import checkpoint_dir  # the CLI imports this module: import it on use

    own, forwarded = _split(argv)
    options = _parser().parse_args(own)
    script, layout, config = job_script(options, forwarded)
    if options.dry_run:
        print(script, end="")
        print(f"# {_summary(layout, config)}", file=sys.stderr)
        return 0
    log_dir = Path(options.log_dir).resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    job_name = _job_name(options)
    script_path = log_dir / f"{job_name}.sbatch"
    script_path.write_text(script)
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise FreeattenError("sbatch not found: run `freeatten submit` on a SLURM login node") from None
    if result.returncode != 0:
        reason = "; ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
        raise FreeattenError(f"sbatch refused the job: {reason} (fix the options; the script is {script_path})")
    job_id = result.stdout.strip().split(";")[0]
    print(f"Submitted job {job_id}: {_summary(layout, config)}")
    print(f"  job script:  {script_path}")
    print(f"  SLURM log:   {log_dir / f'{job_name}-{job_id}.out'}")
    print(f"  checkpoints: {checkpoint_dir(config.trainer.default_root_dir)}")
    print(f"  watch with:  squeue -j {job_id}; tail -f {log_dir / f'{job_name}-{job_id}.out'}")
    return 0
