"""Trace pipeline: datasets of problems in, verified RSD traces out (rsd generate / score / demo)."""
