"""Blueprints: thin views that parse, call and render."""
