"""The demo model: a small CNN that classifies the procedural ``scenes``.

``nethook.demo.scene_cnn:scene_cnn`` is a ``load_model`` factory returning it with
the weights shipped next to this file; see ``MODEL_CARD.md``.
"""
