"""The diffeditor plugin: adds the ``diffeditor ui`` command through ``register_commands``."""

from __future__ import annotations

from diffeditor.hookspecs import hookimpl


def _cmd_ui(args) -> int:
    from .app import serve

    return serve(model=args.model, device=args.device, dtype=args.dtype, host=args.host,
                 port=args.port, out_dir=args.out_dir, sam=args.sam, examples=args.examples)


@hookimpl
def register_commands(subparsers):
    """Add ``diffeditor ui``."""
    from pathlib import Path

    p = subparsers.add_parser(
        "ui", help="serve a local web page with one tab per installed task (Gradio)",
        description="Serve a local, offline web page for every installed task: masks by brush or "
        "by clicking an object, handle/target points by clicking, live previews, cancel, and a "
        "'download spec' that reproduces the edit through 'diffeditor edit'.")
    p.add_argument("--model", default="shapes", metavar="NAME|ID|PATH",
                   help="registered model name, hub id or local folder (default: shapes)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 = any free port)")
    p.add_argument("--out-dir", type=Path, default=None, metavar="DIR",
                   help="where each edit's bundle (inputs, spec.json, result) is kept "
                   "(default: a temporary folder)")
    p.add_argument("--sam", default=None, metavar="DIR",
                   help="a local SAM folder (transformers SamModel + SamProcessor) for the 'sam' "
                   "segmenter (default: $DIFFEDITOR_SAM_MODEL)")
    p.add_argument("--examples", type=Path, default=None, metavar="DIR",
                   help="a folder of spec files offered as examples (default: ./specs if present)")
    p.set_defaults(func=_cmd_ui)
