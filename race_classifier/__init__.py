"""Train, audit and deploy facial-image race classifiers.

The labels these models predict are perceived, socially constructed categories, not facts about a person.
"""
from race_classifier.version import __version__


def __getattr__(name: str):
    # Lazy: ``import race_classifier`` stays light (no torch, no ONNX Runtime) until Classifier is used.
    if name == "Classifier":
        from race_classifier.inference.classifier import Classifier
        return Classifier
    raise AttributeError(f"module 'race_classifier' has no attribute {name!r}")


__all__ = ["Classifier", "__version__"]
