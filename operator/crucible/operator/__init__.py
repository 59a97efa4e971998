"""Kubernetes backend: Kopf handlers, manifest rendering, Kubernetes I/O, operator metrics."""
