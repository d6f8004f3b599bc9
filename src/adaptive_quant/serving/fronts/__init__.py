"""The gateway's fronts: each parses its transport's request and encodes its answer; the
dataplane (serving/dataplane.py) does the rest.

  v1_rest   POST /v1/classify (JSON images), /v1/status, /v1/models, the probes, /metrics
  v2_rest   the Open Inference Protocol (KServe v2) over HTTP
  v2_grpc   the Open Inference Protocol over gRPC (inference.GRPCInferenceService)
  asgi      what the HTTP fronts share: GatewayApp, the fast routes, the body reader, errors
"""
