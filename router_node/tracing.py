"""OpenTelemetry tracing of the router's requests, off unless the standard ``OTEL_*``
variables configure an exporter.

One span per inference request (kind SERVER, continuing the client's W3C ``traceparent``),
with children ``parse``, ``tokenize``, ``lookup``, ``score``, one ``attempt`` per worker tried
(kind CLIENT; the worker gets a ``traceparent`` naming it, so vLLM's own spans continue the
trace) and, under each attempt, ``record_lease`` (the dispatch round trip to Redis). A split
prefill/decode request has first one ``prefill`` span per prefill worker tried (kind CLIENT,
``kvrouter.pd.leg`` = ``prefill``, with its own ``record_lease`` child and ``traceparent``),
then its decode leg's ``attempt`` spans (``kvrouter.pd.leg`` = ``decode``). The request span
carries the model, the chosen and the serving worker, the matched tokens and the decision's
reason.

The instrumentation calls only the OpenTelemetry API, whose default tracer does nothing: with
tracing off a request pays a few no-op calls and the client's ``traceparent`` is passed on
untouched, as before. `setup_tracing` installs the SDK with the OTLP exporter (the ``otel``
extra) when ``otel_configured`` says the environment asks for it; the exporter reads its
endpoint, headers and protocol from the same ``OTEL_*`` variables.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

TRACER_NAME = "kvrouter.router"

# Span attribute names: the GenAI semantic conventions' where one fits, ours otherwise.
ATTR_MODEL = "gen_ai.request.model"
ATTR_WORKER = "kvrouter.worker"
ATTR_CHOSEN = "kvrouter.decision.worker"
ATTR_REASON = "kvrouter.decision.reason"
ATTR_POLICY = "kvrouter.decision.policy"
ATTR_MATCHED = "kvrouter.matched_tokens"
ATTR_PROMPT = "gen_ai.usage.input_tokens"
ATTR_ATTEMPT = "kvrouter.attempt"
ATTR_STATUS = "http.response.status_code"
ATTR_LEG = "kvrouter.pd.leg"


def get_tracer(provider: Any | None = None) -> trace.Tracer:
    """The router's tracer from `provider` (tests pass their own), else from the global
    provider (a no-op one unless `setup_tracing` installed the SDK)."""
    if provider is not None:
        return provider.get_tracer(TRACER_NAME)  # type: ignore[no-any-return]
    return trace.get_tracer(TRACER_NAME)


def recording(tracer: trace.Tracer) -> bool:
    """Whether spans from `tracer` are recorded (so propagation headers name our spans)."""
    # Never ended, so never exported: a span reaches the processors when it ends.
    return tracer.start_span("probe").is_recording()


def extract(headers: Mapping[str, str]) -> Any:
    """The client's trace context from its request headers (W3C ``traceparent``)."""
    return propagate.extract(headers)


def inject(headers: dict[str, str]) -> None:
    """Write the current span's context into outgoing request headers."""
    propagate.inject(headers)


def setup_tracing(configured: bool, service_name: str = "kvrouter-router") -> bool:
    """Install the SDK's tracer provider with a batching OTLP exporter when `configured`
    (``otel_configured`` in settings.py). Returns whether tracing is on. Without the ``otel``
    extra installed it says so in the log and stays off."""
    if not configured:
        return False
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "OTEL_* variables are set but the OpenTelemetry SDK is not installed "
            "(pip install 'kvrouter[otel]'): tracing stays off"
        )
        return False
    # Resource.create merges OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES over this default.
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing on: spans go to the OTLP endpoint of the OTEL_* variables")
    return True
