"""Adapters to engines that run ecanfnet at scale (each imports its engine only when used).

- ``ecanfnet.integrations.ray``: ``ImageClassifier``, a callable class for Ray Data's ``Dataset.map_batches``.
"""
