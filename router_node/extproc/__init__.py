"""Envoy's external processing protocol (ext_proc v3), the part `kvrouter epp` speaks.

``ext_proc.proto`` is kvrouter's own wire-compatible subset of Envoy's API;
``ext_proc_pb2*`` are grpcio-tools' output from it (`make protos`; a test checks they match).
"""
