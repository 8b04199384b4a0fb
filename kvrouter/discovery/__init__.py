"""Where the workers are: sources that yield full snapshots of engine endpoints.

`EndpointSource` is what the router and the listener consume; `StaticEndpointSource` serves a
configured list, `KubernetesEndpointSource` watches EndpointSlices (see its module).
"""

from kvrouter.discovery.base import Endpoint, EndpointSource, StaticEndpointSource
from kvrouter.discovery.kubernetes import (
    ApiError,
    ApiServer,
    DiscoveryError,
    KubernetesDiscoveryConfig,
    KubernetesEndpointSource,
    PortNames,
    endpoints_from_slices,
)

__all__ = [
    "ApiError",
    "ApiServer",
    "DiscoveryError",
    "Endpoint",
    "EndpointSource",
    "KubernetesDiscoveryConfig",
    "KubernetesEndpointSource",
    "PortNames",
    "StaticEndpointSource",
    "endpoints_from_slices",
]
