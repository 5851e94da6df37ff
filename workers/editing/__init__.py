"""The editing core: LOKI and its baselines. Imports torch and transformers only.

Entry points: ``model.load_model``, ``requests.EditRequest``, ``factory.build_editor``,
``loki.LokiEditor``; every editor implements ``editor.Editor``.
"""
