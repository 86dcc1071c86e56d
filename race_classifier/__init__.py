"""Train, audit and deploy facial-image race classifiers.

The labels these models predict are perceived, socially constructed categories, not facts about a person.
"""
__version__ = "0.1.0"
