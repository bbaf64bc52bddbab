"""The `offramp` command. Subcommands that need torch import it only when they run."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from bench.cli import register as register_bench
from training.cli import register as register_training


def _settings(args: argparse.Namespace):
    from app.settings import Settings

    flags = {"host": args.host, "port": args.port, "model_dir": args.model_dir,
             "default_model": args.default_model, "provider": args.provider,
             "intra_op_threads": args.threads}
    # Flags win over OFFRAMP_* variables, which win over the defaults.
    return Settings(**{k: v for k, v in flags.items() if v is not None})


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app import logs
    from app.http_protocol import bounded_protocol
    from app.server import create_app
    from app.threads import limit_malloc_arenas

    from app.auth import anonymous_exposure

    settings = _settings(args)
    refusal = anonymous_exposure(settings)
    if refusal:
        print(f"offramp serve: error: {refusal}", file=sys.stderr)
        sys.exit(2)
    limit_malloc_arenas()
    logs.configure(settings.log_level)
    if settings.shared_thread_pool:
        from app.backends import use_shared_thread_pool
        from app.threads import cpu_quota

        threads = settings.intra_op_threads or cpu_quota()
        use_shared_thread_pool(threads)
        logging.getLogger("offramp.serve").info("ONNX Runtime: one shared thread pool of %d threads", threads)
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # Readiness turns false at once; uvicorn then stops accepting connections, lets
            # in-flight requests finish, and the lifespan's shutdown answers what is queued.
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            log_level=settings.log_level, http=bounded_protocol(settings.header_timeout_s),
                            timeout_graceful_shutdown=int(settings.drain_timeout_s))
    Server(config).run()


def predict(args: argparse.Namespace) -> None:
    import numpy as np

    from app.registry import find_bundles, load_model

    settings = _settings(args)
    bundles = find_bundles(settings.model_dir)
    if args.model:
        bundles = [b for b in bundles if b.name == args.model]
    if not bundles:
        sys.exit(f"no model bundle {args.model or ''} in {settings.model_dir}")
    model = load_model(bundles[0], settings.provider, settings.intra_op_threads)
    if model.is_generation:
        sys.exit(f"{model.name} is a generation bundle: use offramp generate")
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    # A multi-task bundle's task: its input kind, labels and defaults (its rule, for regression).
    head, code, patience = None, 0, 0
    if model.manifest.tasks:
        from app.multitask import TaskBatch
        from app.policies import REGRESSION

        names = [t.name for t in model.manifest.tasks]
        if args.task not in names and not (args.task is None and len(names) == 1):
            sys.exit(f"--task: one of {names} is needed")
        index = names.index(args.task) if args.task else 0
        head = model.manifest.tasks[index]
        if head.kind == "regression":
            code, patience = REGRESSION, head.recommended_patience or 1
    elif args.task:
        sys.exit(f"--task: {model.name} is not a multi-task bundle")
    if (head.text_pair if head else model.manifest.text_pair):
        texts = [t.split("\t", 1) for t in texts]
    source = head or model.manifest
    threshold = source.recommended_threshold if args.threshold is None else args.threshold
    batch = model.encoder.encode(texts)
    if head:
        batch = TaskBatch.of(batch, index)
    result = model.engine.run(batch, np.float32(threshold), args.min_layers,
                              args.max_layers or model.manifest.num_layers, code, patience)
    labels = head.labels if head else model.labels
    for text, probs, layer, u in zip(texts, result.probabilities, result.exit_layer, result.uncertainty):
        if head and head.kind == "regression":
            print(json.dumps({"text": text, "score": round(float(probs[0]), 4), "exit_layer": int(layer),
                              "uncertainty": round(float(u), 4)}))
            continue
        probs = probs[:len(labels)]
        best = int(probs.argmax())
        row = {"text": text, "label": labels[best], "score": round(float(probs[best]), 4),
               "exit_layer": int(layer), "uncertainty": round(float(u), 4)}
        stage = model.manifest.stage_of(int(layer))
        if stage:
            row.update(stage=stage[0].name, stage_layer=stage[1])
        print(json.dumps(row))


def generate(args: argparse.Namespace) -> None:
    """A generation bundle run here, no server: one JSON line per text, with its generated text
    and the decoder layers its tokens left at."""
    import numpy as np

    from app.generation_service import decoding
    from app.manifest import MANIFEST_NAME
    from app.registry import find_bundles, load_model
    from app.request_policy import RequestError

    settings = _settings(args)
    if args.model and (Path(args.model) / MANIFEST_NAME).is_file():
        bundles = [Path(args.model)]  # a bundle folder
    else:
        bundles = [b for b in find_bundles(settings.model_dir) if args.model in (None, b.name)]
    if not bundles:
        sys.exit(f"no model bundle {args.model or ''} in {settings.model_dir}")
    model = load_model(bundles[0], settings.provider, settings.intra_op_threads)
    if not model.is_generation:
        sys.exit(f"{model.name} is not a generation bundle: use offramp predict")
    texts = args.texts or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        new_tokens, beams, threshold, ngram = decoding(model, settings, args.max_new_tokens, args.num_beams,
                                                       args.threshold, args.no_repeat_ngram_size)
    except RequestError as exc:
        sys.exit(f"--{exc.field.replace('_', '-')}: {str(exc).removeprefix(exc.field + ': ')}")
    rows = len(texts)
    outputs = model.engine.generate(
        model.encoder.encode(texts), max_new_tokens=np.full(rows, new_tokens, dtype=np.int64),
        num_beams=np.full(rows, beams, dtype=np.int64), threshold=np.full(rows, threshold, dtype=np.float32),
        no_repeat_ngram_size=np.full(rows, ngram, dtype=np.int64))
    for text, output in zip(texts, outputs):
        print(json.dumps({"input": text, "text": output.text, "mean_exit_layer": round(output.mean_exit_layer, 3),
                          "exit_layers": list(output.exit_layers), "layers": model.manifest.num_layers}))


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=Path, help="bundle folder, or a folder of bundles (OFFRAMP_MODEL_DIR)")
    p.add_argument("--default-model", help="bundle served by default (OFFRAMP_DEFAULT_MODEL)")
    p.add_argument("--provider", choices=["cpu", "cuda", "openvino"],
                   help="ONNX Runtime cpu or cuda, or OpenVINO (OFFRAMP_PROVIDER)")
    p.add_argument("--threads", type=int, help="intra-op threads (OFFRAMP_INTRA_OP_THREADS; default: CPU quota)")
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="offramp", description="early-exit text classification")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="serve the model bundles over HTTP")
    _server_flags(p)
    p.set_defaults(func=serve)
    for action in p._actions:  # host and port are documented for serve
        if action.dest == "host":
            action.help = "address to bind (OFFRAMP_HOST, default 127.0.0.1)"
        elif action.dest == "port":
            action.help = "port (OFFRAMP_PORT, default 8000)"

    p = sub.add_parser("predict", help="classify texts (arguments or stdin lines) without a server")
    _server_flags(p)
    p.add_argument("--model", help="bundle name inside --model-dir")
    p.add_argument("--threshold", type=float, help="default: the bundle's recommended threshold")
    p.add_argument("--task", help="multi-task bundles: the task the texts are for")
    p.add_argument("--min-layers", type=int, default=1)
    p.add_argument("--max-layers", type=int)
    p.add_argument("texts", nargs="*", help="texts (tab-separated pairs for pair models)")
    p.set_defaults(func=predict)

    p = sub.add_parser("generate", help="generate text with a generation bundle (arguments or stdin lines), "
                                        "without a server")
    _server_flags(p)
    p.add_argument("--model", help="a bundle folder, or a bundle name inside --model-dir")
    p.add_argument("--threshold", type=float, help="per-token exit threshold; default: the bundle's recommended")
    p.add_argument("--num-beams", type=int, help="beam width (1: greedy); default: the bundle's")
    p.add_argument("--max-new-tokens", type=int, help="default: the bundle's")
    p.add_argument("--no-repeat-ngram-size", type=int, help="default: the bundle's")
    p.add_argument("texts", nargs="*", help="source texts")
    p.set_defaults(func=generate)

    argv = sys.argv[1:] if argv is None else list(argv)
    # `offramp train` imports torch to build its options: only when it is the command.
    register_training(sub, train_methods=bool(argv) and argv[0] == "train")
    register_bench(sub)

    args = parser.parse_args(argv)
    args.argv = argv  # recorded in a bundle's provenance
    if args.command != "serve":
        from training.progress import is_first_process

        # One voice in a distributed run: the other processes only warn.
        logging.basicConfig(level=logging.INFO if is_first_process() else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
