"""`minigrok serve`: the OpenAI-compatible server over a checkpoint (the `serve` extra: FastAPI and uvicorn)."""

from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path

from .arguments import add_checkpoint_arguments, add_dtype_argument


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    add_checkpoint_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (rows of the KV cache)")
    parser.add_argument("--max-queue", type=int, default=256, help="sequences that may wait for a row; more: 429")
    parser.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger request bodies: 413")
    parser.add_argument("--model-name", default=None, help="the model id clients ask for (default: the run's name)")
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests have to finish before they are cancelled",
    )
    add_dtype_argument(parser)


def model_name(checkpoint: Path) -> str:
    """A checkpoint's model id: its run directory's name for a ckpt-<step> of a run, else its own name."""
    if re.fullmatch(r"ckpt-\d+.*", checkpoint.name):
        return checkpoint.parent.name
    return checkpoint.name


def listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, opened before the model loads, so an address in use fails at once."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as error:
        raise ValueError(
            f"--host {host} --port {port}: cannot listen there ({os.strerror(error.errno) if error.errno else error}): another server may be "
            "using that port; stop it or choose another --port"
        ) from None


def run_serve(args: argparse.Namespace) -> None:
    """Load the checkpoint and serve it until SIGTERM or Ctrl-C."""
    for flag in ("max_batch", "max_queue", "max_request_bytes"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={getattr(args, flag)} must be at least 1")
    try:
        import uvicorn

        from ..serve.app import build_app
        from ..serve.protocol import load_chat_template
    except ImportError as error:
        raise ValueError(f"minigrok serve needs the serve extra ({error}): pip install 'minigrok[serve]'") from None
    from ..serve.engine import Engine
    from ..train.checkpoint import resolve_checkpoint
    from .inference import inference_dtype, load_checkpoint

    checkpoint = resolve_checkpoint(args.checkpoint)
    listening = listen(args.host, args.port)
    model, tokenizer = load_checkpoint(args.checkpoint, verify=not args.no_verify)
    dtype = inference_dtype(args.dtype, model, rows=args.max_batch)  # a decode step runs max_batch rows
    engine = Engine(model, tokenizer, args.max_batch, args.max_queue, dtype)
    name = args.model_name or model_name(checkpoint.resolve())
    app = build_app(engine, name, load_chat_template(checkpoint), args.max_request_bytes)
    print(f"minigrok serve: {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch})", flush=True)
    config = uvicorn.Config(app, access_log=False, timeout_graceful_shutdown=args.shutdown_timeout, log_level="warning")
    uvicorn.Server(config).run(sockets=[listening])
