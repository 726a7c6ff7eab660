"""Tracing and dependency groups: which parameter slices must be removed together."""
from .groups import DependencyGraph, Group, Member
from .tracer import GraphError, trace
