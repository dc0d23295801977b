"""``tandem serve-target``: load a target and serve it (flags, limits, the ready line launchers wait for)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time

import torch

from tandem.speculative.remote import protocol
from tandem.speculative.remote.server import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_QUEUED_REQUESTS,
    DEFAULT_NCCL_TIMEOUT_S,
    TargetModelServer,
)
from tandem.speculative.remote.serving.http import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    serve,
)
from tandem.speculative.remote.serving.sessions import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_IDLE_TIMEOUT_S
from tandem.speculative.remote.transport import default_port_range, nccl_enabled, nccl_port_for, parse_port_range

logger = logging.getLogger(__name__)

READY_LINE = "tandem serve-target: listening on http://{host}:{port}"


def add_serve_target_parser(subparsers) -> None:
    """Register ``tandem serve-target`` on the CLI's subparsers."""
    from tandem.models import DTYPE_CHOICES

    p = subparsers.add_parser("serve-target",
                              help="serve a frozen target for remote training (tandem train --target-url)")
    p.add_argument("--model", default="default",
                   help="target: default, an HF directory or a .gguf file (default: default)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address; 0.0.0.0 serves every interface, so set --token (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="TCP port; 0 picks a free one and prints it (default: 8001)")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' (default: ${protocol.TOKEN_ENV} if set)")
    p.add_argument("--aux-layer-ids", type=int, nargs=3, default=None,
                   help="the three captured layers (default: [1, L//2-1, L-4])")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                   help="target dtype; auto = bfloat16 on GPUs and on CPUs with native bf16 matmul, else float32 "
                        "(default: auto)")
    p.add_argument("--device", default=None, help="where the target runs (default: cuda if available, else cpu)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="serve the target across this many local processes with transformers' tensor parallelism "
                        "(tp_plan=auto; one GPU each, or gloo ranks on CPU); rank 0 serves HTTP: supervision and "
                        "/verify (default: 1)")
    p.add_argument("--device-map", default=None,
                   help="place the target's layers over this process's devices with accelerate (auto, balanced, "
                        "sequential), for a target larger than one GPU (default: one device, --device)")
    limits = p.add_argument_group("limits (README, Security)")
    limits.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20,
                        help="request body limit in MiB; each endpoint has a smaller own bound too (default: 64)")
    limits.add_argument("--max-batch-tokens", type=int, default=None,
                        help="largest B x S of one /generate; larger ones get 413 before the forward (default: what "
                             "half the memory free on the target's device holds, logged at start)")
    limits.add_argument("--max-decode-tokens", type=int, default=None,
                        help="positions the /verify KV caches (speculative decoding through this server) hold in "
                             "all; the least recently used cache makes room (default: --max-batch-tokens)")
    limits.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED_REQUESTS,
                        help="/generate and /verify requests admitted at once, served round-robin across clients; one "
                             f"more gets 503 with Retry-After (default: {DEFAULT_MAX_QUEUED_REQUESTS})")
    limits.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="connections (and handler threads) served at once; one more gets 503 and is closed "
                             f"(default: {DEFAULT_MAX_CONNECTIONS})")
    limits.add_argument("--max-sessions", type=int, default=DEFAULT_MAX_SESSIONS,
                        help=f"client sessions held at once (default: {DEFAULT_MAX_SESSIONS})")
    limits.add_argument("--session-idle-timeout", type=float, default=DEFAULT_SESSION_IDLE_TIMEOUT_S,
                        help="evict a session without connections after this many idle seconds "
                             f"(default: {DEFAULT_SESSION_IDLE_TIMEOUT_S:g})")
    limits.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S,
                        help="close a connection silent this many seconds between requests "
                             f"(default: {DEFAULT_IDLE_TIMEOUT_S:g})")
    limits.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="answer 408 and close when a request's line and headers are not complete this many "
                             f"seconds after its first byte (default: {DEFAULT_HEADER_TIMEOUT_S:g})")
    limits.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="answer 408 and close when a request body is not complete this many seconds after its "
                             f"headers (default: {DEFAULT_BODY_TIMEOUT_S:g})")
    p.add_argument("--exit-when-idle", action="store_true", help="exit when the last client disconnects")
    p.add_argument("--nccl", action=argparse.BooleanOptionalAction, default=None,
                   help="offer the process-group data plane to clients (default: on unless TANDEM_ENABLE_NCCL=0)")
    p.add_argument("--nccl-timeout", type=float, default=DEFAULT_NCCL_TIMEOUT_S,
                   help="seconds one data-plane transfer may take before the group is torn down and that client goes "
                        "on over HTTP; /init_nccl answers a little sooner (default: 120)")
    p.add_argument("--nccl-port-range", default=None, metavar="LOW-HIGH",
                   help="ports a client may propose for its data-plane rendezvous, within 1024-65535 (default: the "
                        "port rule's: TANDEM_NCCL_PORT, else --port + 100, and the 2999 ports above it)")
    p.add_argument("--enable-fault-injection", action="store_true",
                   help="TESTING ONLY (bench/soak.py): on SIGUSR1, tear down the process-group data plane in the "
                        "middle of the next data-plane send, so the client must fall back to HTTP and ask for that "
                        "batch again. Never use it in production (default: off)")
    p.set_defaults(func=cmd_serve_target)


def _relaunch_on_ranks(args) -> int:
    """Start ``args.nproc_per_node`` copies of this command under torchrun's launcher; its exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from tandem.speculative.remote.serving.tensor_parallel import relaunch_argv

    try:
        torchrun(relaunch_argv(args.nproc_per_node, args.argv))
    except ChildFailedError as exc:
        raise ValueError(f"serve-target across {args.nproc_per_node} processes: a rank failed ({exc})") from None
    return 0


def _load_placed_target(args, device: str):
    """``(model, tokenizer, tensor-parallel device or None)``: on one device, placed by ``--device-map``, or sharded
    over the launcher's ranks (``tensor_parallel.py``)."""
    from tandem.models import load_target
    from tandem.speculative.remote.serving import tensor_parallel

    if tensor_parallel.launched_world_size() > 1:
        if args.device_map:
            raise ValueError("--device-map and --nproc-per-node are two ways of splitting a target: choose one")
        rank_device = tensor_parallel.init_group(device)
        model, tokenizer = load_target(args.model, dtype=args.dtype, device=device, tp_plan="auto")
        return model, tokenizer, rank_device
    model, tokenizer = load_target(args.model, dtype=args.dtype, device=device, device_map=args.device_map)
    return model, tokenizer, None


def cmd_serve_target(args) -> int:
    from tandem.speculative.remote.serving import tensor_parallel
    from tandem.speculative.target.model import Eagle3TargetModel

    if args.nproc_per_node < 1:
        raise ValueError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    if args.nproc_per_node > 1 and tensor_parallel.launched_world_size() == 1:
        return _relaunch_on_ranks(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    token = args.token or os.environ.get(protocol.TOKEN_ENV) or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and token is None:
        logger.warning("serving on %s without a token: anyone who reaches this port can use the target", args.host)
    nccl_port = nccl_port_for(args.port)
    port_range = parse_port_range(args.nccl_port_range) if args.nccl_port_range else default_port_range(nccl_port)
    from tandem.speculative.target.identity import describe, target_identity

    model, tokenizer, rank_device = _load_placed_target(args, device)
    wrapper = Eagle3TargetModel if rank_device is None else tensor_parallel.TensorParallelEagle3Target
    target = wrapper(model, args.aux_layer_ids)
    started = time.perf_counter()
    identity = target_identity(model, target.aux_layer_ids, name=args.model, tokenizer=tokenizer)  # every rank
    if rank_device is not None and torch.distributed.get_rank() > 0:
        forwards = tensor_parallel.follow(target, rank_device)
        logger.info("rank %d: ran %d forwards; rank 0 stopped", torch.distributed.get_rank(), forwards)
        return 0
    logger.info("serving %s (identity computed in %.1f s)", describe(identity), time.perf_counter() - started)
    served = target
    if rank_device is not None:
        served = tensor_parallel.TensorParallelTarget(target, tensor_parallel.Announcer(model, rank_device))
    logic = TargetModelServer(
        served,
        identity=identity,
        nccl_port=nccl_port,
        host=args.host,
        token=token,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_batch_tokens=args.max_batch_tokens,
        max_decode_tokens=args.max_decode_tokens,
        max_queued_requests=args.max_queued_requests,
        max_sessions=args.max_sessions,
        session_idle_timeout_s=args.session_idle_timeout,
        exit_when_idle=args.exit_when_idle,
        enable_nccl=nccl_enabled() if args.nccl is None else args.nccl,
        nccl_timeout_s=args.nccl_timeout,
        nccl_port_range=port_range,
        fault_injection=args.enable_fault_injection,
    )
    logger.info("limits: %d tokens a /generate (B x S)%s, %d cached /verify positions, %d queued requests, "
                "%d connections, %d sessions; data-plane ports %d-%d", logic.max_batch_tokens,
                f", sequences up to {logic.max_seq_len}" if logic.max_seq_len else "", logic.decode_caches.max_tokens,
                args.max_queued_requests,
                args.max_connections, args.max_sessions, *port_range)
    if args.enable_fault_injection:  # from outside, at a moment of the tester's choosing (the soak's schedule)
        signal.signal(signal.SIGUSR1, lambda signum, frame: logic.arm_teardown_fault())
        logger.warning("fault injection enabled: SIGUSR1 tears down the next data-plane send mid-transfer")

    def on_ready(host: str, port: int) -> None:
        if args.port == 0 and not args.nccl_port_range:  # the port rule's base follows the port just picked
            logic.nccl_port = nccl_port_for(port)
            logic.data_plane.port_range = default_port_range(logic.nccl_port)
        # The ready line goes to stdout: launchers (tandem demo, the tests) wait for it to learn the port.
        print(READY_LINE.format(host=host, port=port), flush=True)

    try:
        serve(logic, args.host, args.port, on_ready=on_ready, idle_timeout_s=args.idle_timeout,
              body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
              max_connections=args.max_connections)
    except OSError as exc:
        raise ValueError(f"cannot serve on {args.host}:{args.port}: {exc}") from exc
    finally:
        if rank_device is not None:
            tensor_parallel.stop_followers(rank_device)
    return 0
