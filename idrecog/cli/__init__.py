"""The ``idrecog`` command. Sub-commands are looked up in a table and imported lazily, so ``idrecog synth``
does not pay for importing Lightning. Training commands (fit, validate, test, predict, pretrain) are
LightningCLIs; the others use jsonargparse.

Every :class:`idrecog.errors.IdrecogError` ends the command with a one-line message and exit code 2
(``--debug`` shows the traceback).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence

# command -> ("module:function", one-line help). Each function takes argv (after the command) and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "fit": ("idrecog.cli.train:run_unified", "train the unified model (LightningCLI)"),
    "validate": ("idrecog.cli.train:run_unified", "validate the unified model (LightningCLI)"),
    "test": ("idrecog.cli.train:run_unified", "test the unified model (LightningCLI)"),
    "predict": ("idrecog.cli.train:run_unified", "batch prediction to JSONL (LightningCLI)"),
    "pretrain": (
        "idrecog.cli.pretrain:run_pretrain",
        "MAE self-supervised pretraining of the encoder (LightningCLI)",
    ),
    "export-encoder": (
        "idrecog.cli.pretrain:export_encoder_main",
        "write encoder weights in timm format (safetensors)",
    ),
    "synth": ("idrecog.cli.synth:main", "generate the synthetic identity-document benchmark"),
    "data": ("idrecog.cli.data:main", "dataset tools: `data check DIR`, `data show DIR --out grid.png`"),
    "recognize": (
        "idrecog.cli.recognition:recognize_main",
        "recognise document images: one JSON object per image",
    ),
    "export": ("idrecog.cli.recognition:export_main", "export the multi-task model (ONNX or TorchScript)"),
    "compare": (
        "idrecog.cli.compare:main",
        "compare runs (CSV logs or offline W&B folders): Markdown table + bar chart",
    ),
    "serve": (
        "idrecog.cli.recognition:serve_main",
        "HTTP service: POST /recognize, GET /ready, /health, /metrics (API keys)",
    ),
    "serve-key": ("idrecog.cli.recognition:serve_key_main", "make or revoke an API key of `idrecog serve`"),
}


def _usage() -> str:
    lines = ["usage: idrecog COMMAND [options]   (idrecog COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<15} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _resolve(target: str) -> Callable[[list[str]], int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Sequence[str] | None = None) -> int:
    from idrecog.errors import IdrecogError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from idrecog import __version__

        print(f"idrecog {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"idrecog: error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    # no WANDB_MODE default: W&B loggers go online when credentials exist (idrecog.loggers.wandb_mode)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        fn = _resolve(COMMANDS[command][0])
        # training commands take the sub-command too (LightningCLI parses it)
        code = fn([command, *rest]) if COMMANDS[command][0].startswith("idrecog.cli.train:") else fn(rest)
    except IdrecogError as e:
        if debug:
            raise
        print(f"idrecog {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"idrecog {command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        # Lightning ends a run on SIGTERM with SIGTERMException (a SystemExit with no code, i.e. status 0):
        # report the preemption with the conventional 128 + 15 so schedulers see the run did not finish
        if type(e).__name__ != "SIGTERMException":
            raise
        print(
            f"idrecog {command}: stopped by SIGTERM (checkpoint saved; resume with --ckpt_path last)",
            file=sys.stderr,
        )
        return 143
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
