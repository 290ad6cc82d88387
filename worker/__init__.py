"""Deployment side of waferwatch: settings, storage, events, the results database and Celery tasks."""
