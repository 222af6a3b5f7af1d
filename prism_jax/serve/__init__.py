"""`prism-jax serve`: one model on N emulated edge devices behind OpenAI's HTTP API.

The model is loaded, placed and warmed up once at start-up; a worker thread (`engine`) answers
the requests (`app`) from a bounded queue, batching those that arrive together; `metrics`
counts them for GET /metrics.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from pathlib import Path

from prism_jax.errors import PrismError


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (checked before the model loads: a port in use or an
    address that is not this machine's is one line)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise PrismError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _warm_up(engine) -> None:
    """Compile the smallest bucket's programs before the first request."""
    import asyncio

    from prism_jax.serve.engine import Job

    loop = asyncio.new_event_loop()
    ids = [0] if engine.causal else [int(i) for i in engine.model.tokenizer(["a"])["input_ids"][0]]
    kind = "text" if engine.causal else "embed"
    job = Job(kind, ids, loop, asyncio.Queue(), max_tokens=2, warm=True)
    engine.submit([job])
    while not job.finished:
        loop.run_until_complete(asyncio.sleep(0.05))
    loop.run_until_complete(asyncio.sleep(0))  # the job's last events
    while not job.events.empty():
        event = job.events.get_nowait()
        if event[0] == "error":
            engine.stop()
            raise PrismError(event[2])
    loop.close()


def _server(config):
    """A uvicorn server that SIGTERM and SIGINT end gracefully, after which the process exits 0
    (uvicorn's own raises the signal again after its shutdown, ending the process by it)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            caught = (signal.SIGTERM, signal.SIGINT)
            old = {s: signal.signal(s, self.handle_exit) for s in caught}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    return Server(config)


def _compilation_cache(directory: str) -> None:
    """Every compiled program kept in (and read from) `directory`, however quick to compile."""
    import jax

    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PrismError(f"cannot use {path} as the compilation cache: {e.strerror or e}") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_serve(args) -> int:
    """Load, place and warm up the model, then serve until SIGTERM or SIGINT; returns 0."""
    import jax
    import uvicorn

    import prism_jax as pj
    from prism_jax.cli import planning
    from prism_jax.cli.parser import plan_of
    from prism_jax.serve import app, engine

    plan_of(args)  # the plan's flags checked before anything loads
    if args.compilation_cache is not None:
        _compilation_cache(args.compilation_cache)
    front = jax.process_index() == 0  # across nodes, node 0 holds the HTTP front
    sock = listening_socket(args.host, args.port) if front else None
    try:
        model = pj.load_pretrained(args.model)
        planning.auto(args, model)  # --plan auto: the planner's devices and plan
        plan = plan_of(args, cfg=model.config)
        if model.tokenizer is None:
            raise PrismError(f"{args.model} has no tokenizer to read requests with")
        eng = engine.Engine(model, plan, args.devices, max_batch=args.max_batch,
                            max_queue=args.max_queue, window=args.batch_window)  # fmt: skip
        if not front:
            eng.follow()  # node 0's batches, until it stops
            return 0
        eng.start()
        _warm_up(eng)  # a plan the model refuses fails here, not at the first request
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    name = Path(args.model.rstrip("/")).name
    front_app = app.build(eng, name, max_tokens=args.max_tokens)
    config = uvicorn.Config(front_app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, lifespan="off")  # fmt: skip
    server = _server(config)
    host, port = sock.getsockname()[:2]
    app.log(f"serving {name} on http://{host}:{port} ({args.devices} devices, "
            f"{plan.strategy} CR={plan.cr})")  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        eng.stop()
    app.log("stopped")
    return 0
