"""Periodic work: retraining and reconciliation, driven by Celery beat."""
