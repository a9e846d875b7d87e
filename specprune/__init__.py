"""specprune: measure each layer's spectrum, recommend safe pruning rates and bit-widths with a
predicted loss increase, apply them, and measure what happened."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "analyze", "Analysis", "recommend", "Plan", "apply_", "evaluate",
           "Evaluation", "save", "load", "theory", "InSampleVerificationWarning", "IdentityCovarianceWarning",
           "PluginWarning"]


def __getattr__(name):  # lazy: importing specprune stays cheap and side-effect free
    if name in ("analyze", "Analysis"):
        from . import analysis

        return getattr(analysis, name)
    if name in ("recommend",):
        from .recommender import recommend

        return recommend
    if name == "Plan":
        from .plan import Plan

        return Plan
    if name in ("apply_", "IdentityCovarianceWarning"):
        from .compress import apply as _apply

        return getattr(_apply, name)
    if name == "InSampleVerificationWarning":
        from .recommender import InSampleVerificationWarning

        return InSampleVerificationWarning
    if name == "PluginWarning":
        from .registry import PluginWarning

        return PluginWarning
    if name in ("evaluate", "Evaluation"):
        from . import evaluation as _ev

        return getattr(_ev, name)
    if name in ("save", "load"):
        from .compress import saved as _saved

        return getattr(_saved, name)
    if name == "theory":
        import importlib

        return importlib.import_module(".theory", __name__)
    raise AttributeError(f"module 'specprune' has no attribute {name!r}")
