"""Flower entry points (wiring only): apps.server_app:app and apps.client_app:app."""
