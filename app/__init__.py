"""offramp serving: ONNX Runtime engine, bundle registry and HTTP API. Imports no torch."""
