"""Integrations with training frameworks, each imported only when used.

``import gradsurgery`` imports none of them; import the one you need, e.g.
``from gradsurgery.integrations.transformers import SurgeryTrainer`` (needs
``pip install gradsurgery[transformers]``).
"""

__all__: list[str] = []
