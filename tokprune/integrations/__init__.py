"""Integrations with other tools. Each module imports its tool lazily: ``tokprune`` never depends on them.

* :mod:`tokprune.integrations.lmms_eval`: the ``tokprune_llava`` model for lmms-eval (``pip install
  tokprune[lmms]``): any registered pipeline on a llava-hf checkpoint, batched.
"""
