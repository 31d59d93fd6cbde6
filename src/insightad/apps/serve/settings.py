"""The server's settings (CLI flags of insightad serve, config-file keys)."""

from __future__ import annotations

from insightad.config import param, params


@params
class ServeParams:
    """HTTP inference server: where it listens, what it accepts, how it batches and sheds load."""

    host: str = param("127.0.0.1", "address to listen on (0.0.0.0 opens the server to the network)")
    port: int = param(8080, "TCP port", minimum=0, maximum=65535)
    max_body_mb: float = param(20.0, "largest request body in MB; bigger requests get 413 before "
                               "they are read whole", minimum=0.0, exclusive_min=True)
    max_pixels: int = param(40_000_000, "largest decoded image in pixels (width x height); bigger "
                            "images (decompression bombs) get 400", minimum=1)
    max_pixels_in_flight: int = param(0, "decoded pixels held by all requests together (decoded, waiting for or "
                                      "in inference); a request that would pass it gets 503 (0: twice --max-pixels)",
                                      minimum=0)
    max_batch: int = param(8, "most images in one forward pass (micro-batch of concurrent requests)",
                           minimum=1)
    batch_wait_ms: float = param(2.0, "how long the inference worker waits for more requests to join "
                                 "a micro-batch", minimum=0.0, maximum=1000.0)
    queue_size: int = param(64, "requests admitted and waiting for inference; when full, new requests "
                            "get 503", minimum=1)
    max_requests_per_client: int = param(0, "scoring requests (POST /infer, /infer/batch) one client address may "
                                         "have open at once (being read, waiting or in inference); more get 429, so "
                                         "one client cannot take every queue slot (0: no limit)", minimum=0)
    trusted_proxies: str | None = param(None, "reverse proxies whose X-Forwarded-For names the client (for the "
                                        "access log and --max-requests-per-client): comma-separated addresses or "
                                        "networks, e.g. 127.0.0.1 or 10.0.0.0/8; unset: the connection's peer is the "
                                        "client and X-Forwarded-For is never read")
    max_images: int = param(32, "most images in one POST /infer/batch request", minimum=1)
    timeout_s: float = param(60.0, "a request waiting longer than this for inference gets 503",
                             minimum=0.0, exclusive_min=True)
    api_key: str | None = param(None, "require this key in X-API-Key or 'Authorization: Bearer'; unset: "
                                "the INSIGHTAD_API_KEY environment variable if set, else no key")
    engine: str = param("auto", "inference engine (auto: PyTorch on a CUDA GPU when --device gives one, else "
                        "ONNX Runtime on the CPU when installed, else PyTorch)", choices=("auto", "torch", "onnx"))
    device: str = param("auto", "auto (a CUDA GPU when present, else the CPU), cpu or cuda; the same default as "
                        "train and predict")
    threads: int = param(0, "PyTorch CPU threads for inference (0: PyTorch's default)", minimum=0)
    decode_threads: int = param(0, "threads that parse and decode request images (0: one per CPU core, "
                                "at most 4)", minimum=0)
    max_connections: int = param(256, "most open connections and tasks; beyond it new connections get 503",
                                 minimum=1)
    head_timeout_s: float = param(10.0, "a connection that has not sent a whole request head (request line and "
                                  "headers) within this many seconds of opening, or of its previous answer, is "
                                  "closed", minimum=0.0, exclusive_min=True)
    body_timeout_s: float = param(30.0, "a request body not received whole within this many seconds "
                                  "gets 408", minimum=0.0, exclusive_min=True)
    access_log: bool = param(True, "log one line per request")
    memory_arena: bool = param(False, "ONNX Runtime's memory arena: about 15% more requests/s under load (28.2 vs "
                               "24.5), but about 150 MB more resident (PaDiM on bottle, 8 clients: 594 vs 437 MB)")
