"""`pace-llm`: one command for training, evaluation, sweeps, data inspection, serving and the demos.

    pace-llm train recipes/tiny.yaml train.max_steps=4        # = python launch/train.py ...
    pace-llm eval gsm8k --model out/merged --limit 50          # = python eval/gsm8k.py ...
    pace-llm --help | pace-llm <command> --help

Each command is one module here (argument parsing; the work is in the library modules it
calls) with `main(argv=None, prog=None)`, and the scripts under launch/ and eval/ are thin
wrappers over the same `main`, so both spellings take the same arguments. A command module is
imported only when its command runs: `pace-llm --help` loads none of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import sys
from typing import Optional

from pace_llm.logs import hold_logs

# A command's log records wait for its run's log file (route_logs), the ones its imports make
# included (peft, bitsandbytes, DeepSpeed): the terminal shows our lines and errors only.
hold_logs()


@dataclasses.dataclass(frozen=True)
class Command:
    module: Optional[str]  # a pace_llm.cli module with main(argv, prog); None for a group
    summary: str  # its line in the command list
    script: str  # the script that runs the same main
    group: Optional[dict[str, Command]] = None  # a group's subcommands (pace-llm eval gsm8k)


EVAL_COMMANDS = {
    "gsm8k": Command(
        "pace_llm.cli.eval_gsm8k", "GSM-8K accuracy of a causal LM (hf, vLLM or a server)", "eval/gsm8k.py"
    ),
    "glue": Command(
        "pace_llm.cli.eval_glue", "GLUE metrics of a sequence classifier; tables over results", "eval/glue.py"
    ),
    "vision": Command("pace_llm.cli.eval_vision", "top-1 accuracy of an image classifier", "eval/vision.py"),
}
COMMANDS = {
    "train": Command("pace_llm.cli.train", "train PACE-LoRA from a recipe, in this process", "launch/train.py"),
    "eval": Command(None, "evaluate a model: gsm8k | glue | vision", "eval/*.py", EVAL_COMMANDS),
    "sweep": Command(
        "pace_llm.cli.sweep", "grid-sweep a recipe: one training run per point and seed", "launch/sweep.py"
    ),
    "inspect": Command(
        "pace_llm.cli.inspect_data", "show what a recipe trains on, supervised tokens marked", "launch/inspect_data.py"
    ),
    "serve": Command(
        "pace_llm.cli.serve", "serve a merged model with vLLM's OpenAI-compatible server", "launch/serve.sh"
    ),
    "demo": Command(
        "pace_llm.cli.demo", "the offline demos: gsm8k (make demo) | polarity | fashion", "launch/demo*.py"
    ),
}
PROG = "pace-llm"
DESCRIPTION = "PACE-LoRA fine-tuning on DeepSpeed: every entry point behind one command."


def usage(prog: str, commands: dict[str, Command], description: str) -> str:
    """A git-style overview: usage, then one line per command with the script it stands for."""
    width = max(map(len, commands)) + 2
    summary = max(len(c.summary) for c in commands.values()) + 2
    lines = [f"usage: {prog} <command> [args...]", f"       {prog} <command> --help", "", description, "", "commands:"]
    lines += [f"  {name:<{width}}{c.summary:<{summary}}({c.script})" for name, c in commands.items()]
    lines += ["", f"'{prog} <command> --help' shows a command's flags; the script in parentheses takes the same."]
    return "\n".join(lines)


def dispatch(prog: str, commands: dict[str, Command], description: str, argv: list[str]) -> int:
    """Run `argv[0]`'s main on the rest of argv. No command: the overview on stderr, exit 2 (a
    usage error, as argparse's); -h / --help: the overview on stdout, exit 0; an unknown
    command: its name, the choices and the closest match on stderr, exit 2."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, commands, description), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in commands:
        close = difflib.get_close_matches(name, commands, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(
            f"{prog}: error: unknown command {name!r} (choose from {', '.join(commands)}){hint}\nsee '{prog} --help'",
            file=sys.stderr,
        )
        return 2
    command = commands[name]
    if command.group is not None:
        return dispatch(
            f"{prog} {name}",
            command.group,
            f"{command.summary[0].upper()}{command.summary[1:]} (the same flags as {command.script}).",
            rest,
        )
    code = importlib.import_module(command.module).main(rest, prog=f"{prog} {name}")
    # The eval commands return their result dict to Python callers (tests, notebooks); it ran.
    return code if isinstance(code, int) else 0


def main(argv: Optional[list[str]] = None) -> int:
    """The `pace-llm` console script. argv None: this process's command line; a finished
    `train` then ends the process without the interpreter's teardown (exit_now: seconds with
    torch, DeepSpeed and peft loaded), as launch/train.py does."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--version":
        from importlib.metadata import version

        print(f"{PROG} {version('pace-llm')}")
        return 0
    code = dispatch(PROG, COMMANDS, DESCRIPTION, args)
    if argv is None and args and args[0] == "train":
        from pace_llm.distributed.launcher import exit_now

        exit_now(code)
    return code
