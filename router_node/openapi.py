"""The router's OpenAPI 3.1 description, served at ``GET /openapi.json``.

It describes what the router itself checks (the fields routing needs) and the errors it
returns; other fields of a completions or chat body pass through to the worker unchanged,
so the request schemas allow additional properties. The hostile-input tests fuzz every
operation listed here, and a test checks that every route of the app is listed.
"""

from __future__ import annotations

from typing import Any

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}

# The router hashes token ids as uint32: [0, 2**32) is its own rule (400 otherwise).
_TOKEN_IDS = {
    "type": "array",
    "minItems": 1,
    "items": {"type": "integer", "minimum": 0, "maximum": 2**32 - 1},
}

_COMMON_PROPS: dict[str, Any] = {
    "model": {"type": "string", "minLength": 1},
    "stream": {"type": "boolean"},
    "max_tokens": {"type": "integer", "minimum": 1},
    "cache_salt": {"type": "string"},
    "user": {"type": "string"},
}

COMPLETION_REQUEST = {
    "type": "object",
    "required": ["model", "prompt"],
    "additionalProperties": True,
    "properties": {
        **_COMMON_PROPS,
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                _TOKEN_IDS,
                {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
            ]
        },
        "add_special_tokens": {"type": "boolean"},
    },
}

CHAT_REQUEST = {
    "type": "object",
    "required": ["model", "messages"],
    "additionalProperties": True,
    "properties": {
        **_COMMON_PROPS,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {"role": {"type": "string"}, "content": {}},
            },
        },
        "chat_template_kwargs": {"type": "object"},
        "add_generation_prompt": {"type": "boolean"},
    },
}


RESPONSES_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": True,
    "properties": {
        **_COMMON_PROPS,
        "input": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "object"}},
            ]
        },
        "instructions": {"type": "string"},
        "previous_response_id": {"type": "string"},
    },
}

EMBEDDINGS_REQUEST = {
    "type": "object",
    "required": ["model", "input"],
    "additionalProperties": True,
    "properties": {
        "model": {"type": "string", "minLength": 1},
        "input": COMPLETION_REQUEST["properties"]["prompt"],  # type: ignore[index]
        "user": {"type": "string"},
    },
}

# Score, rerank, tokenize, detokenize: the router reads only `model` and routes on load.
MODEL_ONLY_REQUEST = {
    "type": "object",
    "required": ["model"],
    "additionalProperties": True,
    "properties": {"model": {"type": "string", "minLength": 1}},
}

# (path, operationId, request schema, what it is)
_ROUTED = (
    ("/v1/responses", "responses", "ResponsesRequest", "the Responses API, routed as chat"),
    ("/v1/embeddings", "embeddings", "EmbeddingsRequest", "embeddings, routed on their text"),
    ("/v1/score", "score", "ModelOnlyRequest", "vLLM's score API, routed on load"),
    ("/score", "score_root", "ModelOnlyRequest", "vLLM's score API, routed on load"),
    ("/v1/rerank", "rerank", "ModelOnlyRequest", "vLLM's rerank API, routed on load"),
    ("/rerank", "rerank_root", "ModelOnlyRequest", "vLLM's rerank API, routed on load"),
    ("/v2/rerank", "rerank_v2", "ModelOnlyRequest", "vLLM's rerank API, routed on load"),
    ("/tokenize", "tokenize", "ModelOnlyRequest", "vLLM's tokenizer endpoint, on load"),
    ("/detokenize", "detokenize", "ModelOnlyRequest", "vLLM's tokenizer endpoint, on load"),
)


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "malformed JSON or fields",
        401: "missing or wrong admin token",
        403: "endpoint off (no admin token configured)",
        404: "unknown model",
        413: "body or prompt too large",
        503: "no worker can take the request (Retry-After)",
    }
    return {
        str(c): {
            "description": text[c],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for c in codes
    }


def _json_body(ref: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}},
    }


def _ok(desc: str, media: str = "application/json") -> dict[str, Any]:
    return {"200": {"description": desc, "content": {media: {"schema": {}}}}}


def openapi_spec(version: str = "0.1.0") -> dict[str, Any]:
    """The OpenAPI document (a fresh dict each call)."""
    inference_errors = _errors(400, 404, 413, 503)
    routed = {
        path: {
            "post": {
                "operationId": op,
                "description": what,
                "requestBody": _json_body(schema),
                "responses": {**_ok("the worker's answer"), **inference_errors},
            }
        }
        for path, op, schema, what in _ROUTED
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "kvrouter", "version": version},
        "paths": {
            "/v1/completions": {
                "post": {
                    "operationId": "completions",
                    "requestBody": _json_body("CompletionRequest"),
                    "responses": {**_ok("the worker's answer (JSON or SSE)"), **inference_errors},
                }
            },
            "/v1/chat/completions": {
                "post": {
                    "operationId": "chat",
                    "requestBody": _json_body("ChatRequest"),
                    "responses": {**_ok("the worker's answer (JSON or SSE)"), **inference_errors},
                }
            },
            **routed,
            "/v1/models": {"get": {"operationId": "models", "responses": _ok("served models")}},
            "/health": {"get": {"operationId": "health", "responses": _ok("liveness")}},
            "/ready": {
                "get": {
                    "operationId": "ready",
                    "responses": {
                        **_ok("ready or degraded"),
                        "503": {"description": "no worker available"},
                    },
                }
            },
            "/metrics": {
                "get": {"operationId": "metrics", "responses": _ok("Prometheus text", "text/plain")}
            },
            "/openapi.json": {"get": {"operationId": "openapi", "responses": _ok("this document")}},
            "/debug/route": {
                "post": {
                    "operationId": "debug",
                    "security": [{"admin": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {"$ref": "#/components/schemas/CompletionRequest"},
                                        {"$ref": "#/components/schemas/ChatRequest"},
                                    ]
                                }
                            }
                        },
                    },
                    "responses": {**_ok("the routing dry run"), **_errors(400, 401, 403, 404, 413)},
                }
            },
        },
        "components": {
            "schemas": {
                "Error": _ERROR,
                "CompletionRequest": COMPLETION_REQUEST,
                "ChatRequest": CHAT_REQUEST,
                "ResponsesRequest": RESPONSES_REQUEST,
                "EmbeddingsRequest": EMBEDDINGS_REQUEST,
                "ModelOnlyRequest": MODEL_ONLY_REQUEST,
            },
            "securitySchemes": {"admin": {"type": "http", "scheme": "bearer"}},
        },
    }
