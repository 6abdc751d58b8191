"""rsd-engine: Reverse Speculative Decoding, batched and fused."""
from .threads import prefer_passive_waiting

prefer_passive_waiting()  # before anything imports torch: see threads.py

from .params import SamplingParams
from .results import GenerationResult, ScoreResult

__all__ = ["Engine", "Generator", "SamplingParams", "GenerationResult", "ScoreResult"]
__version__ = "0.1.0"


def __getattr__(name):
    # The engine and generator pull in the model runtime and transformers; import it only when asked for.
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "Generator":
        from .generator import Generator

        return Generator
    raise AttributeError(f"module 'rsd_engine' has no attribute {name!r}")
