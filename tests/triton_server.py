"""A real Triton server for the tests: the exported U-Net (ONNX) run by ONNX Runtime inside a PyTriton binding.

Run by the PyTriton venv's python (tests/triton_support.py makes it; PyTriton pins numpy < 2, so it cannot live in
the project's venv), never imported by the project. PyTriton starts the tritonserver binary its wheel bundles;
requests reach it over gRPC on 127.0.0.1 exactly as they would a GPU pool's Triton. The model's configuration
carries the weights' identity as `edgenode engine build --triton-repo` writes it, so the node's check runs
against what a real deployment serves. Prints READY once the model is loaded; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

import numpy as np
import onnxruntime
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.models.model import Model
from pytriton.triton import Triton, TritonConfig


def add_parameters_to_config(parameters: dict[str, str]) -> None:
    """PyTriton's ModelConfig has no field for config parameters: add them where it builds Triton's config."""
    build = Model._get_triton_model_config

    def with_parameters(self: Model):  # type: ignore[no-untyped-def]
        config = build(self)
        config.backend_parameters.update(parameters)
        return config

    Model._get_triton_model_config = with_parameters  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=28)
    parser.add_argument("--parameter", action="append", default=[], help="KEY=VALUE in the model config")
    parser.add_argument("--tls-cert", default=None, help="serve gRPC over TLS with this certificate (PEM)")
    parser.add_argument("--tls-key", default=None)
    parser.add_argument("--tls-ca", default=None, help="with --tls-cert: require client certificates of this CA")
    args = parser.parse_args()

    add_parameters_to_config(dict(p.split("=", 1) for p in args.parameter))
    session = onnxruntime.InferenceSession(args.onnx, providers=["CPUExecutionProvider"])

    @batch
    def infer(x_t: np.ndarray, cond: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"x_t": x_t.astype(np.float32), "cond": cond.astype(np.float32), "t": t.reshape(-1).astype(np.float32)}
        (eps,) = session.run(["eps"], feeds)
        return {"eps": eps}

    tls = {}
    if args.tls_cert:
        tls = {"grpc_use_ssl": True, "grpc_server_cert": args.tls_cert, "grpc_server_key": args.tls_key}
        if args.tls_ca:
            tls.update(grpc_use_ssl_mutual=True, grpc_root_cert=args.tls_ca)
    config = TritonConfig(
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        http_address="127.0.0.1",
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        log_verbose=0,
        **tls,
    )
    image = (1, -1, -1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model_name,
            infer_func=infer,
            inputs=[
                Tensor(name="x_t", dtype=np.float32, shape=image),
                Tensor(name="cond", dtype=np.float32, shape=image),
                Tensor(name="t", dtype=np.float32, shape=(1,)),
            ],
            outputs=[Tensor(name="eps", dtype=np.float32, shape=image)],
            config=ModelConfig(
                max_batch_size=args.max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=1000)
            ),
            strict=True,
        )
        triton.run()
        print("READY", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
