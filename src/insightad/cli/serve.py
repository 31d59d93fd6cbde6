"""insightad serve: the HTTP inference server (POST /infer) for a model file, on uvicorn."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from insightad.apps.serve.settings import ServeParams
from insightad.cli.common import add_model_flag, at_most_cores, new_parser, parse_threshold, with_config
from insightad.cli.options import add_dataclass_args, gather, path_arg
from insightad.errors import InsightADError

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def add_parser(sub: argparse._SubParsersAction, argv: list[str]) -> None:
    p = new_parser(sub, "serve", "serve a model over HTTP (POST /infer, /infer/batch, /health, /model, /metrics)",
                   description="Start the HTTP inference server for a model file. It listens on 127.0.0.1 unless "
                               "--host says otherwise (--host 0.0.0.0 opens it to the network). The API key "
                               "defaults to the INSIGHTAD_API_KEY environment variable, which keeps it out of "
                               "the process list. The web page for operators is at /, OpenAPI docs at /docs and "
                               "/redoc (all offline).")
    add_model_flag(p)
    p.add_argument("--threshold", metavar="VALUE|FILE.json", type=path_arg, help="override the model's decision threshold")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="server log level (default: info)")
    p.add_argument("--ssl-certfile", metavar="CERT.pem", type=path_arg, help="serve HTTPS with this certificate "
                   "(browsers allow the page's camera tab only on localhost or over HTTPS); needs --ssl-keyfile")
    p.add_argument("--ssl-keyfile", metavar="KEY.pem", type=path_arg,
                   help="the certificate's private key, unencrypted (with --ssl-certfile)")
    add_dataclass_args(p, ServeParams, title="server")
    p.set_defaults(_run=run, _prepare=lambda a: with_config(a, p, "serve"), _argv=argv)


def listen_address(host: str) -> str:
    """``--host`` as the resolver takes it: an IPv6 address may come in brackets (``[::1]``, as in a URL); a URL or
    an address with a port was looked up as a host name and refused as 'Name or service not known'."""
    if host.startswith("[") and host.endswith("]"):
        return host[1:-1]
    if "/" in host:
        raise InsightADError(f"--host: {host!r} is a URL; expected an address or host name (127.0.0.1, 0.0.0.0, ::, "
                             "myhost), with the port in --port")
    if host.count(":") == 1:
        raise InsightADError(f"--host: {host!r} has a port; expected the address alone, with the port in --port")
    return host


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, so that a busy port or a bad address is a one-line error, not a traceback."""
    host = listen_address(host)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise InsightADError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise InsightADError(f"--host/--port: cannot listen on {host}:{port} ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock


def check_tls(certfile: str | None, keyfile: str | None) -> bool:
    """Whether to serve HTTPS; a lone flag or a missing file is a one-line error before the model loads."""
    if not certfile and not keyfile:
        return False
    if not (certfile and keyfile):
        raise InsightADError("--ssl-certfile and --ssl-keyfile: give both (the certificate and its private key)")
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not os.path.isfile(path):
            raise InsightADError(f"{flag}: {path}: no such file")
    import ssl

    asked: list[bool] = []

    def no_passphrase() -> bytes:  # called for an encrypted key only: never a prompt on the terminal
        asked.append(True)
        return b""

    try:  # as the server will, before it says it serves: a bad pair fails here in one line, not in a traceback
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile, password=no_passphrase)
    except (ssl.SSLError, OSError, ValueError) as e:
        if asked:
            raise InsightADError(f"--ssl-keyfile {keyfile}: the private key is encrypted with a passphrase, which "
                                 "the server cannot ask for; expected an unencrypted key (openssl pkey -in "
                                 f"{keyfile} -out KEY.pem)") from None
        raise InsightADError(f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: not a PEM certificate and its "
                             f"private key ({getattr(e, 'reason', None) or e})") from None
    return True


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from insightad.apps.serve import create_app
    from insightad.apps.serve.security import API_KEY_ENV, check_api_key
    from insightad.apps.serve.server import trusted_proxies, uvicorn_config
    from insightad.runtime import pin_mmap_threshold

    settings = gather(args, ServeParams)
    settings.threads = at_most_cores(settings.threads, "--threads")  # 0 (the default) stays 0
    settings.decode_threads = at_most_cores(settings.decode_threads, "--decode-threads")
    if settings.api_key is not None and not settings.api_key.strip():
        raise InsightADError("--api-key: empty; give a key or leave the flag out")
    tls = check_tls(args.ssl_certfile, args.ssl_keyfile)
    settings.trusted_proxies = trusted_proxies(settings.trusted_proxies)
    if settings.api_key is not None:
        check_api_key(settings.api_key, "--api-key")
    elif API_KEY_ENV in os.environ:
        settings.api_key = os.environ[API_KEY_ENV]
        if not settings.api_key.strip():  # an empty key must not quietly turn authentication off
            raise InsightADError(f"{API_KEY_ENV}: set but empty; give a key or unset the variable")
        check_api_key(settings.api_key, API_KEY_ENV)
    pin_mmap_threshold()  # a dedicated server process: keep RSS flat under long loads (see runtime.pin_mmap_threshold)
    app = create_app(args.model, settings, threshold=parse_threshold(args.threshold, args.model))
    sock = bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    det = app.state.detector
    print(f"insightad: serving {args.model} ({det.method}, threshold {app.state.threshold:.6g}) "
          f"on {'https' if tls else 'http'}://{shown}:{port} (page: /, docs: /docs; "
          f"API key {'required' if settings.api_key else 'off'})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn_config(app, settings, args.log_level, args.ssl_certfile, args.ssl_keyfile))
    server.run(sockets=[sock])
    return 0
