"""Celery workers: dataset, training, evaluation and promotion steps."""
